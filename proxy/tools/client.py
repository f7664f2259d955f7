"""A small MCP client: JSON-RPC 2.0 over a child's stdio or over streamable HTTP.

Only what the tool loop needs: ``initialize`` then ``notifications/initialized``,
``tools/list`` (every page) and ``tools/call``. Hand-written on asyncio and aiohttp so
the product does not carry the SDK's anyio stack; the tests check it against servers
written with the ``mcp`` SDK. A server's own requests to us (``ping``, ``roots/list``,
sampling) get an empty answer or "method not found": Corral offers none of them.

Stdio children follow the instance discipline (scheduler/process/instance.py): their
own process group, PR_SET_PDEATHSIG so they die with Corral, stderr drained into a
bounded ring, SIGTERM then SIGKILL, always ``wait()``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from proxy.edge import jsonc
from scheduler.aio import cancel_and_wait
from scheduler.process.children import CHILD_PREEXEC, signal_group

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "2025-06-18"
CLIENT_INFO = {"name": "corral", "version": "1"}
# A stdio message longer than this ends the connection (a runaway server).
MAX_LINE = 16 << 20
STOP_GRACE = 2.0


class McpError(Exception):
    """A server could not be reached, started, or answered out of protocol: told to
    the model as a failed tool call, never a 5xx."""


class RemoteError(McpError):
    """A JSON-RPC error answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        """The tool as MCP lists it (Responses' ``mcp_list_tools`` shows this)."""
        return {"name": self.name, "description": self.description,
                "input_schema": self.input_schema, "annotations": self.annotations}


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    is_error: bool


