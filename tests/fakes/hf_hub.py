"""A fake Hugging Face Hub: just the `resolve` route that hf_hub_download uses.

Serves files from a dict at ``/{repo}/resolve/{revision}/{filename}`` with the
headers the client reads (commit, ETag, size), and counts downloads so a test can
prove the second use comes from the cache.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, files: dict[str, bytes]) -> None:
        # Keys are "owner/repo/filename".
        self.files = files
        self.downloads = 0
        self.app = web.Application()
        self.app.router.add_route("*", "/{owner}/{repo}/resolve/{rev}/{name:.+}", self.resolve)

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
        return web.Response(body=body, headers=headers)
