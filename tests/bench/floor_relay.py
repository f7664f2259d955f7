"""The floor of a Python relay on this machine: ``bench_proxy.py --floor``.

No web framework on either side: the client's side is an ``asyncio.Protocol`` with
``httptools``' request parser (llhttp, the parser Node.js uses), the upstream side
pooled keep-alive connections with its response parser, on uvloop. Like the bare relay
it reads the body's ``model`` and relays the answer whole when sized, chunk by chunk
when not. It does nothing else: no timeouts, no limits, no error answers beyond a 400,
one upstream. It is no product (a client that sends a body in pieces, pipelines, or
hangs up mid-answer gets the least care), only a yardstick: what ``aiohttp`` itself
costs per call (bare relay minus floor), and what no Python relay here can beat.

    python tests/bench/floor_relay.py PORT http://127.0.0.1:UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import json
import signal
import socket
import sys
from typing import cast
from urllib.parse import urlsplit

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One pooled connection to the upstream, answering one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.head: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.complete = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's own class
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._wake()
        if self.head is not None and not self.head.done():
            self.head.set_exception(ConnectionError("upstream closed"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        assert self.head is not None
        self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[None]:
        """Send a request; the future is done when the answer's head has come."""
        assert self.transport is not None
        self.head = head = asyncio.get_running_loop().create_future()
        self.headers, self.complete = [], False
        self.transport.write(request)
        return head

    async def body(self) -> collections.abc.AsyncIterator[bytes]:
        while True:
            while self.chunks:
                yield self.chunks.popleft()
            if self.complete or self.transport is None:
                return
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None


class Pool:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.host_line = f"Host: {self.host}:{self.port}\r\n".encode()
        self.idle: list[Upstream] = []

    async def get(self) -> Upstream:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(
            Upstream, self.host, self.port)
        return conn

    def put(self, conn: Upstream) -> None:
        if conn.transport is None:
            return
        if conn.complete and conn.parser.should_keep_alive():
            self.idle.append(conn)
        else:
            conn.transport.close()


class Client(asyncio.Protocol):
    """One client connection: requests parsed as they come, answered in turn."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        method = self.parser.get_method()
        asyncio.get_running_loop().create_task(self.answer(method, self.url, body))

    def _write(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    async def answer(self, method: bytes, url: bytes, body: bytes) -> None:
        if method == b"GET" and url == b"/health":
            self._write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 15\r\n\r\n{\"status\":\"ok\"}")
            return
        try:
            ok = isinstance(json.loads(body).get("model"), str)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            self._write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        conn = await self.pool.get()
        head_came = conn.send(b"POST " + url + b" HTTP/1.1\r\n" + self.pool.host_line
                  + b"Content-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            await head_came
            headers = dict(conn.headers)
            kind = headers.get(b"content-type", b"application/json")
            status = b"HTTP/1.1 %d OK\r\nContent-Type: %s\r\n" % (conn.status, kind)
            if b"content-length" in headers and not kind.startswith(b"text/event-stream"):
                whole = b"".join([chunk async for chunk in conn.body()])
                self._write(status + b"Content-Length: %d\r\n\r\n" % len(whole) + whole)
                return
            head = status + b"Transfer-Encoding: chunked\r\n\r\n"
            async for chunk in conn.body():
                if not self._write(head + b"%x\r\n%s\r\n" % (len(chunk), chunk)):
                    if conn.transport is not None:
                        conn.transport.close()  # the client left: end the upstream's answer
                    return
                head = b""
            self._write(head + b"0\r\n\r\n")
        finally:
            self.pool.put(conn)


async def serve(port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(upstream)
    server = await loop.create_server(lambda: Client(pool), "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
