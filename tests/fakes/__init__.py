"""Stand-ins for llama-server: a Python fake for tests, an nginx one for benchmarks.

``fake_binary(dir)`` makes an executable that Corral can be told to run as its
llama-server (``[llama_server] binary = ...``); it runs ``fake_llama_server.py`` with this
interpreter, so the fake finds aiohttp wherever the tests do. See the fake's docstring
for its command line, its routes and the ``FAKE_*`` fault-injection variables.
"""

from __future__ import annotations

import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import psutil

HERE = Path(__file__).resolve().parent
FAKE_SERVER: Path = HERE / "fake_llama_server.py"
NGINX_UPSTREAM: Path = HERE / "nginx_upstream.sh"

# GGUF value type 8 is a string (u64 length, then bytes).
_GGUF_STRING = 8


def fake_binary(dirpath: Path) -> Path:
    """Write an executable ``llama-server`` wrapper around the fake into ``dirpath``.

    ``exec`` matters: the fake must be Corral's direct child, so that a signal to the
    child's pid (or its process group) reaches the Python process and no shell is left.
    """
    dirpath.mkdir(parents=True, exist_ok=True)
    wrapper = dirpath / "llama-server"
    wrapper.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE_SERVER))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw


def write_dummy_gguf(path: Path, architecture: str = "fake") -> Path:
    """Write a tiny GGUF file where a model would be; the fakes never read it.

    It is a valid GGUF v3 header with no tensors and just ``general.architecture`` and
    ``general.name``, so that Corral's GGUF reader accepts it instead of warning that the
    footprint is unknown, and anything that sniffs the format sees a GGUF file.
    """
    meta = {"general.architecture": architecture, "general.name": path.stem}
    header = b"GGUF" + (3).to_bytes(4, "little")
    header += (0).to_bytes(8, "little") + len(meta).to_bytes(8, "little")  # tensors, keys
    for key, value in meta.items():
        header += _gguf_string(key) + _GGUF_STRING.to_bytes(4, "little") + _gguf_string(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header)
    return path


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


# Ports for servers a test starts in another process come from below the kernel's
# ephemeral range: a port found by binding port 0 is in that range, from which every
# outgoing connection on the machine takes its local port, so between the test's probe
# and the server's bind any connection could take it (seen: a worker's LM Studio port,
# "Address already in use", while two suites ran at once). Below the range the kernel
# hands out no port by itself; a random pick keeps two suites at once apart.
_PORTS = range(15000, max(15000 + 1000, _ephemeral_low()))
_given: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never handed out before by this process, for a
    server started later (``wait_healthy`` still tells a lost bind apart: PortTaken)."""
    for _ in range(2000):
        port = random.choice(_PORTS)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use, or in TIME_WAIT
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS}")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (``free_port`` never repeats one)."""
    return [free_port(host) for _ in range(n)]


class PortTaken(AssertionError):
    """The server could not bind its port: another process took it between the test
    choosing it (free) and the server binding it. The caller may retry on new ports."""


def listens(pid: int, port: int) -> bool:
    """Whether ``pid`` or one of its descendants holds the listening socket on ``port``."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            return True
    return False


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path,
                 within: float = 20.0, also: Sequence[int] = ()) -> None:
    """Poll ``base``/health until ``proc`` answers 200; fail with the log if the process
    exits or ``within`` seconds pass.

    Ports are chosen free and bound later, so on a busy machine another process can
    take one in between: a 200 counts only once ``proc`` itself holds the listening
    socket (else a stranger's /health passes and the test talks to nobody), and a lost
    bind raises ``PortTaken``. ``also``: the server's other ports, which it must hold
    too before it counts as up.
    """
    port = int(base.rsplit(":", 1)[1].split("/", 1)[0])
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).is_success and all(
                    listens(proc.pid, p) for p in (port, *also)):
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            if "address already in use" in text:
                raise PortTaken(text[-2000:])
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM ``proc`` if it still runs and wait for it; kill it if it will not stop."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
