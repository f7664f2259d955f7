"""A call that ran a tool loop shows its MCP tool calls in its capture
(``GET /admin/requests/{id}``, a ``tools`` list): server, tool, arguments, outcome and
duration, in memory and in the file the disk tier writes. Against a fake llama-server
scripted to call tools and the ``mcp`` SDK's stdio server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import make_config, wait_for
from tests.fakes import mcp_proc

BOSS = "sk-boss-0123456789"
HEADERS = {"Authorization": f"Bearer {BOSS}"}


async def test_the_capture_of_a_tool_loop_lists_its_tool_calls(
        corral_ports: Any, tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    cfg = make_config(
        tmp_path, [{"name": "m"}],
        mcp_servers=[{"name": "local", "command": list(mcp_proc.STDIO),
                      "env": mcp_proc.env()}],
        mcp={"max_steps": 3},
        server={"capture": {"memory": "1MiB", "dir": str(folder)}},
        keys=[{"name": "boss", "key": BOSS, "admin": True}])
    ports = await corral_ports(cfg)
    r = await ports.openai.post("/v1/responses", headers={**HEADERS, "X-Request-Id": "loop-1"},
                                json={"model": "m", "input": 'call: echo {"text": "kept"}',
                                      "tools": [{"type": "mcp", "server_label": "local"}]})
    assert r.status == 200, await r.text()
    r = await ports.openai.post(
        "/v1/chat/completions", headers={**HEADERS, "X-Request-Id": "loop-2"},
        json={"model": "m", "stream": True, "mcp_servers": ["local"],
              "messages": [{"role": "user", "content": 'call: fail {"reason": "no disk"}'}]})
    assert r.status == 200 and "[DONE]" in await r.text()

    view = await (await ports.openai.get("/admin/requests/loop-1", headers=HEADERS)).json()
    [call] = view["tools"]
    assert (call["server"], call["tool"], call["outcome"]) == ("local", "echo", "ok")
    assert json.loads(call["arguments"]) == {"text": "kept"}
    assert isinstance(call["seconds"], float) and call["seconds"] > 0
    # The record kept is the last model turn's: it answered with the tool's result.
    assert "tool said: kept" in view["answer"]["body"]

    view = await (await ports.openai.get("/admin/requests/loop-2", headers=HEADERS)).json()
    [call] = view["tools"]
    assert (call["tool"], call["outcome"]) == ("fail", "error")
    assert "no disk" in call["error"]

    # The disk tier writes the same list (each turn rewrites the file: the last wins).
    path = folder / "loop-1.json"
    await wait_for(lambda: path.exists() and "tool said: kept" in path.read_text())
    assert [c["tool"] for c in json.loads(path.read_text())["tools"]] == ["echo"]
    # A call that ran no loop lists none.
    r = await ports.openai.post("/v1/chat/completions",
                                headers={**HEADERS, "X-Request-Id": "plain-1"},
                                json={"model": "m", "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200
    view = await (await ports.openai.get("/admin/requests/plain-1", headers=HEADERS)).json()
    assert view["tools"] == []
