"""Replicas of the real Gemma 3 270M behind Corral: spread, and a replica killed under
load losing no call that had not reached it."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import CorralProc, model_toml, wait_until

pytestmark = pytest.mark.e2e


def chat(c: CorralProc, i: int, max_tokens: int = 16) -> httpx.Response:
    body = {"model": "gemma", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"Count to {i}."}]}
    return httpx.post(c.url + "/v1/chat/completions", json=body, timeout=120)


def instances(c: CorralProc) -> list[dict]:
    return httpx.get(c.url + "/admin/instances", timeout=10).json()["instances"]


def test_two_replicas_share_concurrent_calls(corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, replicas={"min": 2, "max": 2}))
    wait_until(lambda: sum(i["state"] == "ready" for i in instances(c)) == 2, timeout=30)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        resps = list(pool.map(lambda i: chat(c, i), range(6)))
    assert [r.status_code for r in resps] == [200] * 6
    wait_until(lambda: sum(i["served"] for i in instances(c)) == 6, timeout=5)
    served = [i["served"] for i in instances(c)]
    assert len(served) == 2 and min(served) >= 1, served


def test_replica_killed_under_load_loses_no_queued_call(corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, replicas={"min": 2, "max": 2}))
    wait_until(lambda: sum(i["state"] == "ready" for i in instances(c)) == 2, timeout=30)
    n = 10
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(chat, c, i, 32) for i in range(n)]
        wait_until(lambda: all(i["in_flight"] == 1 for i in instances(c)), timeout=20)
        victim = instances(c)[0]
        in_flight_on_victim = victim["in_flight"]
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        resps = [f.result(timeout=180) for f in futs]
    failed = [r for r in resps if r.status_code != 200]
    # Only the call running on the killed replica may fail, and it fails clearly.
    assert len(failed) <= in_flight_on_victim
    for r in failed:
        assert r.status_code == 502
        assert r.json()["error"]["src"] == "corral"
    assert time.monotonic() - t0 < 120
    # The replica was replaced.
    wait_until(lambda: sum(i["state"] == "ready" for i in instances(c)) == 2, timeout=30)
    assert victim["id"] not in {i["id"] for i in instances(c)}
