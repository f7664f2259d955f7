"""Shared fixtures: configs built in code, a Corral app around a fake llama-server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scheduler.config import CorralConfig
from tests.fakes import fake_binary, write_dummy_gguf


def make_config(tmp_path: Path, models: list[dict[str, Any]], **sections: Any) -> CorralConfig:
    """A CorralConfig whose models default to a dummy file served by the fake."""
    out = []
    for m in models:
        m = dict(m)
        if "path" not in m and "package" not in m:
            m["path"] = str(write_dummy_gguf(tmp_path / f"{m['name'].replace(':', '_')}.gguf"))
        out.append(m)
    data: dict[str, Any] = {"models": out}
    data["scheduler"] = {"health_interval": 0.02, "drain_timeout": 5, "stop_timeout": 2,
                         **sections.pop("scheduler", {})}
    data.update(sections)
    return CorralConfig(**data)


@pytest.fixture
def fake_llama(tmp_path: Path) -> Path:
    return fake_binary(tmp_path / "bin")


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll ``pred`` until true; bounded in time so a broken test fails, never hangs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        await asyncio.sleep(step)
