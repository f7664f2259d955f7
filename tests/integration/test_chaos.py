"""Chaos over every dialect: children SIGKILLed at random under concurrent load.

Seeded and bounded (about 15 s of load, a fixed number of kills). The contract under
test (``proxy/calls/upstream.py``): a call whose client has received nothing is resent, so
no non-streaming call fails in any dialect and no stream fails before its first
token; a stream that had begun may end with a clean error event in its dialect. And
the scheduler never runs more than ``max_instances`` children.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from tests.conftest import make_config

SEED = 20261202
LOAD_SECONDS = 15.0
CLIENTS = 8
MAX_INSTANCES = 3

USER = [{"role": "user", "content": "alpha beta gamma"}]
TEXT = "alpha beta gamma alpha"  # four tokens of the fake's echo


@pytest.fixture
async def ports(corral_ports: Any, tmp_path: Path) -> Any:
    cfg = make_config(
        tmp_path,
        [{"name": "m", "parallel": 2, "replicas": {"min": 2, "max": 3},
          "env": {"FAKE_TOKEN_DELAY": "0.02"}}],
        scheduler={"max_instances": MAX_INSTANCES, "queue_timeout": 60},
    )
    return await corral_ports(cfg)


Outcome = tuple[str, bool, str]  # (kind, ok, detail)


def _sse_data(raw: bytes) -> list[str]:
    return [ln[5:].strip() for ln in raw.decode().split("\n") if ln.startswith("data:")]


async def openai_chat(p: Any) -> Outcome:
    r = await p.openai.post("/v1/chat/completions",
                            json={"model": "m", "max_tokens": 4, "messages": USER})
    body = await r.json()
    ok = r.status == 200 and body["choices"][0]["message"]["content"] == TEXT
    return "openai", ok, f"{r.status} {body}"


async def openai_stream(p: Any) -> Outcome:
    r = await p.openai.post("/v1/chat/completions", json={
        "model": "m", "max_tokens": 4, "stream": True, "messages": USER})
    data = _sse_data(await r.read())
    events = [json.loads(d) for d in data if d != "[DONE]"]
    if data and data[-1] == "[DONE]":
        return "openai-stream", r.status == 200, "completed"
    # It failed: acceptable only once the answer had begun reaching the client (the
    # first chunk, the role, may come alone), and only as a clean error event.
    began = len(events) >= 2 and "error" not in events[0]
    ended_clean = bool(events) and "error" in events[-1]
    return "openai-stream", began and ended_clean, f"{r.status} {data[-3:]}"


async def ollama_chat(p: Any) -> Outcome:
    r = await p.ollama.post("/api/chat", json={"model": "m", "stream": False, "messages": USER,
                                               "options": {"num_predict": 4}})
    body = await r.json()
    ok = r.status == 200 and body.get("message", {}).get("content") == TEXT and body["done"]
    return "ollama", ok, f"{r.status} {body}"


async def ollama_stream(p: Any) -> Outcome:
    r = await p.ollama.post("/api/chat", json={"model": "m", "messages": USER,
                                               "options": {"num_predict": 4}})
    lines = [json.loads(x) for x in (await r.read()).decode().splitlines() if x.strip()]
    if lines and lines[-1].get("done"):
        return "ollama-stream", r.status == 200, "completed"
    had_content = any(x.get("message", {}).get("content") for x in lines)
    return "ollama-stream", had_content and "error" in lines[-1], f"{r.status} {lines[-2:]}"


async def lmstudio_v0(p: Any) -> Outcome:
    r = await p.lmstudio.post("/api/v0/chat/completions",
                              json={"model": "m", "max_tokens": 4, "messages": USER})
    body = await r.json()
    ok = r.status == 200 and body["choices"][0]["message"]["content"] == TEXT
    return "lmstudio", ok and "stats" in body, f"{r.status} {body}"


async def anthropic(p: Any) -> Outcome:
    r = await p.lmstudio.post("/v1/messages", json={"model": "m", "max_tokens": 4,
                                                    "messages": USER})
    body = await r.json()
    ok = r.status == 200 and body["content"][0]["text"] == TEXT
    return "anthropic", ok, f"{r.status} {body}"


async def responses(p: Any) -> Outcome:
    r = await p.ollama.post("/v1/responses", json={"model": "m", "max_output_tokens": 4,
                                                   "input": "alpha beta gamma"})
    body = await r.json()
    ok = r.status == 200 and body["output"][0]["content"][0]["text"] == TEXT
    return "responses", ok, f"{r.status} {body}"


CALLS: list[Callable[[Any], Awaitable[Outcome]]] = [
    openai_chat, openai_stream, ollama_chat, ollama_stream, lmstudio_v0, anthropic, responses,
]


async def watch_alive(scheduler: Any, peak: list[int]) -> None:
    """Keep ``peak[0]`` at the most children alive at once, until cancelled."""
    while True:
        alive = sum(1 for i in scheduler.instances()
                    if i.state in (State.STARTING, State.READY, State.DRAINING,
                                   State.STOPPING))
        peak[0] = max(peak[0], alive)
        await asyncio.sleep(0.02)


async def test_random_kills_lose_no_call_that_had_not_started(ports: Any) -> None:
    rng = random.Random(SEED)
    scheduler = ports.openai.app[SCHEDULER]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOAD_SECONDS
    outcomes: list[Outcome] = []
    kills = 0

    async def client(seed: int) -> None:
        local = random.Random(seed)
        while loop.time() < deadline:
            outcomes.append(await local.choice(CALLS)(ports))

    async def killer() -> None:
        nonlocal kills
        while loop.time() < deadline - 1.0:
            await asyncio.sleep(rng.uniform(0.4, 1.2))
            ready = [i for i in scheduler.instances() if i.state is State.READY and i.pid]
            if ready:
                os.kill(rng.choice(ready).pid or 0, signal.SIGKILL)
                kills += 1

    peak: list[int] = [0]
    watcher = asyncio.create_task(watch_alive(scheduler, peak))
    async with asyncio.timeout(LOAD_SECONDS + 90):
        await asyncio.gather(killer(), *(client(SEED + k) for k in range(CLIENTS)))
    watcher.cancel()
    failures = [o for o in outcomes if not o[1]]
    by_kind = Counter(o[0] for o in outcomes)
    assert kills >= 8, kills
    assert len(outcomes) > 100, by_kind
    assert set(by_kind) == {c.__name__.replace("_", "-").replace("openai-chat", "openai")
                            .replace("ollama-chat", "ollama").replace("lmstudio-v0", "lmstudio")
                            for c in CALLS}
    assert not failures, (len(failures), failures[:5], by_kind)
    assert peak[0] <= MAX_INSTANCES
