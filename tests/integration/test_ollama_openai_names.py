"""The Ollama port's OpenAI-compatible routes take the names its /api/tags lists.

Codex `--oss --local-provider ollama` checks its `-m` against `/api/tags` (which lists
`m:latest`), then calls `/v1/responses` with that name; Claude Code users set
`ANTHROPIC_MODEL` to an Ollama name the same way. Ollama answers both spellings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_config
from tests.integration.test_ollama import upstream_requests, write_gguf

# The body Codex 0.171.0 sent, trimmed to the fields that matter here.
CODEX_RESPONSES = {
    "model": "m:latest", "stream": False, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"}, "store": False,
    "include": ["reasoning.encrypted_content"],
    "input": [{"type": "message", "role": "user",
               "content": [{"type": "input_text", "text": "Say hello."}]}],
}
CLAUDE_MESSAGES = {
    "model": "m:latest", "max_tokens": 32000, "stream": False,
    "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
}
CHAT = {"model": "m:latest", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(tmp_path, [
        {"name": "m", "path": str(write_gguf(tmp_path / "m.gguf"))},
        {"name": "tagged:2b"},
    ])
    return await corral_ports(cfg)


async def test_tags_names_are_accepted_on_the_openai_routes(ports: Any) -> None:
    c = ports.ollama
    tags = await (await c.get("/api/tags")).json()
    assert "m:latest" in [m["name"] for m in tags["models"]]
    for path, body in (("/v1/responses", CODEX_RESPONSES), ("/v1/messages", CLAUDE_MESSAGES),
                       ("/v1/chat/completions", CHAT)):
        r = await c.post(path, json=body)
        assert r.status == 200, (path, await r.text())
    # The call went to the one instance of m; the body went as the client sent it.
    sent = await upstream_requests(ports)
    assert [s["path"] for s in sent][-3:] == ["/v1/responses", "/v1/messages",
                                              "/v1/chat/completions"]
    # A name configured with its tag is used as it is.
    r = await c.post("/v1/chat/completions", json={**CHAT, "model": "tagged:2b"})
    assert r.status == 200


async def test_unknown_tagged_names_are_a_404_naming_what_was_sent(ports: Any) -> None:
    r = await ports.ollama.post("/v1/chat/completions", json={**CHAT, "model": "nope:latest"})
    assert r.status == 404
    assert "nope:latest" in (await r.json())["error"]["message"]


async def test_the_main_port_keeps_names_as_configured(ports: Any) -> None:
    # Ollama's naming is the Ollama port's: on the OpenAI port "m:latest" is no model.
    r = await ports.openai.post("/v1/chat/completions", json=CHAT)
    assert r.status == 404
