"""Corral's own MCP server at /mcp, driven by the ``mcp`` SDK's client over streamable
HTTP against fake llama-servers: the tools listed, a model loaded, prompted, its log
read, unloaded; admin keys only; a failing tool answers isError, not an HTTP error."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.conftest import make_config

ADMIN = "admin-key-0123456789"
USER = "user-key-0123456789"
KEYS = [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "app", "key": USER}]


@pytest.fixture
async def main(corral: Any, tmp_path: Path) -> Any:
    return await corral(make_config(tmp_path, [{"name": "m"}], keys=KEYS))


@asynccontextmanager
async def session(main: Any, key: str = ADMIN) -> AsyncIterator[ClientSession]:
    url = str(main.make_url("/mcp"))
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {key}"}) as http, \
            streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as s:
        await s.initialize()
        yield s


def result_of(r: Any) -> Any:
    assert not r.is_error, r.content
    return json.loads(r.content[0].text)


async def test_the_mcp_client_lists_loads_prompts_reads_logs_and_unloads(main: Any) -> None:
    async with session(main) as s:
        tools = {t.name for t in (await s.list_tools()).tools}
        assert tools == {"list_models", "load_model", "unload_model", "pin_model",
                         "instance_log", "metrics_summary", "run_prompt"}
        before = result_of(await s.call_tool("list_models", {}))
        assert [m["name"] for m in before] == ["m"] and not before[0]["instances"]
        loaded = result_of(await s.call_tool("load_model", {"model": "m"}))
        assert loaded["model"] == "m" and loaded["instance"]
        after = result_of(await s.call_tool("list_models", {}))
        assert [i["id"] for i in after[0]["instances"]] == [loaded["instance"]]
        answer = result_of(await s.call_tool("run_prompt", {"model": "m",
                                                            "prompt": "hello there"}))
        assert "hello" in answer["text"]
        log = result_of(await s.call_tool("instance_log", {"instance": loaded["instance"]}))
        assert log["lines"]
        summary = result_of(await s.call_tool("metrics_summary", {}))
        assert "calls_by_model_and_status" in summary
        gone = result_of(await s.call_tool("unload_model", {"model": "m"}))
        assert gone == {"model": "m", "stopping": 1}


async def test_a_failing_tool_answers_is_error(main: Any) -> None:
    async with session(main) as s:
        r = await s.call_tool("load_model", {"model": "no-such-model"})
        assert r.is_error and "no-such-model" in r.content[0].text
        r = await s.call_tool("pin_model", {"model": "m"})
        assert r.is_error and "admin_config_write" in r.content[0].text


@pytest.mark.parametrize("key, status", [(None, 401), (USER, 403)])
async def test_mcp_is_for_admin_keys_only(main: Any, key: str | None, status: int) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = await main.post("/mcp", headers=headers, json={
        "jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert r.status == status
    r = await main.post("/mcp", headers={"Authorization": f"Bearer {ADMIN}"}, json={
        "jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert r.status == 200 and (await r.json())["result"]["tools"]


async def test_protocol_edges(main: Any) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = await main.post("/mcp", headers=auth, json={"jsonrpc": "2.0",
                                                    "method": "notifications/initialized"})
    assert r.status == 202
    r = await main.post("/mcp", headers=auth, json={"jsonrpc": "2.0", "id": 7,
                                                    "method": "server/discover"})
    assert (await r.json())["error"]["code"] == -32601
    r = await main.post("/mcp", headers=auth, data=b"{not json")
    assert (await r.json())["error"]["code"] == -32700
    assert (await main.get("/mcp", headers=auth)).status == 405
