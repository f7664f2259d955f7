"""Slot save/restore against fake llama-servers: saved before an idle stop, restored
into a fresh instance before the call is sent, bounded on disk, dropped with a config
change, and failures that cost only the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.edge import jsonc
from proxy.keys import SCHEDULER
from scheduler.process.slotcache import file_of
from scheduler.scheduling.scheduler import Scheduler
from tests.conftest import make_config, wait_for
from tests.fakes import write_dummy_gguf

SYSTEM = {"role": "system", "content": "you are a careful assistant " * 20}


def turn(first: str, *more: str) -> dict[str, Any]:
    messages = [SYSTEM, {"role": "user", "content": first}]
    for text in more:
        messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": text}]
    return {"model": "m", "messages": messages, "max_tokens": 2}


def prefix(body: dict[str, Any]) -> str:
    """The name a slot holding this call is saved under, without ``.bin``. Hashed as
    the client sent it: aiohttp's json= is json.dumps."""
    return file_of(jsonc.head(json.dumps(body).encode()).chain()).removesuffix(".bin")


def sched(client: TestClient) -> Scheduler:
    return client.app[SCHEDULER]


async def stop_all(client: TestClient) -> None:
    await sched(client).unload("m")
    await wait_for(lambda: not sched(client).instances())


async def ask(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    out: dict[str, Any] = await resp.json()
    return out


def saved(tmp_path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in (tmp_path / "slots").glob("*/*.bin")}


async def fake_requests(client: TestClient) -> list[dict[str, Any]]:
    [inst] = sched(client).instances()
    async with client.session.get(inst.base_url + "/fake/requests") as resp:
        out: list[dict[str, Any]] = await resp.json()
        return out


async def test_saved_at_idle_stop_restored_before_the_follow_up(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "ttl": 0.3}])
    client = await corral(cfg)
    first = turn("tell me about rivers")
    await ask(client, first)
    # The TTL expires; the slot is saved before the process stops.
    await wait_for(lambda: not sched(client).instances())
    assert list(saved(tmp_path)) == [f"{prefix(first)}.bin"]
    assert sched(client).slots.saved == 1

    follow = turn("tell me about rivers", "and lakes?")
    answer = await ask(client, follow)
    # Everything the first call's prompt held came back from the saved slot.
    first_prompt = (await ask_prompt_tokens(first))
    assert answer["timings"]["cache_n"] == first_prompt
    calls = [(r["method"], r["path"]) for r in await fake_requests(client)]
    assert calls[:2] == [("POST", "/slots/0?action=restore"), ("POST", "/v1/chat/completions")]
    assert sched(client).slots.restored == 1
    # The restore counts in what having the model back costs (eviction's load cost).
    status = sched(client).model_status()[0]
    assert status["restore_seconds_median"] is not None
    cost = sched(client)._snapshot().instances[0].load_cost
    assert abs(cost - status["load_seconds_median"] - status["restore_seconds_median"]) < 2e-3

    metrics = await (await client.get("/metrics")).text()
    assert 'corral_slot_cache_total{action="saved"} 1.0' in metrics
    assert 'corral_slot_cache_total{action="restored"} 1.0' in metrics
    # The same conversation on the same instance: no second restore.
    await ask(client, turn("tell me about rivers", "and lakes?", "and seas?"))
    assert [r["path"] for r in await fake_requests(client)].count(
        "/slots/0?action=restore") == 1


async def ask_prompt_tokens(body: dict[str, Any]) -> int:
    # The fake counts a word per token plus 4 per message.
    return sum(len(str(m["content"]).split()) + 4 for m in body["messages"])


