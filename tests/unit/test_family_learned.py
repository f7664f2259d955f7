"""What an undeclared upstream is learned to lack, what counts as a missing route, and
which upstream API each route needs."""

from __future__ import annotations

import pytest

from proxy.dialects.families.bridge import route_api
from proxy.dialects.families.learned import Learned, route_missing


@pytest.mark.parametrize(("status", "body", "missing"), [
    (404, b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}', True),
    (404, b'{"detail":"Not Found"}', True),  # vLLM, SGLang (FastAPI)
    (404, b"404 page not found", True),  # Ollama
    (405, b"Method Not Allowed", True),
    (501, b"", True),
    # A missing model is not a missing route: it must reach the client as it is.
    (404, b'{"object":"error","message":"The model `x` does not exist.","code":404}', False),
    (400, b'{"error":"bad"}', False),
    (500, b"Not Found", False),
])
def test_route_missing(status: int, body: bytes, missing: bool) -> None:
    assert route_missing(status, body) is missing


def test_learned_per_upstream_and_family_bounded() -> None:
    learned = Learned(limit=2)
    learned.learn("a", "messages")
    learned.learn("a", "responses")
    assert learned.lacks("a", "messages") and learned.lacks("a", "responses")
    assert not learned.lacks("b", "messages")
    learned.learn("b", "messages")
    learned.learn("c", "messages")
    # The oldest upstream is forgotten first; the table never grows past its limit.
    assert not learned.lacks("a", "messages")
    assert learned.lacks("b", "messages") and learned.lacks("c", "messages")


@pytest.mark.parametrize(("family", "path", "api"), [
    ("openai", "/v1/chat/completions", "chat"),
    ("openai", "/v1/completions", "completions"),
    ("openai", "/v1/embeddings", "embeddings"),
    ("openai", "/v1/reranking", "rerank"),
    ("openai", "/v1/chat/completions/input_tokens", "native"),
    ("native", "/tokenize", "native"),
    ("anthropic", "/v1/messages/count_tokens", "messages"),
    ("responses", "/v1/responses", "responses"),
    ("openai", "/v1/unknown", None),
])
def test_route_api(family: str, path: str, api: str | None) -> None:
    assert route_api(family, path) == api  # type: ignore[arg-type]


@pytest.mark.parametrize(("body", "api", "now"), [
    # Kept (no store: false) on an undeclared api: Corral's store, translated at once.
    (b'{"model": "m", "input": "a"}', None, True),
    (b'{"model": "m", "input": "a", "store": true}', None, True),
    # Not kept: llama-server's own Responses, decided per upstream at send time.
    (b'{"model": "m", "input": "a", "store": false}', None, False),
    # A declared api that speaks Responses: the pass-through, kept or not.
    (b'{"model": "m", "input": "a"}', ("chat", "responses"), False),
    # A declared api without it: translated at once, as always.
    (b'{"model": "m", "input": "a", "store": false}', ("chat",), True),
])
def test_which_responses_calls_are_translated_before_the_lease(
    body: bytes, api: tuple[str, ...] | None, now: bool
) -> None:
    from proxy.dialects.families import bridge
    from proxy.dialects.families.learned import FamilyState
    from scheduler.config.root import ModelConfig

    cfg = ModelConfig(name="m", path="/x.gguf", api=list(api) if api else None)
    from proxy.edge import jsonc

    b = bridge.of("responses", "/v1/responses", "/v1/responses", body, FamilyState(), cfg,
                  jsonc.head(body).store)
    assert b is not None and b.translated_now is now
    if now:
        assert b.translated()["messages"][-1] == {"role": "user", "content": "a"}
