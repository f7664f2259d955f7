"""Shared fixtures: configs built in code, a Corral app around a fake llama-server."""

from __future__ import annotations

import asyncio
import socket
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scheduler.config.root import CorralConfig
from tests.fakes import fake_binary, write_dummy_gguf


def make_config(tmp_path: Path, models: list[dict[str, Any]], **sections: Any) -> CorralConfig:
    """A CorralConfig whose models default to a dummy file served by the fake."""
    out = []
    for m in models:
        m = dict(m)
        if not {"path", "package", "remotes", "hf_repo"} & m.keys():
            m["path"] = str(write_dummy_gguf(tmp_path / f"{m['name'].replace(':', '_')}.gguf"))
        out.append(m)
    data: dict[str, Any] = {"models": out}
    # Saved slots go under the test's own directory, never the user's cache.
    data["scheduler"] = {"health_interval": 0.02, "drain_timeout": 5, "stop_timeout": 2,
                         "slot_cache_dir": str(tmp_path / "slots"),
                         **sections.pop("scheduler", {})}
    data.update(sections)
    return CorralConfig(**data)


@pytest.fixture
def fake_llama(tmp_path: Path) -> Path:
    return fake_binary(tmp_path / "bin")


async def wait_for(pred: Callable[[], bool], within: float = 10.0, step: float = 0.02) -> None:
    """Poll ``pred`` until true; bounded in time so a broken test fails, never hangs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within:.1f} s")
        await asyncio.sleep(step)


@pytest.fixture
def corral(aiohttp_client: Any, fake_llama: Path) -> Callable[..., Any]:
    """Start Corral's main port around fake llama-servers, in this process:
    ``client = await corral(cfg)`` gives an aiohttp test client."""
    from proxy.app import CoreOptions, build_openai_app

    async def start(cfg: CorralConfig, **kw: Any) -> Any:
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
        return await aiohttp_client(build_openai_app(cfg, opts), **kw)

    return start


@pytest.fixture
def corral_ports(aiohttp_client: Any, fake_llama: Path) -> Callable[..., Any]:
    """Start Corral's three ports around fake llama-servers, in this process.

    ``await corral_ports(cfg)`` returns ``Ports(openai, ollama, lmstudio)`` test clients;
    the core app starts first (it owns the scheduler), as in ``proxy.app.serve``.
    """
    from proxy.app import CoreOptions, build_openai_app, port_app

    async def start(cfg: CorralConfig, reap_interval: float = 0.05) -> Ports:
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=reap_interval)
        core = build_openai_app(cfg, opts)
        main = await aiohttp_client(core)
        return Ports(
            openai=main,
            ollama=await aiohttp_client(port_app(core, "ollama")),
            lmstudio=await aiohttp_client(port_app(core, "lmstudio")),
        )

    return start


@dataclass
class Ports:
    openai: Any
    ollama: Any
    lmstudio: Any


# Every socket this process makes, to tell which ones a test left open (a WeakSet: the
# record keeps none alive).
_SOCKETS: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_socket_init = socket.socket.__init__


def _recorded_init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
    _socket_init(self, *args, **kwargs)
    _SOCKETS.add(self)


socket.socket.__init__ = _recorded_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_socket_left_open() -> Iterator[None]:
    """A socket a test opened must be closed when it ends (its fixtures torn down).

    A client left open (an SDK client in a reference cycle, an httpx client never
    closed) holds its kept-alive socket until some later garbage collection, which may
    finalize the socket before the client and warn (``ResourceWarning: unclosed
    socket``), failing whichever test, or the whole session at its end, happens to run
    then. Checked here, a leak fails the test that made it, every time."""
    before = set(_SOCKETS)
    yield
    left = [s for s in _SOCKETS if s not in before and s.fileno() != -1]
    described = ", ".join(map(repr, left))
    for s in left:
        s.close()  # reported once, here, not again by the collector
    assert not left, "sockets left open: " + described
