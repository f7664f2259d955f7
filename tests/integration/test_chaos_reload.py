"""Chaos with wedged children and config reloads: under concurrent load over every
dialect, children are SIGKILLed or SIGSTOPped at random, the config file is replaced
by a broken one and reloaded (refused: the running config stays), then by a good one
that changes the model (its instances drain and relaunch) and reloaded again.

Seeded and bounded (about 12 s of load). The contract is test_chaos's: no
non-streaming call fails, no stream fails before its first token, a begun stream ends
with a clean error event, and ``max_instances`` is never exceeded. SIGSTOPped
children are found by the stall and first-byte timeouts and the ready checks, and
retired; their calls are resent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import tomli_w

from proxy.app import CoreOptions, build_openai_app, port_app
from proxy.keys import SCHEDULER
from proxy.ops.reload import RELOADER
from scheduler.config.root import load_config
from scheduler.process.instance import State
from tests.conftest import Ports
from tests.fakes import write_dummy_gguf
from tests.integration.test_chaos import CALLS, Outcome, watch_alive

SEED = int(os.environ.get("CORRAL_CHAOS_SEED", "20261203"))
LOAD_SECONDS = 12.0
CLIENTS = 6
MAX_INSTANCES = 3


def config_text(model_file: Path, delay: str) -> str:
    return tomli_w.dumps({
        "server": {"api_keys": []},
        "scheduler": {"max_instances": MAX_INSTANCES, "queue_timeout": 60,
                      "health_interval": 0.02, "drain_timeout": 5, "stop_timeout": 1,
                      "ready_check_interval": 0.5},
        "models": [{"name": "m", "path": str(model_file), "parallel": 2,
                    "replicas": {"min": 2, "max": 3}, "first_byte_timeout": 2.0,
                    "stall_timeout": 1.5, "env": {"FAKE_TOKEN_DELAY": delay}}],
    })


async def test_kills_stops_and_reloads_lose_no_call(
    aiohttp_client: Any, fake_llama: Path, tmp_path: Path
) -> None:
    model_file = write_dummy_gguf(tmp_path / "m.gguf")
    path = tmp_path / "corral.toml"
    path.write_text(config_text(model_file, "0.02"))
    core = build_openai_app(
        load_config(path),
        CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05), config_path=path)
    main = await aiohttp_client(core)
    ports = Ports(openai=main, ollama=await aiohttp_client(port_app(core, "ollama")),
                  lmstudio=await aiohttp_client(port_app(core, "lmstudio")))
    scheduler, reloader = core[SCHEDULER], core[RELOADER]
    rng = random.Random(SEED)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOAD_SECONDS
    outcomes: list[Outcome] = []
    actions: Counter[str] = Counter()

    async def client(seed: int) -> None:
        local = random.Random(seed)
        while loop.time() < deadline:
            outcomes.append(await local.choice(CALLS)(ports))

    async def chaos() -> None:
        delays = iter(["0.021", "0.02"] * 10)
        while loop.time() < deadline - 2.0:
            await asyncio.sleep(rng.uniform(0.5, 1.2))
            action = rng.choice(["kill", "stop", "reload"])
            ready = [i for i in scheduler.instances() if i.state is State.READY and i.pid]
            if action in ("kill", "stop") and ready:
                os.kill(rng.choice(ready).pid or 0, signal.SIGKILL if action == "kill"
                        else signal.SIGSTOP)
                actions[action] += 1
            elif action == "reload":
                path.write_text("[[models]\nname = broken")
                bad = await reloader.reload("chaos")
                assert not bad.ok and bad.error
                delay = next(delays)
                path.write_text(config_text(model_file, delay))
                good = await reloader.reload("chaos")
                # The file watcher may have applied the new file first: then this
                # reload finds it unchanged. Either way the change is in force.
                assert good.ok and "m" in good.changes["changed"] + good.changes["unchanged"]
                assert scheduler.resolve("m").env["FAKE_TOKEN_DELAY"] == delay
                actions["reload"] += 1

    peak: list[int] = [0]
    watcher = asyncio.create_task(watch_alive(scheduler, peak))
    try:
        async with asyncio.timeout(LOAD_SECONDS + 90):
            await asyncio.gather(chaos(), *(client(SEED + k) for k in range(CLIENTS)))
    finally:
        watcher.cancel()
        # Whatever is still stopped must be able to die with the test.
        for inst in scheduler.instances():
            if inst.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(inst.pid, signal.SIGCONT)
    failures = [o for o in outcomes if not o[1]]
    by_kind = Counter(o[0] for o in outcomes)
    assert all(actions[a] >= 1 for a in ("kill", "stop", "reload")), actions
    assert len(outcomes) > 60, by_kind
    assert not failures, (len(failures), failures[:5], by_kind, actions)
    assert peak[0] <= MAX_INSTANCES, peak