async def test_without_the_cache_nothing_is_saved_or_restored(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m"}], scheduler={"slot_cache_size": 0})
    client = await corral(cfg)
    await ask(client, turn("hello"))
    assert "--slot-save-path" not in sched(client).instances()[0].spec.argv  # type: ignore[union-attr]
    await stop_all(client)
    answer = await ask(client, turn("hello", "again"))
    assert answer["timings"]["cache_n"] == 0
    assert saved(tmp_path) == {}


async def test_disk_bound_drops_the_least_recently_used(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    await ask(client, turn("first conversation"))
    await stop_all(client)
    [one] = saved(tmp_path).values()
    # Room for one file (and a bit): the next save pushes the older one out.
    cfg = make_config(tmp_path, [{"name": "m"}], scheduler={"slot_cache_size": one + 10})
    sched(client).slots.configure(cfg)
    second = turn("second conversation")
    await ask(client, second)
    await stop_all(client)
    assert list(saved(tmp_path)) == [f"{prefix(second)}.bin"]


async def test_failed_save_or_restore_costs_only_the_cache(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "env": {"FAKE_SLOT_SAVE_FAIL": "1"}}])
    client = await corral(cfg)
    await ask(client, turn("hello"))
    await stop_all(client)
    assert saved(tmp_path) == {} and sched(client).slots.failed == 1
    await ask(client, turn("hello", "again"))
    await stop_all(client)

    # A file that exists but cannot be restored: the call goes on without it.
    cfg2 = make_config(tmp_path, [{"name": "m", "env": {"FAKE_SLOT_RESTORE_FAIL": "1"}}])
    client2 = await corral(cfg2)
    await ask(client2, turn("hello"))
    await stop_all(client2)
    assert saved(tmp_path)  # saved fine: only restores fail
    answer = await ask(client2, turn("hello", "again"))
    assert answer["timings"]["cache_n"] == 0
    assert sched(client2).slots.failed == 1 and sched(client2).slots.restored == 0


async def test_config_change_drops_the_models_saved_slots(corral: Any, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, [{"name": "m"}])
    client = await corral(cfg)
    await ask(client, turn("hello"))
    await stop_all(client)
    [old_dir] = [d.name for d in (tmp_path / "slots").iterdir()]
    await sched(client).apply_config(make_config(tmp_path, [{"name": "m", "ctx_size": 2048}]))
    answer = await ask(client, turn("hello", "again"))
    assert answer["timings"]["cache_n"] == 0  # a different context: nothing restored
    dirs = [d.name for d in (tmp_path / "slots").iterdir()]
    assert len(dirs) == 1 and dirs != [old_dir]
    assert dirs[0].split("~")[0] == old_dir.split("~")[0]  # the same model's
    # A removed model's slots go at once.
    await stop_all(client)
    await sched(client).apply_config(make_config(tmp_path, [{"name": "other"}]))
    await wait_for(lambda: not any((tmp_path / "slots").iterdir()))


