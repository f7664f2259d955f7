"""Resends avoid what failed, through the real llama-server (issue 25).

The model has a local llama-server and a remote that takes each call and resets its
connection. Calls sent while the local instance loads go to the remote (it is the only
ready upstream), are reset, and must be resent to the local instance, never back to
the remote: every call is answered by the real model.
"""

from __future__ import annotations

import concurrent.futures
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import model_toml

pytestmark = pytest.mark.e2e

CALLS = 4


class Resetter:
    """A listener that reads one call per connection, notes its tag, sends RST."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while b"}" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                except OSError:
                    pass
                if (m := re.search(rb"tag-\d+", data)) is not None:
                    self.seen[m.group().decode()] += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def resetter() -> Iterator[Resetter]:
    r = Resetter()
    yield r
    r.close()


def test_calls_reset_by_a_remote_are_answered_by_the_local_model(
    corral, gemma: Path, resetter: Resetter
) -> None:
    c = corral(model_toml("gemma", gemma)
               + f'remotes = [{{ url = "http://127.0.0.1:{resetter.port}", '
                 'health = "none", cooldown = 600 }]\n')

    def ask(i: int) -> tuple[int, str]:
        r = httpx.post(c.url + "/v1/chat/completions", timeout=120, json={
            "model": "gemma", "max_tokens": 4,
            "messages": [{"role": "user", "content": f"tag-{i}"}]})
        return r.status_code, r.text

    with concurrent.futures.ThreadPoolExecutor(CALLS) as pool:
        results = list(pool.map(ask, range(CALLS)))
    for status, text in results:
        assert status == 200, text
        assert httpx.Response(200, content=text).json()["choices"][0]["message"]["content"]
    # Sent while the local instance loaded, each went to the remote at most once.
    assert resetter.seen and max(resetter.seen.values()) == 1, resetter.seen
    remote = next(i for i in httpx.get(c.url + "/admin/models/gemma", timeout=10)
                  .json()["instances"] if i.get("remote"))
    assert remote["state"] == "failed", remote
