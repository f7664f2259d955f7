"""The harness's readiness check: a port chosen free can be taken by another process
before the server binds it, and the test must not mistake that stranger for its server
(a dashboard e2e test once passed its health wait and then found nobody listening)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.fakes import PortTaken, stop, wait_healthy

REPO = Path(__file__).resolve().parents[2]


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stranger() -> Iterator[int]:
    """Another process's server answering /health 200 on a loopback port."""
    server = HTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_strangers_health_answer_does_not_count(stranger: int, tmp_path: Path) -> None:
    log = tmp_path / "idle.log"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(AssertionError):
            wait_healthy(f"http://127.0.0.1:{stranger}", proc, log, within=1.0)
    finally:
        stop(proc)


def test_a_lost_bind_is_told_apart(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = tmp_path / "corral.toml"
        cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
        log = tmp_path / "corral.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            with pytest.raises(PortTaken):
                wait_healthy(f"http://127.0.0.1:{port}", proc, log, within=20.0)
        finally:
            stop(proc)
