"""A cluster through the real llama-server and Gemma 3 270M: two node Corrals behind a
front, driven with the `openai` package (docs/cluster.md)."""

from __future__ import annotations

import concurrent.futures
import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, Tidy, model_toml, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "e2e-cluster-token-0123456789"
HELLO = [{"role": "user", "content": "Say hello."}]


def node_state(c: CorralProc) -> dict:
    r = httpx.get(c.url + "/corral/node", headers={"Authorization": f"Bearer {TOKEN}"},
                  timeout=10)
    r.raise_for_status()
    return r.json()


def served(c: CorralProc) -> int:
    return sum(i["served"] for m in node_state(c)["models"] for i in m["instances"])


def test_two_real_nodes_behind_a_front(corral, gemma: Path, tidy: Tidy) -> None:
    node_toml = (model_toml("gemma", gemma, aliases=["g"], replicas={"min": 1, "max": 1})
                 + f'\n[cluster]\nrole = "node"\ntoken = "{TOKEN}"\ndrain_settle = 1\n')
    nodes = [corral(node_toml) for _ in range(2)]
    for n in nodes:
        wait_until(lambda n=n: node_state(n)["models"][0]["ready_slots"] == 1, timeout=60)
    urls = ", ".join(f'"{n.url}"' for n in nodes)
    front = corral(f'[cluster]\nrole = "front"\ntoken = "{TOKEN}"\nnodes = [{urls}]\n'
                   "poll_interval = 0.5\n")
    oc = tidy(openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0,
                            timeout=120))
    assert {m.id for m in oc.models.list().data} == {"gemma", "g"}

    resp = oc.chat.completions.create(model="g", messages=HELLO, max_tokens=8)
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    stream = oc.chat.completions.create(model="gemma", messages=HELLO, max_tokens=8,
                                        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    # Two calls at once, one slot per node: one each (long enough, ignore_eos, that
    # the first cannot end before the second has reached the front).
    before = [served(n) for n in nodes]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(
            lambda k: oc.chat.completions.create(
                model="gemma", messages=[{"role": "user", "content": f"Count to {k + 3}."}],
                max_tokens=96, extra_body={"ignore_eos": True}),
            range(2)))
    assert all(a.choices[0].message.content for a in answers)
    assert [served(n) - b for n, b in zip(nodes, before, strict=True)] == [1, 1]

    # A node drained with SIGTERM finishes its call; the next calls go to the other.
    # Calls that cannot end early (ignore_eos): a short answer to "Story 0." ended
    # before both nodes were seen busy at once (two fresh-clone runs on a loaded machine).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(oc.chat.completions.create, model="gemma",
                               messages=[{"role": "user", "content": f"Story {k}."}],
                               max_tokens=160, extra_body={"ignore_eos": True})
                   for k in range(2)]
        wait_until(lambda: all(node_state(n)["in_flight"] for n in nodes), timeout=30)
        nodes[0].proc.send_signal(signal.SIGTERM)
        for f in running:
            assert f.result().choices[0].message.content
    for _ in range(2):
        assert oc.chat.completions.create(model="gemma", messages=HELLO,
                                          max_tokens=4).choices[0].message.content
    assert nodes[0].proc.wait(timeout=60) == 0
    assert "drained in" in nodes[0].log()
