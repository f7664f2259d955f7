"""Wedged children: a fake llama-server SIGSTOPped (alive, silent) must not hold calls
or stay in rotation: periodic health checks and the call path's time limits retire it,
the scheduler relaunches, and calls that had received nothing are resent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from proxy.keys import SCHEDULER
from scheduler.process.instance import Instance, State
from tests.conftest import make_config, wait_for

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "a b"}]}


def ready(client: Any) -> list[Instance]:
    return [i for i in client.app[SCHEDULER].instances() if i.state is State.READY]


@pytest.fixture
def stopped() -> Any:
    """SIGSTOP a pid; whatever is still stopped is SIGKILLed at the end."""
    pids: list[int] = []

    def stop(pid: int) -> None:
        pids.append(pid)
        os.kill(pid, signal.SIGSTOP)

    yield stop
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_a_silent_idle_child_is_replaced(corral: Any, tmp_path: Path,
                                               stopped: Any) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "replicas": {"min": 1, "max": 1}}],
                      scheduler={"ready_check_interval": 0.2, "stop_timeout": 0.5})
    c = await corral(cfg)
    await wait_for(lambda: len(ready(c)) == 1)
    first = ready(c)[0]
    stopped(first.pid)
    await wait_for(lambda: first.state in (State.STOPPED, State.FAILED), within=10)
    await wait_for(lambda: len(ready(c)) == 1 and ready(c)[0].id != first.id, within=10)
    r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status == 200


async def test_a_call_held_by_a_wedged_child_is_resent(corral: Any, tmp_path: Path,
                                                       stopped: Any) -> None:
    """The call is in flight when its child stops: first_byte_timeout trips, the
    scheduler checks the child at once, retires it, and the call (whose client has
    received nothing) is answered by the relaunch. Periodic checks are slow here, so
    the fast path is what replaces it."""
    cfg = make_config(
        tmp_path,
        [{"name": "m", "first_byte_timeout": 1.5, "env": {"FAKE_TOKEN_DELAY": "0.1"}}],
        scheduler={"ready_check_interval": 60, "stop_timeout": 0.5},
    )
    c = await corral(cfg)
    assert (await c.post("/v1/chat/completions", json=CHAT)).status == 200
    first = ready(c)[0]
    call = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
    await wait_for(lambda: first.in_flight == 1)
    stopped(first.pid)
    async with asyncio.timeout(20):
        r = await call
    body = await r.json()
    assert r.status == 200, body
    assert body["choices"][0]["message"]["content"] == "a b a b"
    assert first.state in (State.STOPPING, State.STOPPED, State.FAILED)
    assert ready(c) and ready(c)[0].id != first.id


async def test_a_stalled_stream_ends_cleanly(corral: Any, tmp_path: Path,
                                             stopped: Any) -> None:
    """Tokens stop mid-stream: the client gets an error event within the stall limit,
    not a hang, and the child is replaced."""
    cfg = make_config(
        tmp_path,
        [{"name": "m", "stall_timeout": 1.0, "env": {"FAKE_TOKEN_DELAY": "0.2"}}],
        scheduler={"ready_check_interval": 60, "stop_timeout": 0.5},
    )
    c = await corral(cfg)
    # No loading feedback: its headers would come before the child is ready on a busy
    # machine, and there would be no ready instance to look at yet.
    r = await c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 40, "stream": True},
                     headers={"X-Corral-Loading": "off"})
    first = ready(c)[0]
    got = b""
    first_pid_stopped = False
    async with asyncio.timeout(20):
        async for chunk in r.content.iter_any():
            got += chunk
            if b'"content":"a"' in got and first.pid and first.state is State.READY:
                stopped(first.pid)
                first_pid_stopped = True
    assert first_pid_stopped
    assert b"upstream_failed" in got and b"[DONE]" not in got
    await wait_for(lambda: first.state in (State.STOPPED, State.FAILED), within=10)


async def test_suspect_leaves_a_healthy_child_alone(corral: Any, tmp_path: Path) -> None:
    c = await corral(make_config(tmp_path, [{"name": "m"}]))
    assert (await c.post("/v1/chat/completions", json=CHAT)).status == 200
    inst = ready(c)[0]
    await c.app[SCHEDULER].suspect(inst.id, "a test")
    assert inst.state is State.READY


async def test_a_failed_relaunch_fails_no_call_a_sibling_can_serve(
    corral: Any, tmp_path: Path
) -> None:
    """One replica is ready and busy; a second one is launched for the queue and fails.
    The queued calls wait for the ready replica instead of failing with the launch."""
    crash = tmp_path / "crash-now"
    cfg = make_config(
        tmp_path,
        [{"name": "m", "replicas": {"min": 1, "max": 2}, "parallel": 1,
          "env": {"FAKE_TOKEN_DELAY": "0.05", "FAKE_CRASH_AT_START_IF": str(crash)}}],
    )
    c = await corral(cfg)
    await wait_for(lambda: len(ready(c)) == 1)
    crash.touch()  # every launch from now on fails
    calls = [asyncio.create_task(c.post("/v1/chat/completions",
                                        json={**CHAT, "max_tokens": 10}))
             for _ in range(4)]
    async with asyncio.timeout(30):
        answers = await asyncio.gather(*calls)
    assert [r.status for r in answers] == [200] * 4
    scheduler = c.app[SCHEDULER]
    status = {m["name"]: m for m in scheduler.model_status()}
    assert status["m"]["failures"] >= 1, status  # the second replica did fail to launch


async def test_without_a_sibling_a_failed_launch_fails_the_queue(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_CRASH_AT_START": "1"}}])
    c = await corral(cfg)
    async with asyncio.timeout(10):
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status == 503 and "failed to load" in (await r.json())["error"]["message"]
