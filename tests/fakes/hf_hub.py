"""A fake Hugging Face Hub: the routes huggingface_hub and Corral's pull use.

``/{repo}/resolve/{revision}/{filename}`` serves files from a dict with the headers the
client reads (commit, ETag = the body's sha256 as for LFS files, size), honours
``Range`` (206) so a pull can resume, and can break off a body after ``cut_after``
bytes once (``cut_after = n``) to make a download fail halfway, can ignore ``Range``
(``honour_range = False``, as some mirrors do) and can send bodies slowly
(``chunk_delay`` seconds between 64 KiB chunks).
``/api/models/{repo}/tree/{revision}`` lists a repo's files (``list_repo_files``).
Downloads (GET with a body) and range requests are counted and recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator

import huggingface_hub
from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


class FakeHub:
    def __init__(self, files: dict[str, bytes]) -> None:
        # Keys are "owner/repo/filename".
        self.files = files
        self.downloads = 0
        self.ranges: list[str] = []
        self.cut_after: int | None = None
        self.honour_range = True
        self.chunk_delay = 0.0
        self.bytes_sent = 0  # file bytes written to clients
        self.app = web.Application()
        self.app.router.add_route("*", "/{owner}/{repo}/resolve/{rev}/{name:.+}", self.resolve)
        self.app.router.add_get("/api/models/{owner}/{repo}/tree/{rev}", self.tree)

    async def tree(self, request: web.Request) -> web.Response:
        m = request.match_info
        prefix = f"{m['owner']}/{m['repo']}/"
        entries = [
            {"type": "file", "path": key[len(prefix):], "size": len(body),
             "oid": hashlib.sha1(body).hexdigest(),
             "lfs": {"oid": hashlib.sha256(body).hexdigest(), "size": len(body),
                     "pointerSize": 130}}
            for key, body in sorted(self.files.items()) if key.startswith(prefix)
        ]
        if not entries:
            return web.json_response({"error": "Repository not found"}, status=404,
                                     headers={"X-Error-Code": "RepoNotFound"})
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        body = self.files.get(f"{m['owner']}/{m['repo']}/{m['name']}")
        if body is None:
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound"})
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Length": str(len(body)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(headers=headers)
        self.downloads += 1
        status, start = 200, 0
        rng = _RANGE_RE.match(request.headers.get("Range", ""))
        if rng and self.honour_range:
            self.ranges.append(request.headers["Range"])
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(body) - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            body = body[start:end + 1]
            headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if self.cut_after is not None:
            cut, self.cut_after = self.cut_after, None
            await resp.write(body[:cut])
            # Break the connection mid-body: the client sees a short read.
            assert request.transport is not None
            request.transport.close()
            return resp
        if self.chunk_delay:
            for i in range(0, len(body), 1 << 16):
                await resp.write(body[i:i + (1 << 16)])
                self.bytes_sent += len(body[i:i + (1 << 16)])
                await asyncio.sleep(self.chunk_delay)
        else:
            await resp.write(body)
            self.bytes_sent += len(body)
        await resp.write_eof()
        return resp


def close_hub_client() -> None:
    """huggingface_hub keeps one HTTP client for the whole process, its connections kept
    alive: once a fake hub stops they lead nowhere. Every fake hub closes it when it
    stops, so that no test leaves a socket open (``tests/conftest.py`` checks)."""
    huggingface_hub.close_session()


@contextlib.contextmanager
def hub_in_thread(fake: FakeHub) -> Iterator[str]:
    """Serve ``fake`` on a loopback port from a thread of its own, for code that calls
    the hub synchronously; yields its base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        close_hub_client()
