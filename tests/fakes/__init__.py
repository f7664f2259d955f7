"""Stand-ins for llama-server: a Python fake for tests, an nginx one for benchmarks.

``fake_binary(dir)`` makes an executable that Corral can be told to run as its
llama-server (``[llama_server] binary = ...``); it runs ``fake_llama_server.py`` with this
interpreter, so the fake finds aiohttp wherever the tests do. See the fake's docstring
for its command line, its routes and the ``FAKE_*`` fault-injection variables.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path,
                 within: float = 20.0) -> None:
    """Poll ``base``/health until it answers 200; fail with the log if the process
    exits or ``within`` seconds pass."""
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
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
