"""Dynamic model sources (scan, providers, pulls) merge under the configured models."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scheduler.config.root import CorralConfig, ModelConfig
from scheduler.scheduling import scheduler as scheduler_module
from scheduler.scheduling.scheduler import Scheduler
from tests.fakes import write_dummy_gguf


def _remote(name: str, *aliases: str) -> ModelConfig:
    return ModelConfig(name=name, aliases=aliases, remotes=("http://127.0.0.1:9",))


async def test_dynamic_models_merge_and_lose_to_configured() -> None:
    cfg = CorralConfig(models=(_remote("a", "x"),))
    async with aiohttp.ClientSession() as session:
        s = Scheduler(cfg, session)
        report = await s.set_dynamic_models("scan", [_remote("a"), _remote("b", "x", "y")])
        assert report["added"] == ["b"]
        assert s.names() == ["a", "x", "b", "y"]
        assert s.resolve("y").name == "b"
        assert s.configured is cfg
        # A reload keeps the dynamic models; a configured one of the same name wins.
        report = await s.apply_config(CorralConfig(models=(_remote("b"),)))
        assert sorted(report["changed"]) == ["a", "b"]  # a lost its configured alias
        assert [m.name for m in s.config.models] == ["b", "a"]
        assert s.names() == ["b", "a"]  # the dynamic b (and its aliases) lost to the configured
        await s.set_dynamic_models("scan", [])
        assert s.names() == ["b"]
        await s.close()



async def test_local_sources_win_over_providers() -> None:
    async with aiohttp.ClientSession() as session:
        s = Scheduler(CorralConfig(), session)
        await s.set_dynamic_models("provider:cloud", [_remote("x"), _remote("only-cloud")])
        await s.set_dynamic_models("scan", [_remote("x", "x-alias")])
        names = s.names()
        assert names.count("x") == 1 and "x-alias" in names and "only-cloud" in names
        assert s.resolve("x").aliases == ("x-alias",)  # the scanned one
        await s.close()


async def test_sources_that_switch_at_once_take_turns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch sizes new files off the loop; another source's switch meanwhile (a scan
    and a runtime model at start-up) changed the models under it once, on a fresh
    clone's CI ("dictionary changed size during iteration")."""
    def local(name: str) -> ModelConfig:
        return ModelConfig(name=name, path=write_dummy_gguf(tmp_path / f"{name}.gguf"))

    real = scheduler_module.model_size

    def slow_size(*args: Any) -> Any:
        time.sleep(0.05)  # a file on a slow disk: the switch waits here, off the loop
        return real(*args)

    monkeypatch.setattr(scheduler_module, "model_size", slow_size)
    async with aiohttp.ClientSession() as session:
        s = Scheduler(CorralConfig(), session)
        switches = []
        for i in range(6):
            switches.append(asyncio.create_task(
                s.set_dynamic_models(f"src{i}", [local(f"m{i}")])))
            await asyncio.sleep(0.02)
        await asyncio.gather(*switches)
        assert sorted(s.names()) == [f"m{i}" for i in range(6)]
        await s.close()
