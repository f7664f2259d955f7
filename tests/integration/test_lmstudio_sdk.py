"""The real lmstudio-python SDK (1.5.0) against Corral's LM Studio port, with fake
llama-servers as real child processes. The sync API runs in a worker thread (it
has its own event loop thread); the async API runs on the test's loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import lmstudio as lms
import pytest

from proxy.keys import SCHEDULER
from tests.conftest import make_config, wait_for

pytestmark = pytest.mark.timeout(60)

KEY = "sk-lm-Abcd1234:abcdefghij0123456789"


def host(ports: Any) -> str:
    return f"127.0.0.1:{ports.lmstudio.server.port}"


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, [
        {"name": "m", "parallel": 1, "env": {"FAKE_TOKEN_DELAY": "0.05"}},
        {"name": "emb", "embedding": True},
    ])
    return await corral_ports(cfg)


async def test_greeting(ports: Any) -> None:
    r = await ports.lmstudio.get("/lmstudio-greeting")
    assert r.status == 200 and await r.json() == {"lmstudio": True}


def _sync_session(h: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with lms.Client(h) as client:
        out["downloaded"] = sorted(m.model_key for m in client.list_downloaded_models())
        out["loaded_before"] = [m.identifier for m in client.llm.list_loaded()]
        model = client.llm.model("m")
        out["loaded"] = [m.identifier for m in client.llm.list_loaded()]
        out["info"] = model.get_info()
        out["ctx"] = model.get_context_length()
        result = model.respond({"messages": [{"role": "user", "content": "hello there"}]},
                               config={"maxTokens": 3, "temperature": 0.2, "topKSampling": 5,
                                       "topPSampling": 0.9, "minPSampling": 0.05,
                                       "repeatPenalty": 1.1, "stopStrings": ["zzz"]})
        out["content"] = result.content
        out["stats"] = result.stats
        stream = model.respond_stream("streamed words here", config={"maxTokens": 3})
        out["fragments"] = [f.content for f in stream]
        out["stream_result"] = stream.result().content
        out["complete"] = model.complete("once upon", config={"maxTokens": 2}).content
        out["tokens"] = model.tokenize("a b c")
        out["count"] = model.count_tokens("a b c d")
        emb = client.embedding.model("emb")
        out["embedding"] = emb.embed("some text")
        model.unload()
        out["loaded_after"] = [m.identifier for m in client.llm.list_loaded()]
    return out


async def test_sync_api_every_call(ports: Any) -> None:
    out = await asyncio.to_thread(_sync_session, host(ports))
    assert out["downloaded"] == ["emb", "m"]
    assert out["loaded_before"] == [] and out["loaded"] == ["m"]
    assert out["info"].identifier == "m" and out["ctx"] == 4096
    assert out["content"] == "hello there hello"
    assert out["stats"].stop_reason == "maxPredictedTokensReached"
    assert out["stats"].predicted_tokens_count == 3
    assert out["fragments"] == ["streamed", " words", " here"]
    assert out["stream_result"] == "streamed words here"
    assert out["complete"] == "once upon"
    assert len(out["tokens"]) == 3 and out["count"] == 4
    assert len(out["embedding"]) == 8
    assert out["loaded_after"] == []


async def test_config_reaches_llama_server(ports: Any) -> None:
    await asyncio.to_thread(_sync_session, host(ports))
    # The fake of "m" was unloaded; start it again to read what it was sent.
    async with lms.AsyncClient(host(ports)) as client:
        model = await client.llm.model("m")
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        await model.respond("x y", config={"maxTokens": 2, "temperature": 0.3,
                                           "stopStrings": ["q"], "topPSampling": 0.8},
                            response_format=schema)
        base = ports.openai.app[SCHEDULER].loaded("m")[0].base_url
    async with aiohttp.ClientSession() as s, s.get(base + "/fake/requests") as r:
        body = [x for x in await r.json() if x["path"] == "/v1/chat/completions"][-1]["body"]
    assert body["max_tokens"] == 2 and body["temperature"] == 0.3
    assert body["stop"] == ["q"] and body["top_p"] == 0.8 and body["stream"] is True
    assert body["response_format"]["json_schema"]["schema"] == schema
    assert body["messages"] == [{"role": "user", "content": "x y"}]


async def test_async_api_and_cancel_frees_the_slot(ports: Any) -> None:
    async with lms.AsyncClient(host(ports)) as client:
        assert sorted(m.model_key for m in await client.list_downloaded_models()) == ["emb", "m"]
        model = await client.llm.model("m")
        stream = await model.respond_stream("one two three", config={"maxTokens": 200})
        got = []
        async for frag in stream:
            got.append(frag.content)
            if len(got) == 2:
                await stream.cancel()
        result = stream.result()
        assert result.stats.stop_reason == "userStopped"
        assert result.content.startswith("one two")
        inst = ports.openai.app[SCHEDULER].loaded("m")[0]
        await wait_for(lambda: inst.in_flight == 0, within=5)
        # The fake sees the closed upstream at its next token.
        for _ in range(100):
            async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as r:
                stats = await r.json()
            if stats["cancelled"]:
                break
            await asyncio.sleep(0.05)
        assert stats["cancelled"] == 1 and stats["processing"] == 0
        # The slot (parallel = 1) is free: the next call is answered at once.
        again = await model.respond("four", config={"maxTokens": 1})
        assert again.content == "four"


async def test_slow_load_sends_heartbeats(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "slow", "env": {"FAKE_LOAD_DELAY": "4"}}])
    ports = await corral_ports(cfg)
    old = lms.get_sync_api_timeout()
    lms.set_sync_api_timeout(2.5)

    def run() -> tuple[str, str]:
        with lms.Client(host(ports)) as client:
            model = client.llm.model("slow")  # getOrLoad: loadProgress heartbeats
            first = model.respond("hi", config={"maxTokens": 1}).content
            model.unload()
            # predict loads it again: promptProcessingProgress heartbeats.
            return first, model.respond("again", config={"maxTokens": 1}).content

    try:
        assert await asyncio.to_thread(run) == ("hi", "again")
    finally:
        lms.set_sync_api_timeout(old)


async def test_unknown_model_and_endpoint(ports: Any) -> None:
    async with lms.AsyncClient(host(ports)) as client:
        with pytest.raises(lms.LMStudioError):
            await client.llm.model("does-not-exist")
        with pytest.raises(lms.LMStudioError):
            await client.embedding.model("m")  # an llm, not an embedding model


async def _raw(url: str, auth: dict[str, Any], frames: list[dict[str, Any]], n: int
               ) -> list[Any]:
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str(json.dumps(auth))
        out = [json.loads((await ws.receive(timeout=5)).data)]
        for f in frames:
            await ws.send_str(json.dumps(f) if isinstance(f, dict) else f)
        for _ in range(n):
            out.append(json.loads((await ws.receive(timeout=5)).data))
        return out


AUTH = {"authVersion": 1, "clientIdentifier": "guest:x", "clientPasskey": "y"}


async def test_bad_frames_get_error_frames(ports: Any) -> None:
    url = f"ws://{host(ports)}/llm"
    out = await _raw(url, AUTH, [
        "not json",  # type: ignore[list-item]
        {"type": "rpcCall", "endpoint": "nope", "callId": 1},
        {"type": "channelCreate", "endpoint": "nope", "channelId": 1},
        {"type": "rpcCall", "endpoint": "listLoaded", "callId": 2},
        {"type": "rpcCall", "endpoint": "getModelInfo", "callId": 3,
         "parameter": {"specifier": {"type": "query", "query": {}}, "throwIfNotFound": False}},
    ], 5)
    assert out[0] == {"success": True}
    assert out[1]["type"] == "communicationWarning"
    assert out[2]["type"] == "rpcError" and "not implemented" in out[2]["error"]["title"]
    assert out[3]["type"] == "channelError"
    results = {o["callId"]: o for o in out[4:]}
    assert results[2] == {"type": "rpcResult", "callId": 2, "result": []}
    assert results[3] == {"type": "rpcResult", "callId": 3}  # void: no "result" key
    files = await _raw(f"ws://{host(ports)}/files", AUTH,
                       [{"type": "rpcCall", "endpoint": "retrieve", "callId": 1}], 1)
    assert files[1]["type"] == "rpcError"


class _KeyedClient(lms.AsyncClient):
    def __init__(self, api_host: str, ident: str, passkey: str) -> None:
        self._ident, self._passkey = ident, passkey
        super().__init__(api_host)

    def _create_auth_message(self) -> dict[str, Any]:
        return self._format_auth_message(self._ident, self._passkey)


async def test_api_keys(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m"}], server={"api_keys": [KEY, "plain-key"]})
    ports = await corral_ports(cfg)
    assert (await ports.lmstudio.get("/lmstudio-greeting")).status == 200
    assert (await ports.lmstudio.get("/api/v1/models")).status == 401
    ident, passkey = KEY.removeprefix("sk-lm-").split(":")
    async with _KeyedClient(host(ports), ident, passkey) as client:
        assert [m.model_key for m in await client.list_downloaded_models()] == ["m"]
    # A wrong passkey gets the failure packet and a closed socket, never a hang.
    out = await _raw(f"ws://{host(ports)}/system",
                     {**AUTH, "clientIdentifier": ident, "clientPasskey": "wrong"}, [], 0)
    assert out[0]["success"] is False and "API token" in out[0]["error"]
    # Python 1.5.0 turns the failure into an exception (its own bug makes it a
    # ValueError rather than LMStudioServerError), but it fails, at once.
    with pytest.raises((lms.LMStudioError, ValueError)):
        async with _KeyedClient(host(ports), ident, "wrong") as client:
            await client.list_downloaded_models()


async def test_act_tool_loop_and_prompt_template(corral_ports: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "tools", "env": {"FAKE_TOOL_CALLS": "1"}}])
    ports = await corral_ports(cfg)
    calls: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        calls.append((a, b))
        return a + b

    def run() -> tuple[int, list[Any], str]:
        with lms.Client(host(ports)) as client:
            model = client.llm.model("tools")
            messages: list[Any] = []
            chat = lms.Chat("be brief")
            chat.add_user_message("what is 2+3?")
            result = model.act(chat, [add], on_message=messages.append)
            prompt = model.apply_prompt_template(chat)
            return result.rounds, messages, prompt

    rounds, messages, prompt = await asyncio.to_thread(run)
    assert calls == [(2, 3)] and rounds == 2
    # Round 2 sent the tool result back; the fake then answers with text.
    assert "5" in str(messages[1]) and messages[-1].role == "assistant"
    assert prompt == "<system>be brief\n<user>what is 2+3?\n<assistant>"
    base = ports.openai.app[SCHEDULER].loaded("tools")[0].base_url
    async with aiohttp.ClientSession() as s, s.get(base + "/fake/requests") as r:
        bodies = [x["body"] for x in await r.json() if x["path"] == "/v1/chat/completions"]
    assert bodies[0]["tools"][0]["function"]["name"] == "add"
    assert bodies[1]["messages"][-1] == {"role": "tool", "content": "5", "tool_call_id": "call_0"}


async def test_sdk_port_serves_the_same_routes(aiohttp_client: Any, corral_ports: Any,
                                               tmp_path: Path) -> None:
    from proxy.app import port_app

    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    sdk = await aiohttp_client(port_app(ports.openai.app, "lmstudio_sdk"))
    assert (await sdk.get("/v1/models")).status == 404  # only the SDK routes
    async with lms.AsyncClient(f"127.0.0.1:{sdk.server.port}") as client:
        assert [m.model_key for m in await client.list_downloaded_models()] == ["m"]


async def test_sdk_port_taken_is_a_clear_error(fake_llama: Path, tmp_path: Path) -> None:
    import socket

    from proxy.app import CoreOptions, serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_config(tmp_path, [{"name": "m"}], server={
            "port": 0, "ollama_enabled": False, "lmstudio_enabled": False,
            "lmstudio_sdk_port": port})
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} for the "
                                          r"LM Studio SDK \(server.lmstudio_sdk_port\)"):
            await serve(cfg, CoreOptions(find_binary=lambda _: fake_llama))


JS = Path(__file__).resolve().parents[1] / "e2e" / "js"


async def test_npm_sdk_against_the_fake(ports: Any) -> None:
    """@lmstudio/sdk (tests/e2e/js, pinned in package.json) with no warning logged.
    Runs where `npm ci` has been run there (make test does); the e2e test always runs it."""
    import shutil

    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@lmstudio" / "sdk").is_dir():
        pytest.skip("node or tests/e2e/js/node_modules (npm ci) missing")
    proc = await asyncio.create_subprocess_exec(
        node, "lmstudio_sdk.mjs", f"ws://{host(ports)}", "m", cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 50)
    assert proc.returncode == 0, f"{out.decode()}\n{err.decode()}"
    got = json.loads(out.decode().strip().splitlines()[-1])
    assert got["downloaded"] == ["m", "emb"] and got["loaded"] == ["m"]
    assert got["content"] == got["streamed"] == "Say hello. Say hello. Say hello. Say hello."
    assert got["stopReason"] == "maxPredictedTokensReached" and got["predicted"] == 8
    assert got["contextLength"] == 4096 and got["warnings"] == []


async def test_socket_close_cancels_its_predictions(ports: Any) -> None:
    url = f"ws://{host(ports)}/llm"
    predict = {"type": "channelCreate", "endpoint": "predict", "channelId": 1,
               "creationParameter": {
                   "modelSpecifier": {"type": "query", "query": {"identifier": "m"}},
                   "history": {"messages": [{"role": "user", "content": [
                       {"type": "text", "text": "a long answer"}]}]},
                   "predictionConfigStack": {"layers": []}}}
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_str(json.dumps(AUTH))
        assert json.loads((await ws.receive(timeout=5)).data) == {"success": True}
        await ws.send_str(json.dumps({**predict, "creationParameter": {
            **predict["creationParameter"], "predictionConfigStack": {"layers": [
                {"layerName": "apiOverride", "config": {"fields": [
                    {"key": "llm.prediction.maxPredictedTokens",
                     "value": {"checked": True, "value": 500}}]}}]}}}))
        while True:
            frame = json.loads((await ws.receive(timeout=10)).data)
            if frame["message"]["type"] == "fragment":
                break
    inst = ports.openai.app[SCHEDULER].loaded("m")[0]
    await wait_for(lambda: inst.in_flight == 0, within=5)
    for _ in range(100):
        async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as r:
            stats = await r.json()
        if stats["cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert stats["cancelled"] == 1


async def test_a_deeply_nested_auth_packet_is_refused(
    corral_ports: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 25: stdlib json raised RecursionError out of the handler, before the key
    # check. Now it is an auth packet of the wrong shape, like any other.
    cfg = make_config(tmp_path, [{"name": "m"}], server={"api_keys": [KEY]})
    ports = await corral_ports(cfg)
    deep = '{"authVersion": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    for packet in (deep, "[" * 100_000, '{"a":' * 50_000):
        async with aiohttp.ClientSession() as s, s.ws_connect(f"ws://{host(ports)}/llm") as ws:
            await ws.send_str(packet)
            answer = json.loads((await ws.receive(timeout=5)).data)
            assert answer["success"] is False and "auth packet" in answer["error"]
            assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                          aiohttp.WSMsgType.CLOSED)
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
