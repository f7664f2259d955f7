"""A low open-file limit: ``corral serve`` says so at start, and each port refuses
clients past its share of the limit with a clean 503 while the other ports (and the
same port, once clients leave) keep answering, instead of every accept on every port
failing with EMFILE.

``corral serve`` runs in a subprocess (on uvloop, as in production) whose
RLIMIT_NOFILE (soft and hard) is lowered before it starts, so its own raise to the hard
limit cannot help; the test then holds more idle connections on one port than its
share allows.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from scheduler.process import limits
from tests.fakes import free_port, wait_healthy, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]
LIMIT = 256


def _low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def test_a_low_limit_is_warned_and_excess_clients_get_503(tmp_path: Path) -> None:
    port, ollama = free_port(), free_port()
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f"[server]\nport = {port}\nollama_port = {ollama}\nlmstudio_enabled = false\n"
                   f'[[models]]\nname = "m"\npath = "{write_dummy_gguf(tmp_path / "m.gguf")}"\n')
    share = limits.port_share(LIMIT, 2)
    log_path = tmp_path / "corral.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)], cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_low_limit)
    held: list[socket.socket] = []
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log_path)
        for _ in range(share + 40):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # Past the share each one is answered 503 and closed; none is left hanging.
        answers = [s.recv(4096) for s in held[share:]]
        assert all(a.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in a
                   for a in answers), answers[:3]
        # The other port is not darkened by the first one's flood.
        assert httpx.get(f"http://127.0.0.1:{ollama}/api/version", timeout=10).status_code == 200
    finally:
        for s in held:
            s.close()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(base + "/health", timeout=2).status_code == 200
                break
            except (httpx.HTTPError, AssertionError):
                assert time.monotonic() < deadline, "Corral did not answer again"
                time.sleep(0.1)
        text = log_path.read_text()
        assert f"the open-file limit ({LIMIT}) cannot hold max_connections" in text, text[-3000:]
        assert f"refuses connections past {share} with 503" in text
        assert "out of file descriptors" not in text  # no accept ever failed
        assert "Traceback" not in text
        assert f"open-file limit: {LIMIT}" in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_raise_nofile_lifts_the_soft_limit() -> None:
    soft, hard = limits.nofile()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert limits.raise_nofile() == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_handler_passes_other_errors_on() -> None:
    seen: list[object] = []

    class Loop:
        def default_exception_handler(self, context: dict[str, object]) -> None:
            seen.append(context)

    counted: list[int] = []
    handler = limits.AcceptErrors(lambda: counted.append(1), every=10, clock=lambda: 0.0)
    handler(Loop(), {"message": "x", "exception": ValueError("y")})  # type: ignore[arg-type]
    assert len(seen) == 1 and not counted
    handler(Loop(), {"message": "accept", "exception": OSError(24, "Too many open files")})  # type: ignore[arg-type]
    assert counted == [1] and handler.total == 1 and len(seen) == 1


def test_idle_keep_alive_connections_are_closed(tmp_path: Path) -> None:
    """[server] keepalive_timeout: an idle client connection is closed by Corral."""
    port = free_port()
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f"[server]\nport = {port}\nollama_enabled = false\nlmstudio_enabled = false\n"
                   "keepalive_timeout = 1.0\n"
                   f'[[models]]\nname = "m"\npath = "{write_dummy_gguf(tmp_path / "m.gguf")}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        with sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            sock.settimeout(10)
            assert sock.recv(1) == b""  # closed by Corral, not by the 10 s timeout
            assert time.monotonic() - started < 8
    finally:
        proc.terminate()
        proc.wait(timeout=30)