async def test_ollama_chats_are_saved_and_restored_too(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    client = ports.openai
    messages = turn("tell me about rivers")["messages"]
    resp = await ports.ollama.post("/api/chat", json={"model": "m", "messages": messages,
                                                      "stream": False})
    assert resp.status == 200
    await stop_all(client)
    assert len(saved(tmp_path)) == 1
    follow = turn("tell me about rivers", "and lakes?")["messages"]
    resp = await ports.ollama.post("/api/chat", json={"model": "m", "messages": follow,
                                                      "stream": False})
    body = await resp.json()
    # Ollama's prompt_eval_count counts cached and processed tokens alike; the restore
    # shows in the fake's requests and the counter.
    assert body["done"] is True
    assert sched(client).slots.restored == 1
    calls = [r["path"] for r in await fake_requests(client)]
    assert calls[:2] == ["/slots/0?action=restore", "/v1/chat/completions"]


async def test_a_reload_that_restarts_an_unchanged_model_saves_its_slots(
    corral: Any, tmp_path: Path
) -> None:
    # One model file for both configs (make_config would write a new one, and a new
    # file is another model).
    model = {"name": "m", "path": str(write_dummy_gguf(tmp_path / "one.gguf"))}
    client = await corral(make_config(tmp_path, [model]))
    first = turn("hello")
    await ask(client, first)
    # Only [llama_server] changes (its env): every local model restarts, unchanged.
    report = await sched(client).apply_config(
        make_config(tmp_path, [model], llama_server={"env": {"X": "1"}}))
    assert report["changed"] == ["m"]
    await wait_for(lambda: list(saved(tmp_path)) == [f"{prefix(first)}.bin"])
    answer = await ask(client, turn("hello", "again"))
    assert answer["timings"]["cache_n"] > 0  # the same digest: restored
    assert sched(client).slots.restored == 1


async def test_with_two_slots_each_conversation_is_saved_under_its_own_name(
    corral: Any, tmp_path: Path
) -> None:
    client = await corral(make_config(tmp_path, [{"name": "m", "parallel": 2}]))
    rivers, stars = turn("tell me about rivers"), turn("tell me about stars")
    await ask(client, rivers)
    await ask(client, stars)
    await stop_all(client)
    files = {f.name: json.loads(f.read_bytes())["tokens"]
             for f in (tmp_path / "slots").glob("*/*.bin")}
    assert set(files) == {f"{prefix(rivers)}.bin", f"{prefix(stars)}.bin"}
    assert "rivers" in files[f"{prefix(rivers)}.bin"]
    assert "stars" in files[f"{prefix(stars)}.bin"]


async def test_an_agent_displaced_by_another_sharing_its_system_prompt_comes_back(
    corral: Any, tmp_path: Path
) -> None:
    """One slot, two agents with one system prompt: the second keeps the first's
    system prompt in the slot and would cut off the rest of its transcript (llama-server
    saves a slot to its RAM cache only when it keeps less than half), so the slot is
    saved first and restored when the first agent comes back."""
    client = await corral(make_config(tmp_path, [{"name": "m"}]))
    system = {"role": "system", "content": "the rules of the workshop " * 80}

    def agent(task: str, *more: str) -> dict[str, Any]:
        messages = [system, {"role": "user", "content": task}]
        for text in more:
            messages += [{"role": "assistant", "content": "done"},
                         {"role": "user", "content": text}]
        return {"model": "m", "messages": messages, "max_tokens": 2}

    a = agent("sort every box in the north hall by colour " * 8)
    await ask(client, a)
    b = await ask(client, agent("count the boxes"))
    assert b["timings"]["cache_n"] > 0  # the system prompt, kept in the slot
    assert sched(client).slots.saved == 1
    back = await ask(client, agent("sort every box in the north hall by colour " * 8,
                                   "and the south hall?"))
    assert back["timings"]["cache_n"] >= await ask_prompt_tokens(a)
    assert sched(client).slots.restored == 1


async def test_three_chats_on_two_slots_each_find_their_conversation(
    corral: Any, tmp_path: Path
) -> None:
    """Three system-less chats take turns on two slots: each call displaces another
    chat's whole conversation, which is saved first and restored into whichever slot
    that chat's next call gets, across a stop too (the workload benchmark's chats)."""
    client = await corral(make_config(tmp_path, [{"name": "m", "parallel": 2}]))
    docs = [f"document {k} says " + f"fact{k} " * 150 for k in range(3)]
    history: list[list[dict[str, Any]]] = [[{"role": "user", "content": d}] for d in docs]
    for n in range(4):
        if n == 2:
            await stop_all(client)  # a swap: the slots are saved, the instance stops
        for k, messages in enumerate(history):
            body = {"model": "m", "messages": messages, "max_tokens": 2}
            answer = await ask(client, body)
            if n:
                # All but the last user message (and the template's few tokens).
                before = await ask_prompt_tokens({"messages": messages[:-2]})
                assert answer["timings"]["cache_n"] >= before, (n, k)
            messages += [{"role": "assistant", "content": "ok"},
                         {"role": "user", "content": f"question {n} about {k}"}]
