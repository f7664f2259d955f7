"""A child's port is chosen free and bound by the child later; on a busy machine another
process can take it in between. The launch chooses again instead of failing its calls
(the same race once failed a fresh clone's CI in the test harness)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.keys import SCHEDULER
from scheduler.process import launcher
from tests.conftest import make_config

CHAT = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port some other process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


async def test_a_port_taken_before_the_child_binds_it_is_chosen_again(
    corral_ports: Any, tmp_path: Path, taken: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = taken.getsockname()[1]
    real = launcher.free_port
    handed: list[int] = []

    def racy(host: str = launcher.LOOPBACK) -> int:
        # The first port handed out is the taken one, as if it went between the calls.
        handed.append(held if not handed else real(host))
        return handed[-1]

    monkeypatch.setattr(launcher, "free_port", racy)
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    resp = await ports.openai.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200, await resp.text()
    (inst,) = ports.openai.app[SCHEDULER].instances()
    assert handed[0] == held and inst.spec is not None and inst.spec.port == handed[-1] != held
    assert inst.base_url.endswith(f":{inst.spec.port}")


async def test_a_child_that_fails_otherwise_is_not_relaunched(
    corral_ports: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m",
                                                       "env": {"FAKE_CRASH_AT_START": "1"}}]))
    resp = await ports.openai.post("/v1/chat/completions", json=CHAT)
    assert resp.status >= 500
    assert "exited with status 1" in await resp.text()
    assert not [r for r in caplog.records if "was taken before" in r.getMessage()]
