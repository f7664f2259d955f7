"""Captures (issue 27): what a call received, sent upstream and answered, with its
timings, readable by admin keys only; bounded in memory and on disk; redacted; never
for an excluded key. Against fake llama-servers run as real child processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from proxy.keys import CALLS
from tests.conftest import make_config, wait_for

BOSS = "sk-boss-0123456789"
ALICE = "sk-alice-abcdefghij"
QUIET = "sk-quiet-zyxwvutsr"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str, content: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def config(tmp_path: Path, **capture: Any) -> Any:
    return make_config(
        tmp_path, [{"name": "m"}, {"name": "n"}],
        server={"capture": {"memory": "1MiB", "exclude_keys": ["quiet"], **capture}},
        keys=[{"name": "boss", "key": BOSS, "admin": True}, {"name": "alice", "key": ALICE},
              {"name": "quiet", "key": QUIET}])


async def capture_of(client: Any, rid: str) -> dict[str, Any]:
    resp = await client.get(f"/admin/requests/{rid}", headers=auth(BOSS))
    assert resp.status == 200, await resp.text()
    out: dict[str, Any] = await resp.json()
    return out


async def test_a_streamed_call_is_captured_whole_with_timings(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(config(tmp_path))
    sent = chat("m", "tell me something", stream=True, max_tokens=8)
    resp = await ports.openai.post("/v1/chat/completions", json=sent,
                                   headers={**auth(ALICE), "X-Request-Id": "streamed-1",
                                            "Cookie": "session=s3cr3t-cookie"})
    assert resp.status == 200
    streamed = await resp.text()
    assert "[DONE]" in streamed

    view = await capture_of(ports.openai, "streamed-1")
    assert json.loads(view["request"]["body"]) == sent
    assert json.loads(view["upstream"]["body"])["model"] == "m"
    assert view["key"] == "alice" and view["status"] == 200 and not view["in_flight"]
    # The answer as the upstream sent it, and assembled from its chunks.
    assert view["answer"]["body"] == streamed
    text = view["answer"]["assembled"]["text"]
    assert text and all(w in streamed for w in text.split())
    timings = view["timings"]
    assert timings["first_token_seconds"] is not None
    assert timings["generation_seconds"] is not None
    assert timings["total_seconds"] >= timings["first_token_seconds"]
    assert view["tokens"]["completion"] > 0

    # No secret anywhere: not in the view, not in its curl command.
    curl = await (await ports.openai.get("/admin/requests/streamed-1/curl",
                                         headers=auth(BOSS))).text()
    for secret in (ALICE, BOSS, "s3cr3t-cookie"):
        assert secret not in json.dumps(view) and secret not in curl
    assert "$CORRAL_API_KEY" in curl and "/v1/chat/completions" in curl
    assert "tell me something" in view["curl"]

    # The request list says it was captured.
    listed = await (await ports.openai.get("/admin/requests", headers=auth(BOSS))).json()
    (row,) = [r for r in listed["requests"] if r["request_id"] == "streamed-1"]
    assert row["captured"] is True


async def test_a_translated_call_keeps_both_bodies(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(config(tmp_path))
    sent = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"num_predict": 4}}
    resp = await ports.ollama.post("/api/chat", json=sent,
                                   headers={**auth(ALICE), "X-Request-Id": "ollama-1"})
    assert resp.status == 200
    view = await capture_of(ports.openai, "ollama-1")
    assert json.loads(view["request"]["body"]) == sent  # Ollama's own body
    upstream = json.loads(view["upstream"]["body"])  # llama-server's
    assert upstream["max_tokens"] == 4 and "options" not in upstream


async def test_only_admin_keys_read_captures(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(config(tmp_path))
    await ports.openai.post("/v1/chat/completions", json=chat("m"),
                            headers={**auth(ALICE), "X-Request-Id": "private-1"})
    for path in ("/admin/requests", "/admin/requests/private-1",
                 "/admin/requests/private-1/curl"):
        assert (await ports.openai.get(path, headers=auth(ALICE))).status == 403
        assert (await ports.openai.get(path)).status == 401
    assert (await ports.openai.post("/admin/requests/private-1/replay", json={"model": "n"},
                                    headers=auth(ALICE))).status == 403


async def test_excluded_keys_are_never_captured(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(config(tmp_path))
    resp = await ports.openai.post("/v1/chat/completions", json=chat("m"),
                                   headers={**auth(QUIET), "X-Request-Id": "quiet-1"})
    assert resp.status == 200
    assert (await ports.openai.get("/admin/requests/quiet-1", headers=auth(BOSS))).status == 404
    assert not ports.openai.app[CALLS].captures.records


async def test_a_flood_of_big_calls_stays_under_the_memory_cap(
    corral_ports: Any, tmp_path: Path
) -> None:
    cap, limit = 64 << 10, 8 << 10
    ports = await corral_ports(config(tmp_path, memory=cap, body_limit=limit))
    big = "x" * 60_000  # 60 kB of prompt, one token to the fake
    store = ports.openai.app[CALLS].captures
    highest = 0
    for batch in range(4):
        calls = [ports.openai.post("/v1/chat/completions", json=chat("m", big, max_tokens=2),
                                   headers={**auth(ALICE), "X-Request-Id": f"big-{batch}-{i}"})
                 for i in range(8)]
        for resp in await asyncio.gather(*calls):
            assert resp.status == 200
            await resp.read()
        highest = max(highest, store.bytes)
    assert store.bytes <= cap and highest <= cap
    assert 1 < len(store.records) < 32  # the oldest were dropped
    assert "big-0-0" not in store.records
    newest = next(reversed(store.records))
    view = await capture_of(ports.openai, newest)
    assert view["request"]["body_cut_bytes"] > 0
    assert "more bytes not kept" in view["request"]["body"]


async def test_the_disk_tier_deletes_the_oldest_first(corral_ports: Any, tmp_path: Path) -> None:
    folder = tmp_path / "captures"
    # Memory for about two records, disk for about four.
    ports = await corral_ports(config(tmp_path, memory=12 << 10, body_limit=4 << 10,
                                      dir=str(folder), dir_max=40 << 10))
    big = "word" * 2_000
    for i in range(12):
        resp = await ports.openai.post("/v1/chat/completions",
                                       json=chat("m", big, max_tokens=2),
                                       headers={**auth(ALICE), "X-Request-Id": f"disk-{i}"})
        assert resp.status == 200
        await resp.read()
    await wait_for(lambda: (folder / "disk-11.json").exists())
    names = {p.name for p in folder.glob("*.json")}
    assert sum(p.stat().st_size for p in folder.glob("*.json")) <= 40 << 10
    assert "disk-0.json" not in names and "disk-11.json" in names
    # Gone from memory, still readable from disk.
    assert "disk-8" not in ports.openai.app[CALLS].captures.records
    kept = sorted(names)[0].removesuffix(".json")
    view = await capture_of(ports.openai, kept)
    assert view["id"] == kept and "wordword" in view["request"]["body"]


async def test_captures_are_off_by_default(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
    assert ports.openai.app[CALLS].captures is None
    resp = await ports.openai.post("/v1/chat/completions", json=chat("m"),
                                   headers={"X-Request-Id": "off-1"})
    assert resp.status == 200
    gone = await ports.openai.get("/admin/requests/off-1")
    assert gone.status == 404 and "captures are off" in await gone.text()


async def test_replay_against_another_model(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(config(tmp_path))
    resp = await ports.openai.post("/v1/chat/completions", json=chat("m", stream=True),
                                   headers={**auth(ALICE), "X-Request-Id": "again-1"})
    await resp.read()
    replayed = await ports.openai.post("/admin/requests/again-1/replay", json={"model": "n"},
                                       headers=auth(BOSS))
    assert replayed.status == 200, await replayed.text()
    out = await replayed.json()
    assert out["status"] == 200 and out["replayed"] == "again-1"
    assert out["answer"]["object"] == "chat.completion"  # not streamed: shown whole
    # The replay is a call of its own, captured under its own id, served by n.
    view = await capture_of(ports.openai, out["request_id"])
    assert view["upstream"]["model"] == "n"
    # Ollama's /api/chat replays through the main port's /admin/ollama/ mount.
    await ports.ollama.post("/api/chat", json={**chat("m"), "stream": False},
                            headers={**auth(ALICE), "X-Request-Id": "again-2"})
    out = await (await ports.openai.post("/admin/requests/again-2/replay",
                                         json={"model": "n"}, headers=auth(BOSS))).json()
    assert out["status"] == 200 and out["answer"]["model"] == "n:latest"
    unknown = await ports.openai.post("/admin/requests/again-1/replay",
                                      json={"model": "nope"}, headers=auth(BOSS))
    assert unknown.status == 404


async def test_the_upstream_body_is_captured_as_the_request_policy_shaped_it(
    corral_ports: Any, tmp_path: Path
) -> None:
    cfg = make_config(tmp_path, [{"name": "m", "request": {"clamp": {"max_tokens": {"max": 5}}}}],
                      server={"capture": {"memory": "1MiB"}})
    ports = await corral_ports(cfg)
    sent = chat("m", max_tokens=200)
    resp = await ports.openai.post("/v1/chat/completions", json=sent,
                                   headers={"X-Request-Id": "shaped-1"})
    assert resp.status == 200, await resp.text()
    view = await (await ports.openai.get("/admin/requests/shaped-1")).json()
    assert json.loads(view["request"]["body"])["max_tokens"] == 200
    assert json.loads(view["upstream"]["body"])["max_tokens"] == 5