class Transport(Protocol):
    async def request(self, message: dict[str, Any], within: float) -> dict[str, Any]: ...

    async def notify(self, message: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...

    @property
    def alive(self) -> bool: ...


def _result(answer: dict[str, Any]) -> dict[str, Any]:
    if "error" in answer:
        err = answer["error"] if isinstance(answer["error"], dict) else {}
        raise RemoteError(int(err.get("code", -32603)), str(err.get("message", "error")))
    result = answer.get("result")
    if not isinstance(result, dict):
        raise McpError("the server's answer has no result object")
    return result


# --- stdio ----------------------------------------------------------------------------------


class Stdio:
    """A child speaking MCP as one JSON message per line on stdin/stdout."""

    def __init__(self, name: str, argv: tuple[str, ...], env: Mapping[str, str],
                 log_lines: int = 200) -> None:
        self._name = name
        self._argv = argv
        self._env = {**os.environ, **env}
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int | str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._write = asyncio.Lock()
        self.stderr: collections.deque[str] = collections.deque(maxlen=log_lines)

    async def start(self) -> None:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self._env, start_new_session=True,
                preexec_fn=CHILD_PREEXEC, limit=MAX_LINE)
        except OSError as e:
            raise McpError(f"cannot start {self._argv[0]!r}: {e.strerror or e}") from None
        self._tasks = [asyncio.ensure_future(self._read()),
                       asyncio.ensure_future(self._drain())]

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            while True:
                line = await self._proc.stdout.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = jsonc.loads(line)
                except Exception:
                    log.warning("mcp server %s: a line that is not JSON", self._name)
                    continue
                if isinstance(message, dict):
                    await self._dispatch(message)
        except (ValueError, OSError) as e:
            log.warning("mcp server %s: stdout: %s", self._name, e)
        finally:
            self._fail_pending(McpError("the server exited"))

    async def _dispatch(self, message: dict[str, Any]) -> None:
        ident = message.get("id")
        if "method" in message:
            if ident is not None:
                # A request from the server: Corral offers no client features.
                answer: dict[str, Any] = (
                    {"jsonrpc": "2.0", "id": ident, "result": {}}
                    if message["method"] == "ping" else
                    {"jsonrpc": "2.0", "id": ident,
                     "error": {"code": -32601, "message": "method not found"}})
                with contextlib.suppress(McpError):
                    await self._send(answer)
            return
        future = self._pending.pop(ident, None) if isinstance(ident, int | str) else None
        if future is not None and not future.done():
            future.set_result(message)

    async def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            async for line in self._proc.stderr:
                self.stderr.append(line.decode(errors="replace").rstrip())

    def _fail_pending(self, e: McpError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(e)

    async def _send(self, message: dict[str, Any]) -> None:
        if not self.alive or self._proc is None or self._proc.stdin is None:
            raise McpError("the server is not running")
        async with self._write:
            try:
                self._proc.stdin.write(jsonc.dumps(message) + b"\n")
                await self._proc.stdin.drain()
            except (ConnectionError, OSError) as e:
                raise McpError(f"cannot write to the server: {e}") from None

    async def request(self, message: dict[str, Any], within: float) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        try:
            await self._send(message)
            async with asyncio.timeout(within):
                return await future
        finally:
            self._pending.pop(message["id"], None)

    async def notify(self, message: dict[str, Any]) -> None:
        await self._send(message)

    async def close(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await proc.wait()
            except TimeoutError:
                signal_group(proc.pid, signal.SIGKILL)
        if proc is not None:
            await proc.wait()
        for task in self._tasks:
            await cancel_and_wait(task)
        self._fail_pending(McpError("the server was stopped"))


# --- streamable HTTP ------------------------------------------------------------------------


class Http:
    """MCP's streamable HTTP: each message a POST; the answer JSON or an SSE stream."""

    def __init__(self, session: aiohttp.ClientSession, url: str,
                 headers: Mapping[str, str]) -> None:
        self._session = session
        self._url = url
        self._headers = {"Content-Type": "application/json",
                         "Accept": "application/json, text/event-stream", **headers}
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed

    def speak(self, version: str) -> None:
        """Every message after ``initialize`` names the revision agreed on."""
        self._headers["MCP-Protocol-Version"] = version

    async def request(self, message: dict[str, Any], within: float) -> dict[str, Any]:
        async with asyncio.timeout(within):
            async with self._post(message) as resp:
                await self._check(resp)
                if resp.headers.get("Mcp-Session-Id") and message.get("method") == "initialize":
                    self._headers["Mcp-Session-Id"] = resp.headers["Mcp-Session-Id"]
                if resp.content_type == "text/event-stream":
                    return await self._from_stream(resp, message["id"])
                answer = jsonc.loads(await resp.read())
                if isinstance(answer, list):
                    answer = next((a for a in answer if isinstance(a, dict)
                                   and a.get("id") == message["id"]), None)
                if not isinstance(answer, dict):
                    raise McpError("the server's answer is not a JSON-RPC message")
                return answer

    def _post(self, message: dict[str, Any]) -> Any:
        # Never a redirect: the configured URL is the only place Corral connects to.
        return self._session.post(self._url, data=jsonc.dumps(message),
                                  headers=self._headers, allow_redirects=False)

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status >= 300:
            raise McpError(f"the server answered HTTP {resp.status}")

    async def _from_stream(self, resp: aiohttp.ClientResponse, ident: Any) -> dict[str, Any]:
        data: list[bytes] = []
        async for raw in resp.content:
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif not line and data:
                message = jsonc.loads(b"\n".join(data))
                data = []
                if isinstance(message, dict) and message.get("id") == ident and (
                        "result" in message or "error" in message):
                    return message
        raise McpError("the server's stream ended without an answer")

    async def notify(self, message: dict[str, Any]) -> None:
        async with asyncio.timeout(30), self._post(message) as resp:
            await self._check(resp)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if "Mcp-Session-Id" in self._headers:
            # Ends the server's session; a server may refuse (405), which is fine.
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(5), self._session.delete(
                        self._url, headers=self._headers, allow_redirects=False):
                    pass


# --- session --------------------------------------------------------------------------------


@dataclass(slots=True)
class Session:
    """One initialized connection to a server."""

    transport: Transport
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def _call(self, method: str, params: dict[str, Any], within: float) -> dict[str, Any]:
        message = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            return _result(await self.transport.request(message, within))
        except TimeoutError:
            raise McpError(f"{method} timed out after {within:g} s") from None
        except aiohttp.ClientError as e:
            raise McpError(f"{method}: {e}") from None

    async def initialize(self, within: float) -> dict[str, Any]:
        result = await self._call("initialize", {
            "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
            "clientInfo": CLIENT_INFO}, within)
        try:
            await self.transport.notify(
                {"jsonrpc": "2.0", "method": "notifications/initialized"})
        except (TimeoutError, aiohttp.ClientError) as e:
            raise McpError(f"notifications/initialized: {e}") from None
        if isinstance(self.transport, Http) and isinstance(result.get("protocolVersion"), str):
            self.transport.speak(result["protocolVersion"])
        return result

    async def tools(self, within: float) -> list[Tool]:
        out: list[Tool] = []
        cursor: str | None = None
        for _ in range(100):  # pages; a server that never stops paging is cut off
            result = await self._call("tools/list", {"cursor": cursor} if cursor else {},
                                      within)
            for t in result.get("tools") or []:
                if isinstance(t, dict) and isinstance(t.get("name"), str):
                    schema = t.get("inputSchema")
                    out.append(Tool(t["name"], str(t.get("description") or ""),
                                    schema if isinstance(schema, dict) else {"type": "object"},
                                    t.get("annotations") if isinstance(
                                        t.get("annotations"), dict) else None))
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
        return out

    async def call(self, name: str, arguments: dict[str, Any], within: float) -> Result:
        result = await self._call("tools/call", {"name": name, "arguments": arguments},
                                  within)
        return Result(content_text(result.get("content")), result.get("isError") is True)


def content_text(content: Any) -> str:
    """A tool result's content as text for the model: text parts as they are, other
    parts (images, resources) named."""
    if not isinstance(content, list):
        return ""
    parts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            parts.append(str(part.get("text", "")))
        elif kind == "resource" and isinstance(part.get("resource"), dict):
            res = part["resource"]
            parts.append(str(res.get("text") or f"[resource {res.get('uri', '')}]"))
        else:
            parts.append(f"[{kind}]")
    return "\n".join(parts)
