"""The call side of the context rule, pure: which calls are checked, what max_tokens
counts, the "too long" error in each family's words, and the lease fields that carry a
context across processes."""

from __future__ import annotations

import json

import pytest

from proxy.calls import context
from proxy.edge.errors import anthropic_body, message, render, stream_error_event
from scheduler.errors import ContextTooLong
from scheduler.ipc.wire import upstream_frame, upstream_of
from scheduler.scheduling.state import Upstream


def test_only_generating_paths_are_checked_and_only_openai_counts_max_tokens() -> None:
    assert context.of("/v1/embeddings", b"{}") is None
    chat = context.of("/v1/chat/completions", b"{}")
    assert chat is not None and chat.strict
    anthropic = context.of("/v1/messages", b"{}", family="anthropic")
    assert anthropic is not None and not anthropic.strict
    ollama = context.of("/v1/chat/completions", payload={"messages": []}, family="ollama")
    assert ollama is not None and not ollama.strict and ollama.raw() == b'{"messages":[]}'


@pytest.mark.parametrize(("body", "output"), [
    (b'{"max_tokens": 100}', 100),
    (b'{"max_completion_tokens": 50, "max_tokens": 100}', 50),
    (b'{"max_output_tokens": 7}', 7),
    (b'{"max_tokens": null}', 0),
    (b'{"max_tokens": true}', 0),
    (b'{"max_tokens": -1}', 0),
    (b"not json", 0),
])
def test_max_tokens_of_a_body(body: bytes, output: int) -> None:
    assert context._output(body, None) == output


def err(tokens: int = 9004, maximum: int = 8192, output: int = 0) -> ContextTooLong:
    return ContextTooLong("m", tokens, maximum, output)


def test_each_family_words_it_as_its_own_api_does() -> None:
    assert message(err(), "anthropic") == "prompt is too long: 9004 tokens > 8192 maximum"
    assert message(err(), "ollama").startswith("the input length exceeds the context length")
    assert "n_keep: 9004>= n_ctx: 8192" in message(err(), "lmstudio")
    assert message(err(), "openai") == (
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9004 tokens. Please reduce the length of the messages.")
    assert "you requested 9104 tokens (104 in the messages, 9000 in the completion)" in (
        message(err(104, 8192, 9000), "openai"))


def test_envelopes_status_and_code() -> None:
    body = json.loads(render(err(), "openai").body)  # type: ignore[arg-type]
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages"
    answer = render(err(), "anthropic")
    assert answer.status == 400
    assert anthropic_body(err()) == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 9004 tokens > 8192 maximum"}}
    # LM Studio's /v1 answers in OpenAI's envelope with LM Studio's words.
    lms = json.loads(render(err(), "openai", "lmstudio").body)  # type: ignore[arg-type]
    assert lms["error"]["code"] == "context_length_exceeded"
    assert lms["error"]["message"].startswith("The number of tokens to keep")
    assert json.loads(render(err(), "ollama").body)["error"].startswith(  # type: ignore[arg-type]
        "the input length exceeds")
    # A stream that had begun ends with the family's own event.
    assert b"prompt is too long" in stream_error_event(err(), "anthropic")


def test_the_call_s_counts_replace_the_scheduler_s_need() -> None:
    fit = context.Fit("/v1/chat/completions", b"{}", strict=True, tokens=104, output=9000)
    e = context.explained(err(9104), fit)
    assert (e.tokens, e.output, e.maximum) == (104, 9000, 8192)
    assert context.explained(err(9104), None).tokens == 9104


def test_an_upstream_s_context_crosses_to_workers() -> None:
    up = Upstream("http://127.0.0.1:1", "m#1", "m", 0.5, None, ctx=8192)
    assert upstream_of(json.loads(json.dumps(upstream_frame(up)))).ctx == 8192
