"""Listen backlog and GC freeze, through ``corral serve`` in a child process.

The backlog a listening socket really got is what ``ss -ltn`` shows as its Send-Q;
the freeze is logged with the number of objects taken out of the collector.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.edge import tuning
from proxy.ops.reload import Reloader
from scheduler.process import limits
from tests.e2e.conftest import free_ports
from tests.fakes import stop, wait_healthy, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]


def listen_backlog(port: int) -> int:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout.split()
    # State Recv-Q Send-Q Local Peer: a listener's Send-Q is its backlog.
    return int(out[2])


@pytest.fixture
def served(tmp_path: Path, fake_llama: Path) -> Iterator[tuple[dict[str, int], Path]]:
    ports = dict(zip(("main", "ollama", "lmstudio"), free_ports(3), strict=True))
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        f"[server]\nport = {ports['main']}\nollama_port = {ports['ollama']}\n"
        f"lmstudio_port = {ports['lmstudio']}\nbacklog = 777\nlog_level = \"debug\"\n"
        f'[llama_server]\nbinary = "{fake_llama}"\n'
        f'[[models]]\nname = "m"\npath = "{write_dummy_gguf(tmp_path / "m.gguf")}"\n')
    log_path = tmp_path / "corral.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{ports['lmstudio']}", proc, log_path)
        yield ports, log_path
    finally:
        stop(proc, 15)


def test_every_listener_gets_the_configured_backlog(served: tuple[dict[str, int], Path]) -> None:
    ports, _ = served
    expected = limits.backlog(777, limits.somaxconn())
    assert {name: listen_backlog(port) for name, port in ports.items()} == dict.fromkeys(
        ports, expected)


def test_long_lived_objects_are_frozen_after_start(served: tuple[dict[str, int], Path]) -> None:
    ports, log_path = served
    assert httpx.get(f"http://127.0.0.1:{ports['main']}/health").is_success
    deadline = time.monotonic() + 5
    while "long-lived objects frozen" not in log_path.read_text():
        assert time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.05)
    line = next(ln for ln in log_path.read_text().splitlines() if "objects frozen" in ln)
    # Tens of thousands of objects after start-up (the issue counted ~70,000).
    assert int(line.split("gc: ")[1].split()[0]) > 10_000, line
    assert line.endswith("young threshold 50000"), line  # [server] gc_threshold


async def test_a_reload_freezes_the_new_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_llama: Path
) -> None:
    from proxy.app import CoreOptions, build_openai_app
    from proxy.keys import SCHEDULER
    from scheduler.config.root import load_config

    path = tmp_path / "corral.toml"
    gguf = write_dummy_gguf(tmp_path / "m.gguf")
    path.write_text(f'[server]\nollama_enabled = false\nlmstudio_enabled = false\n'
                    f'[[models]]\nname = "m"\npath = "{gguf}"\n')
    frozen: list[int] = []
    monkeypatch.setattr(tuning, "freeze_long_lived", lambda: frozen.append(1) or 0)
    app = build_openai_app(load_config(path), CoreOptions(find_binary=lambda _: fake_llama))
    runner_ctx: Any = app.cleanup_ctx[0](app)
    await runner_ctx.__aenter__()
    try:
        reloader = Reloader(path, app[SCHEDULER])
        path.write_text(path.read_text().replace('name = "m"', 'name = "n"'))
        outcome = await reloader.reload("test")
        assert outcome.ok and outcome.changes["added"] == ["n"], outcome
        assert frozen == [1]
        path.write_text("not toml [")
        assert not (await reloader.reload("test")).ok
        assert frozen == [1]  # a failed reload kept the old objects: nothing new to freeze
    finally:
        await runner_ctx.__aexit__(None, None, None)


def test_freeze_moves_survivors_out_of_the_collector() -> None:
    try:
        keep = [[i] for i in range(1000)]
        assert tuning.freeze_long_lived() >= 1000
        assert len(keep) == 1000
    finally:
        gc.unfreeze()


def test_the_young_threshold_is_raised_and_the_older_ones_kept() -> None:
    from scheduler.config.root import CorralConfig

    before = gc.get_threshold()
    try:
        cfg = CorralConfig.model_validate({"server": {"gc_freeze": False, "gc_threshold": 12345}})
        assert tuning.tune_gc(cfg) == 0  # nothing frozen when gc_freeze is off
        assert gc.get_threshold() == (12345, *before[1:])
        gc.set_threshold(*before)
        cfg = CorralConfig.model_validate({"server": {"gc_freeze": False, "gc_threshold": 0}})
        tuning.tune_gc(cfg)
        assert gc.get_threshold() == before  # 0 keeps Python's
    finally:
        gc.set_threshold(*before)


def test_backlog_is_capped_by_somaxconn() -> None:
    assert limits.backlog(4096, 128) == 128
    assert limits.backlog(100, 4096) == 100
    assert limits.backlog(4096, None) == 4096
    assert limits.backlog(4096, 0) == 4096
