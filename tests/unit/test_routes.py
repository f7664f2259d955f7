"""The route table, the body head parser, capabilities and the error envelopes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.calls.routes import ROUTES, Route
from proxy.edge import jsonc
from proxy.edge.errors import anthropic_body, anthropic_status, render, stream_error_event
from scheduler.config.root import ModelConfig
from scheduler.errors import (
    BadRequest,
    CannotServe,
    CorralError,
    LoadFailed,
    Overloaded,
    ShuttingDown,
    TooLarge,
    Unauthorized,
    UnknownModel,
    UpstreamFailed,
)
from scheduler.models.capabilities import capabilities


def _paths(port: str) -> list[tuple[str, str]]:
    return [(r.method, p) for r in ROUTES if port in r.ports for p in r.paths]


@pytest.mark.parametrize("port", ["main", "ollama", "lmstudio"])
def test_no_path_is_mounted_twice_on_a_port(port: str) -> None:
    paths = _paths(port)
    assert len(paths) == len(set(paths))


@pytest.mark.parametrize(("method", "path", "ports"), [
    ("POST", "/v1/chat/completions", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/responses", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/responses/input_tokens", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/chat/completions/input_tokens", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/messages", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/messages/count_tokens", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/rerank", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/reranking", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/audio/transcriptions", {"main", "ollama", "lmstudio"}),
    # Speech and images (issue 30): wherever OpenAI-speaking clients send them.
    ("POST", "/v1/audio/translations", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/audio/speech", {"main", "ollama", "lmstudio"}),
    ("GET", "/v1/audio/voices", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/images/generations", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/images/edits", {"main", "ollama", "lmstudio"}),
    ("POST", "/v1/images/variations", {"main", "ollama", "lmstudio"}),
    ("POST", "/sdapi/v1/txt2img", {"main"}),
    ("POST", "/sdapi/v1/img2img", {"main"}),
    ("POST", "/rerank", {"main"}),
    ("POST", "/completion", {"main"}),
    ("POST", "/infill", {"main"}),
    ("POST", "/tokenize", {"main"}),
    ("POST", "/detokenize", {"main"}),
    ("POST", "/apply-template", {"main"}),
    ("GET", "/props", {"main"}),
    ("POST", "/api/v0/embeddings", {"lmstudio"}),
])
def test_the_issue_s_endpoints_are_rows(method: str, path: str, ports: set[str]) -> None:
    mounted = {port for port in ("main", "ollama", "lmstudio") if (method, path) in _paths(port)}
    assert mounted == ports


def _row(path: str) -> Route:
    return next(r for r in ROUTES if path in r.paths)


@pytest.mark.parametrize(("path", "model_in", "family", "capability"), [
    ("/v1/messages", "body", "anthropic", "chat"),
    ("/v1/responses", "body", "responses", "chat"),
    ("/v1/audio/transcriptions", "form", "openai", "audio"),
    ("/v1/audio/translations", "form", "openai", "audio"),
    ("/v1/audio/speech", "body", "openai", "speech"),
    ("/v1/audio/voices", "query", "openai", "speech"),
    ("/v1/images/generations", "body", "openai", "image"),
    ("/v1/images/edits", "form", "openai", "image"),
    ("/sdapi/v1/img2img", "body", "openai", "image"),
    ("/props", "query", "native", None),
    ("/v1/rerank", "body", "openai", "rerank"),
    ("/infill", "body", "native", "infill"),
])
def test_rows_say_where_the_model_is(path: str, model_in: str, family: str,
                                     capability: str | None) -> None:
    row = _row(path)
    assert (row.model_in, row.family, row.capability) == (model_in, family, capability)


def test_an_audio_file_may_be_larger_than_a_chat_body() -> None:
    assert _row("/v1/audio/transcriptions").max_body > 8 * _row("/v1/chat/completions").max_body


def test_uploads_of_images_may_be_large_and_a_prompt_is_small() -> None:
    chat = _row("/v1/chat/completions").max_body
    assert _row("/v1/images/edits").max_body > 4 * chat
    assert _row("/sdapi/v1/img2img").max_body > 4 * chat  # base64 images in JSON
    assert _row("/v1/audio/speech").max_body < chat
    assert _row("/v1/images/generations").max_body < chat


# --- the body head -------------------------------------------------------------------


@pytest.mark.parametrize(("body", "model", "streaming"), [
    (b'{"model": "m"}', "m", False),
    (b'{"model": "m", "stream": true, "other": [1, {"x": 2}]}', "m", True),
    (b'{"stream": "yes"}', None, False),
    (b'{"model": "m", "messages": "not a list is fine for the head?"}', None, None),
])
def test_head(body: bytes, model: str | None, streaming: bool | None) -> None:
    if streaming is None:
        with pytest.raises(BadRequest):
            jsonc.head(body)
        return
    h = jsonc.head(body)
    assert (h.model, h.streaming) == (model, streaming)


@pytest.mark.parametrize(("body", "message"), [
    (b"", "missing request body"),
    (b"{", "not valid JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"model": 3}', "'model' must be a string"),
    (b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_bodies_are_400s(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        jsonc.head(body)
    assert message in e.value.message


def test_deep_nesting_in_a_full_parse_is_a_400() -> None:
    with pytest.raises(BadRequest, match="nested too deeply"):
        jsonc.loads_object(b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}")


def test_the_chain_follows_the_conversation() -> None:
    def chain(messages: list[dict[str, Any]]) -> tuple[tuple[int, int], ...]:
        return jsonc.head(json.dumps({"model": "m", "messages": messages}).encode()).chain()

    first = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    later = [*first, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    other = [{"role": "system", "content": "s"}, {"role": "user", "content": "w"}]
    assert chain(later)[:len(chain(first))] == chain(first)
    assert chain(other)[0] == chain(first)[0] and chain(other)[1] != chain(first)[1]
    assert jsonc.head(b'{"model": "m"}').chain() == ()


# --- capabilities ----------------------------------------------------------------------


def _cfg(**kw: Any) -> ModelConfig:
    return ModelConfig(name="m", path="/m.gguf", **kw)


@pytest.mark.parametrize(("kw", "fim", "has", "lacks"), [
    ({}, None, {"chat", "completion", "tools", "infill"}, {"embedding", "vision"}),
    ({}, False, {"chat"}, {"infill"}),
    ({"embedding": True}, None, {"embedding"}, {"chat", "rerank"}),
    ({"args": ["--embeddings"]}, None, {"embedding"}, {"chat"}),
    ({"rerank": True}, None, {"rerank"}, {"chat", "embedding"}),
    ({"args": ["--mmproj", "/p.gguf"]}, None, {"chat", "vision", "audio"}, set()),
    ({"capabilities": ["audio"]}, None, {"audio"}, {"chat"}),
])
def test_capabilities(kw: dict[str, Any], fim: bool | None, has: set[str],
                      lacks: set[str]) -> None:
    caps = capabilities(_cfg(**kw), fim=fim)
    assert has <= caps and not (lacks & caps)


# --- error envelopes -------------------------------------------------------------------


@pytest.mark.parametrize(("err", "status", "kind"), [
    (BadRequest("x"), 400, "invalid_request_error"),
    (CannotServe("m", "rerank", ["r"]), 400, "invalid_request_error"),
    (Unauthorized("x"), 401, "authentication_error"),
    (UnknownModel("m", ["a"]), 404, "not_found_error"),
    (TooLarge("x"), 413, "request_too_large"),
    (Overloaded("x", 1.0), 529, "overloaded_error"),
    (ShuttingDown("x"), 529, "overloaded_error"),
    (LoadFailed("m", "exited"), 503, "api_error"),
    (UpstreamFailed("x"), 502, "api_error"),
    (CorralError("x"), 500, "api_error"),
])
def test_anthropic_envelope(err: CorralError, status: int, kind: str) -> None:
    assert anthropic_status(err) == status
    body = anthropic_body(err)
    assert body == {"type": "error", "error": {"type": kind, "message": err.message}}
    resp = render(err, "anthropic")
    assert resp.status == status
    assert json.loads(resp.body)["error"]["type"] == kind  # type: ignore[arg-type]


@pytest.mark.parametrize(("family", "event", "check"), [
    ("anthropic", "error", lambda d: d["type"] == "error" and d["error"]["type"] == "api_error"),
    ("responses", "error", lambda d: d["type"] == "error" and d["code"] == "upstream_failed"),
    ("openai", None, lambda d: d["error"]["code"] == "upstream_failed"),
])
def test_stream_error_events(family: Any, event: str | None, check: Any) -> None:
    frame = stream_error_event(UpstreamFailed("it broke"), family).decode()
    assert frame.endswith("\n\n")
    lines = frame.strip().split("\n")
    if event:
        assert lines[0] == f"event: {event}"
    data = json.loads(lines[-1].removeprefix("data: "))
    assert check(data) and "it broke" in json.dumps(data)


@pytest.mark.parametrize(("kw", "flag"), [({"rerank": True}, "--rerank"),
                                          ({"embedding": True}, "--embedding")])
def test_launch_flags_follow_the_capability_keys(kw: dict[str, Any], flag: str) -> None:
    from pathlib import Path

    from scheduler.process.launcher import build_argv

    argv = build_argv(Path("/bin/llama-server"), _cfg(**kw), Path("/m.gguf"), 1, ())
    assert flag in argv
    assert "--rerank" not in build_argv(Path("/b"), _cfg(), Path("/m.gguf"), 1, ())


def test_a_shipped_chat_template_is_passed_as_a_file() -> None:
    from pathlib import Path

    from scheduler.process.launcher import build_argv

    argv = build_argv(Path("/b"), _cfg(chat_template="gemma3"), Path("/m.gguf"), 1, ())
    path = Path(argv[argv.index("--chat-template-file") + 1])
    assert path.is_file() and "<start_of_turn>" in path.read_text()
    argv = build_argv(Path("/b"), _cfg(chat_template="/t/mine.jinja"), Path("/m.gguf"), 1, ())
    assert argv[argv.index("--chat-template-file") + 1] == "/t/mine.jinja"
