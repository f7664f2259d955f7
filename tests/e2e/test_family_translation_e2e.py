"""Anthropic Messages and Responses translated to chat completions, against the real
llama-server with Gemma 3 270M, declared a chat-only remote (``api = ["chat"]``):
the ``anthropic`` and ``openai`` clients, streamed and not, a real tool call (the
test template shows the model one example, so it makes one), its result sent back,
and token counts compared with llama-server's own."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, model_toml, wait_until
from tests.fakes import free_port, stop

pytestmark = pytest.mark.e2e

TEMPLATE = Path(__file__).parent / "data" / "gemma-tools.jinja"
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
FN_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
             "parameters": TOOLS[0]["input_schema"]}]


@pytest.fixture(scope="module")
def remote(llama_server_bin: Path, gemma: Path) -> Iterator[str]:
    """A llama-server of our own: Corral reaches it as a remote, as it would an old
    vLLM on another machine."""
    port = free_port()
    proc = subprocess.Popen(
        [str(llama_server_bin), "-m", str(gemma), "--host", "127.0.0.1", "--port", str(port),
         "-c", "2048", "-t", "1", "--parallel", "1", "--jinja",
         "--chat-template-file", str(TEMPLATE)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=60)
        yield url
    finally:
        stop(proc)


@pytest.fixture
def served(corral: Callable[..., CorralProc], remote: str) -> CorralProc:
    return corral(f'[[models]]\nname = "gemma-chat"\nremotes = ["{remote}"]\n'
                  'api = ["chat"]\n')


@pytest.fixture
def claude(served: CorralProc) -> Iterator[anthropic.Anthropic]:
    # Closed at the end: a pooled socket left to the GC fails a later test.
    with anthropic.Anthropic(base_url=served.url, api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
def oai(served: CorralProc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def test_anthropic_sdk(served: CorralProc, remote: str, claude: anthropic.Anthropic) -> None:
    client = claude
    raw = client.messages.with_raw_response.create(model="gemma-chat", max_tokens=8,
                                                   messages=HELLO)  # type: ignore[arg-type]
    assert raw.headers["X-Corral-Translated"] == "chat"
    msg = raw.parse()
    # The id of llama-server's chat answer shows through: the chat route served it.
    assert msg.id.startswith("msg_chatcmpl-") and msg.model == "gemma-chat"
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("max_tokens", "end_turn") and msg.usage.output_tokens > 0
    assert msg.usage.input_tokens > 0
    with client.messages.stream(model="gemma-chat", max_tokens=8,
                                messages=HELLO) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    count = client.messages.count_tokens(model="gemma-chat", messages=HELLO)  # type: ignore[arg-type]
    # The chat path's count is llama-server's own count of the same conversation.
    native = httpx.post(remote + "/v1/messages/count_tokens", timeout=30, json={
        "model": "g", "messages": HELLO}).json()["input_tokens"]
    assert count.input_tokens == native > 0


def test_anthropic_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    client = claude
    msg = client.messages.create(model="gemma-chat", max_tokens=40, extra_body={"temperature": 0},
                                 tools=TOOLS, tool_choice={"type": "any"},  # type: ignore[arg-type]
                                 messages=WEATHER)  # type: ignore[arg-type]
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert uses and uses[0].name == "get_weather" and uses[0].input == {"city": "Paris"}
    assert msg.stop_reason in ("tool_use", "max_tokens")
    # Named: llama-server takes no object tool_choice, so it goes as that tool, required.
    with client.messages.stream(model="gemma-chat", max_tokens=40, extra_body={"temperature": 0},
                                tools=TOOLS,  # type: ignore[arg-type]
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=WEATHER) as stream:  # type: ignore[arg-type]
        kinds = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert "content_block_start" in kinds and kinds[-1] == "message_stop"
    suses = [b for b in streamed.content if b.type == "tool_use"]
    assert suses and suses[0].input == {"city": "Paris"}
    follow = client.messages.create(
        model="gemma-chat", max_tokens=8, tools=TOOLS,  # type: ignore[arg-type]
        messages=[*WEATHER,  # type: ignore[list-item]
                  {"role": "assistant", "content": [uses[0].model_dump()]},
                  {"role": "user", "content": [{"type": "tool_result",
                                                "tool_use_id": uses[0].id,
                                                "content": "Sunny, 21 C"}]}])
    assert follow.role == "assistant" and follow.content and follow.usage.input_tokens > 0


def test_openai_responses(served: CorralProc, remote: str, oai: openai.OpenAI) -> None:
    client = oai
    raw = client.responses.with_raw_response.create(model="gemma-chat", input="Hello",
                                                    max_output_tokens=8)
    assert raw.headers["X-Corral-Translated"] == "chat"
    resp = raw.parse()
    assert resp.output_text and resp.usage is not None
    # Kept by Corral: the next turn's prompt holds the first turn and its answer.
    follow = client.responses.create(model="gemma-chat", input="And then?",
                                     previous_response_id=resp.id, max_output_tokens=4)
    assert follow.usage is not None
    assert follow.usage.input_tokens > resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.status in ("completed", "incomplete") and resp.usage is not None
    events = list(client.responses.create(model="gemma-chat", input="Hello",
                                          max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    # Gemma does not stop on its own soon: the last event is response.incomplete, whose
    # response carries the text the deltas streamed.
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1].response  # type: ignore[union-attr]
    assert text and last.output_text == text
    r = httpx.post(served.url + "/v1/responses/input_tokens", timeout=60,
                   json={"model": "gemma-chat", "input": "Hello there"})
    native = httpx.post(remote + "/v1/responses/input_tokens", timeout=60,
                        json={"model": "g", "input": "Hello there"})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    assert r.json()["input_tokens"] == native.json()["input_tokens"]


def test_openai_responses_function_call_round_trip(oai: openai.OpenAI) -> None:
    client = oai
    resp = client.responses.create(model="gemma-chat", input=WEATHER, tools=FN_TOOLS,  # type: ignore[arg-type]
                                   tool_choice="required", temperature=0,
                                   max_output_tokens=40)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    call = calls[0]
    follow = client.responses.create(model="gemma-chat", tools=FN_TOOLS,  # type: ignore[arg-type]
                                     max_output_tokens=8, input=[
        *WEATHER,
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert follow.output and follow.usage is not None and follow.usage.input_tokens > 0


def test_errors_come_back_in_each_familys_envelope(claude: anthropic.Anthropic,
                                                   oai: openai.OpenAI) -> None:
    client = claude
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="gemma-chat", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "document", "source": {
                "type": "text", "media_type": "text/plain", "data": "x"}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="gemma-chat", input=[
            {"type": "item_reference", "id": "msg_1"}])  # type: ignore[list-item]
    # llama-server's own refusal (a context overflow) is relayed in Anthropic's shape.
    with pytest.raises(anthropic.APIStatusError) as e2:
        client.messages.create(model="gemma-chat", max_tokens=4,
                               messages=[{"role": "user", "content": "word " * 3000}])
    assert e2.value.body["type"] == "error"  # type: ignore[index]
    assert e2.value.body["error"]["message"]  # type: ignore[index]


def test_a_launched_llama_server_declared_chat_only(corral: Callable[..., CorralProc],
                                                    gemma: Path) -> None:
    """The same translation when Corral launches the llama-server itself."""
    cp = corral(model_toml("gemma", gemma, chat_template="gemma3", api=["chat"]))
    with anthropic.Anthropic(base_url=cp.url, api_key="x", max_retries=0) as client:
        raw = client.messages.with_raw_response.create(model="gemma", max_tokens=6,
                                                       messages=HELLO)  # type: ignore[arg-type]
        assert raw.headers["X-Corral-Translated"] == "chat"
        assert raw.parse().content[0].text  # type: ignore[union-attr]
        with client.messages.stream(model="gemma", max_tokens=6,
                                    messages=HELLO) as stream:  # type: ignore[arg-type]
            assert "".join(stream.text_stream)
    with openai.OpenAI(base_url=f"http://127.0.0.1:{cp.ollama_port}/v1", api_key="x",
                       max_retries=0) as oclient:
        raw = oclient.responses.with_raw_response.create(model="gemma", input="Hello",
                                                         max_output_tokens=6)
        assert raw.headers["X-Corral-Translated"] == "chat" and raw.parse().output_text
