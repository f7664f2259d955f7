"""Routing by prefixes against fake llama-servers (issue 24): under load, a slot that
frees goes to the queued call whose history that replica holds, not to the head of
the queue."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.keys import SCHEDULER
from scheduler.process.instance import State
from scheduler.scheduling.scheduler import Scheduler
from tests.conftest import make_config, wait_for


def sched(client: TestClient) -> Scheduler:
    return client.app[SCHEDULER]


def body(messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
    return {"model": "m", "messages": messages, "max_tokens": tokens}


async def ask(client: TestClient, messages: list[dict[str, str]], tokens: int = 1) -> None:
    resp = await client.post("/v1/chat/completions", json=body(messages, tokens))
    assert resp.status == 200, await resp.text()


async def served(client: TestClient, iid: str) -> list[list[dict[str, Any]]]:
    inst = next(i for i in sched(client).instances() if i.id == iid)
    async with client.session.get(inst.base_url + "/fake/requests") as resp:
        reqs = await resp.json()
    return [r["body"]["messages"] for r in reqs if r["path"] == "/v1/chat/completions"]


async def test_under_load_a_freed_slot_goes_where_the_calls_history_is(
    corral: Any, tmp_path: Any
) -> None:
    # Slow tokens: a call of 100 tokens holds its replica for seconds, so the
    # follow-ups below queue behind the blockers.
    cfg = make_config(tmp_path, [{"name": "m", "replicas": {"min": 2, "max": 2},
                                  "env": {"FAKE_TOKEN_DELAY": "0.03"}}])
    client = await corral(cfg)
    s = sched(client)
    await wait_for(lambda: sum(i.state is State.READY for i in s.instances()) == 2)

    def busy() -> int:
        return sum(i.in_flight for i in s.instances())

    def follow(m: list[dict[str, str]]) -> list[dict[str, str]]:
        return [*m, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and then?"}]

    # Two system-less chats, one on each replica.
    x = [{"role": "user", "content": "rivers " * 400}]
    y = [{"role": "user", "content": "mountains " * 400}]
    first = asyncio.create_task(ask(client, x, 20))
    await wait_for(lambda: busy() == 1)
    await ask(client, y)
    await first
    home: dict[str, str] = {}  # first six letters of a chat -> the replica it ran on
    for i in s.instances():
        for messages in await served(client, i.id):
            home[messages[0]["content"][:6]] = i.id
    assert home["rivers"] != home["mounta"]

    # Both replicas busy; y's follow-up queues first, then x's. The blockers hold their
    # replicas (2,000 tokens: a minute at this pace) until both follow-ups are queued,
    # then hang up: blockers that ended by themselves freed a slot before x's follow-up
    # was queued once on a loaded machine, and y's took it, as it should.
    blockers = [asyncio.create_task(ask(client, [{"role": "user", "content": f"block {n}"}],
                                        2000)) for n in range(2)]
    await wait_for(lambda: busy() == 2)
    queue = s._names["m"].queue
    late = [asyncio.create_task(ask(client, follow(y)))]
    await wait_for(lambda: len(queue) == 1)
    late.append(asyncio.create_task(ask(client, follow(x))))
    await wait_for(lambda: len(queue) == 2)
    for b in blockers:
        b.cancel()
    await asyncio.gather(*blockers, return_exceptions=True)
    await asyncio.gather(*late)

    # Whichever replica freed first, each follow-up ran where its first turn did.
    for i in s.instances():
        for messages in await served(client, i.id):
            if len(messages) == 3:
                assert home[messages[0]["content"][:6]] == i.id
