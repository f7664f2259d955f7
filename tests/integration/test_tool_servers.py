"""The configured MCP servers' lifecycle (proxy/tools/servers.py) and the hand-written
client (proxy/tools/client.py) against servers written with the ``mcp`` SDK: started
on first use and shared, stopped when idle, restarted when their config changes or
they die, killed at close; a server that cannot start is an McpError."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from proxy.tools import servers as servers_mod
from proxy.tools.client import McpError
from proxy.tools.servers import Servers
from scheduler.config.root import CorralConfig
from tests.conftest import wait_for
from tests.fakes import mcp_proc

pytestmark = pytest.mark.timeout(120)


def config(**local: Any) -> CorralConfig:
    return CorralConfig(mcp_servers=[
        {"name": "local", "command": list(mcp_proc.STDIO), "env": mcp_proc.env(), **local}])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    with mcp_proc.http_server() as url:
        yield url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def pid_of(servers: Servers, name: str = "local") -> int:
    run = await servers.get(name)
    result = await run.session.call("pid", {}, 30)
    return int(result.text)


async def test_started_once_shared_and_killed_at_close(
        session: aiohttp.ClientSession) -> None:
    cfg = config()
    servers = Servers(lambda: cfg, session)
    try:
        first, second = await asyncio.gather(servers.get("local"), servers.get("local"))
        assert first is second  # one start for concurrent first uses
        pid = await pid_of(servers)
        assert alive(pid) and servers.running() == ["local"]
    finally:
        await servers.close()
    assert not alive(pid)


async def test_idle_servers_stop_and_changed_ones_restart(
        session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers_mod, "REAP_EVERY", 0.05)
    cfg = config(idle_stop=0.2)
    servers = Servers(lambda: cfg, session)
    servers.start_reaper()
    try:
        pid = await pid_of(servers)
        await wait_for(lambda: not servers.running())
        await wait_for(lambda: not alive(pid))  # stopped after it left the table
        pid = await pid_of(servers)  # the next use starts it again
        cfg = config(idle_stop=300, env={**mcp_proc.env(), "X": "1"})
        again = await pid_of(servers)
        assert again != pid and not alive(pid)
    finally:
        await servers.close()


async def test_a_dead_server_is_started_again(session: aiohttp.ClientSession) -> None:
    cfg = config()
    servers = Servers(lambda: cfg, session)
    try:
        pid = await pid_of(servers)
        os.kill(pid, 9)
        await wait_for(lambda: not servers._running["local"].session.transport.alive)
        assert await pid_of(servers) != pid
    finally:
        await servers.close()


async def test_http_server_lists_and_calls(session: aiohttp.ClientSession,
                                           http_url: str) -> None:
    cfg = CorralConfig(mcp_servers=[{"name": "remote", "url": http_url,
                                     "allowed_tools": ["add"]}])
    servers = Servers(lambda: cfg, session)
    try:
        run = await servers.get("remote")
        assert [t.name for t in run.offered] == ["add"]
        assert {"echo", "add"} <= {t.name for t in run.tools}
        result = await run.session.call("add", {"a": 2, "b": 2}, 30)
        assert (result.text, result.is_error) == ("4", False)
        failed = await run.session.call("fail", {"reason": "why"}, 30)
        assert failed.is_error and "why" in failed.text
    finally:
        await servers.close()


@pytest.mark.parametrize("entry, words", [
    ({"command": ["/nonexistent/mcp-server"]}, "cannot start"),
    ({"command": [sys.executable, "-c", "pass"]}, "exited"),
    ({"url": "http://127.0.0.1:9/mcp"}, "initialize"),
])
async def test_a_server_that_cannot_start_is_an_mcp_error(
        session: aiohttp.ClientSession, entry: dict[str, Any], words: str) -> None:
    cfg = CorralConfig(mcp_servers=[{"name": "broken", "start_timeout": 10, **entry}])
    servers = Servers(lambda: cfg, session)
    try:
        with pytest.raises(McpError, match=words):
            await servers.get("broken")
        assert servers.running() == []
    finally:
        await servers.close()
