"""[[keys]] through Corral's ports against fake llama-servers: scopes in listings and
calls, admin scope, limits answered 429 + Retry-After in each dialect, token counts,
per-key metrics, /admin/keys, and fair queues across keys."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from proxy.keys import SCHEDULER
from tests.conftest import make_config, wait_for

ALICE, BOB, ROOT = "sk-alice", "sk-bob", "sk-root"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str, content: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def keyed(tmp_path: Path, models: list[dict[str, Any]] | None = None, **alice: Any) -> Any:
    keys = [
        {"name": "alice", "key": ALICE, "models": ["small*"], **alice},
        {"name": "bob", "key_sha256": hashlib.sha256(BOB.encode()).hexdigest()},
        {"name": "root", "key": ROOT, "admin": True},
    ]
    return make_config(
        tmp_path, models or [{"name": "small", "aliases": ["small-alias"]}, {"name": "big"}],
        keys=keys,
    )


async def test_scopes_listings_calls_and_admin(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(keyed(tmp_path))
    main = ports.openai

    resp = await main.get("/v1/models")
    assert resp.status == 401
    resp = await main.get("/v1/models", headers=auth("sk-nobody"))
    assert resp.status == 401

    async def listed(client: Any, path: str, key: str, field: str = "data",
                     name: str = "id") -> set[str]:
        r = await client.get(path, headers=auth(key))
        assert r.status == 200, await r.text()
        return {m[name] for m in (await r.json())[field]}

    assert await listed(main, "/v1/models", ALICE) == {"small", "small-alias"}
    assert await listed(main, "/v1/models", BOB) == {"small", "small-alias", "big"}
    # The other ports list through the same scope.
    assert {n.split(":")[0] for n in await listed(ports.ollama, "/api/tags", ALICE, "models",
                                                  "name")} == {"small", "small-alias"}
    assert await listed(ports.lmstudio, "/v1/models", ALICE) == {"small", "small-alias"}

    # A model outside the scope is unknown to the key; the error lists its own only.
    resp = await main.post("/v1/chat/completions", json=chat("big"), headers=auth(ALICE))
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["message"].endswith("available models: small, small-alias")
    resp = await main.get("/v1/models/big", headers=auth(ALICE))
    assert resp.status == 404
    resp = await ports.ollama.post("/api/chat", json=chat("big", stream=False),
                                   headers=auth(ALICE))
    assert resp.status == 404 and "error" in await resp.json()
    resp = await main.post("/v1/messages", headers=auth(ALICE), json={
        "model": "big", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 404 and (await resp.json())["type"] == "error"

    resp = await main.post("/v1/chat/completions", json=chat("small-alias"), headers=auth(ALICE))
    assert resp.status == 200, await resp.text()
    resp = await main.post("/v1/chat/completions", json=chat("big"), headers=auth(BOB))
    assert resp.status == 200
    # Loaded models, too: alice does not see big's instance.
    resp = await ports.ollama.get("/api/ps", headers=auth(ALICE))
    assert resp.status == 200
    assert {m["name"].split(":")[0] for m in (await resp.json())["models"]} == {"small"}
    resp = await ports.ollama.get("/api/ps", headers=auth(BOB))
    assert {m["name"].split(":")[0] for m in (await resp.json())["models"]} == {"small", "big"}

    # Admin scope: /admin and /metrics only for admin keys.
    for path in ("/admin/keys", "/admin/models", "/metrics"):
        resp = await main.get(path, headers=auth(BOB))
        assert resp.status == 403, path
        assert "not an admin key" in (await resp.json())["error"]["message"]
    resp = await ports.ollama.post("/api/delete", json={"model": "small"}, headers=auth(BOB))
    assert resp.status == 403
    resp = await main.get("/admin/keys", headers=auth(ROOT))
    assert resp.status == 200
    keys = {k["name"]: k for k in (await resp.json())["keys"]}
    assert set(keys) == {"alice", "bob", "root"}
    assert keys["alice"] == {
        "name": "alice", "models": ["small*"], "admin": False, "priority": 0,
        "limits": {"max_concurrent": None, "requests_per_minute": None,
                   "tokens_per_minute": None},
        "usage": {"in_flight": 0, "requests_total": 1, "tokens_total": keys["alice"]["usage"][
            "tokens_total"], "requests_last_minute": 1,
                  "tokens_last_minute": keys["alice"]["usage"]["tokens_last_minute"],
                  "rejected_total": 0},
    }
    # The fake's answer: 6 prompt tokens (2 words + 4) and 8 generated.
    assert keys["alice"]["usage"]["tokens_total"] == 14
    text = await (await main.get("/admin/config", headers=auth(ROOT))).text()
    assert ALICE not in text and ROOT not in text

    metrics = await (await main.get("/metrics", headers=auth(ROOT))).text()
    assert 'corral_key_requests_total{key="alice"} 1.0' in metrics
    assert 'corral_key_tokens_total{key="alice"} 14.0' in metrics
    assert 'corral_key_requests_total{key="bob"} 1.0' in metrics
    assert ALICE not in metrics


async def test_limits_answer_429_with_retry_after_in_each_dialect(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(keyed(tmp_path, requests_per_minute=2))
    main = ports.openai
    for _ in range(2):
        resp = await main.post("/v1/chat/completions", json=chat("small"), headers=auth(ALICE))
        assert resp.status == 200
    resp = await main.post("/v1/chat/completions", json=chat("small"), headers=auth(ALICE))
    assert resp.status == 429
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    err = (await resp.json())["error"]
    assert err["type"] == "rate_limit_error" and "requests_per_minute" in err["message"]

    resp = await main.post("/v1/messages", headers=auth(ALICE), json={
        "model": "small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 429 and "Retry-After" in resp.headers
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"

    resp = await ports.ollama.post("/api/chat", json=chat("small", stream=False),
                                   headers=auth(ALICE))
    assert resp.status == 429 and "Retry-After" in resp.headers
    assert "requests_per_minute" in (await resp.json())["error"]

    # Another key is not affected.
    resp = await main.post("/v1/chat/completions", json=chat("small"), headers=auth(BOB))
    assert resp.status == 200
    usage = {k["name"]: k["usage"] for k in ports.openai.app[SCHEDULER].tenants.view()}
    assert usage["alice"]["rejected_total"] == 3 and usage["bob"]["rejected_total"] == 0


async def test_max_concurrent_and_tokens_per_minute(corral: Any, tmp_path: Path) -> None:
    cfg = keyed(tmp_path, [{"name": "small", "parallel": 4,
                            "env": {"FAKE_TOKEN_DELAY": "0.05"}}],
                max_concurrent=1, tokens_per_minute=20)
    client = await corral(cfg)
    slow = asyncio.ensure_future(client.post(
        "/v1/chat/completions", json=chat("small", max_tokens=10, stream=True),
        headers=auth(ALICE)))
    await asyncio.sleep(0.3)
    resp = await client.post("/v1/chat/completions", json=chat("small"), headers=auth(ALICE))
    assert resp.status == 429 and "max_concurrent" in (await resp.json())["error"]["message"]
    first = await slow
    assert first.status == 200
    await first.read()  # the stream's usage (6 + 10 tokens) is charged at its end
    tenants = client.app[SCHEDULER].tenants
    assert tenants.usage["alice"].tokens_total == 16
    resp = await client.post("/v1/chat/completions", json=chat("small", max_tokens=10),
                             headers=auth(ALICE))
    assert resp.status == 200  # 16 < 20: admitted, and it brings the total to 32
    resp = await client.post("/v1/chat/completions", json=chat("small"), headers=auth(ALICE))
    assert resp.status == 429 and "tokens_per_minute" in (await resp.json())["error"]["message"]


async def test_a_flood_from_one_key_does_not_delay_anothers_first_call(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(
        tmp_path, [{"name": "m", "parallel": 1, "env": {"FAKE_TOKEN_DELAY": "0.05"}}],
        keys=[{"name": "flood", "key": ALICE}, {"name": "calm", "key": BOB}],
    )
    client = await corral(cfg)
    resp = await client.post("/v1/chat/completions", json=chat("m", max_tokens=1),
                             headers=auth(BOB))
    assert resp.status == 200  # loaded

    done: dict[str, float] = {}
    start = time.monotonic()

    async def call(key: str, tag: str) -> None:
        r = await client.post("/v1/chat/completions", json=chat("m", max_tokens=5),
                              headers=auth(key))
        assert r.status == 200
        done[tag] = time.monotonic() - start

    flood = [asyncio.ensure_future(call(ALICE, f"flood{i}")) for i in range(12)]
    await asyncio.sleep(0.2)  # the flood is queued behind one running call
    joined = time.monotonic() - start
    await call(BOB, "calm")
    await asyncio.gather(*flood)
    ahead = [t for t, at in done.items() if joined < at < done["calm"]]
    # Behind the running call and one more of the flood, not all that wait (one more
    # may slip in while the calm call's request is read on a busy machine).
    assert len(ahead) <= 3, (ahead, len([t for t in done if done[t] > done["calm"]]))
    assert sum(1 for at in done.values() if at > done["calm"]) >= 6


async def test_queue_full_pushes_the_flood_out_not_the_newcomer(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(
        tmp_path, [{"name": "m", "parallel": 1, "env": {"FAKE_TOKEN_DELAY": "0.1"}}],
        keys=[{"name": "flood", "key": ALICE}, {"name": "calm", "key": BOB}],
        scheduler={"queue_size": 4},
    )
    client = await corral(cfg)
    assert (await client.post("/v1/chat/completions", json=chat("m", max_tokens=1),
                              headers=auth(BOB))).status == 200
    flood = [asyncio.ensure_future(client.post(
        "/v1/chat/completions", json=chat("m", max_tokens=5), headers=auth(ALICE)))
        for _ in range(5)]
    await asyncio.sleep(0.3)  # 1 running + 4 queued: the queue is full
    calm = await client.post("/v1/chat/completions", json=chat("m", max_tokens=1),
                             headers=auth(BOB))
    assert calm.status == 200
    statuses = sorted([(await f).status for f in flood])
    assert statuses == [200, 200, 200, 200, 503]


async def test_tokens_are_counted_on_the_translated_paths_too(
    corral_ports: Any, tmp_path: Path
) -> None:
    ports = await corral_ports(keyed(tmp_path))
    tenants = ports.openai.app[SCHEDULER].tenants
    for stream in (False, True):
        resp = await ports.ollama.post("/api/chat", json=chat("small", stream=stream),
                                       headers=auth(BOB))
        assert resp.status == 200
        await resp.read()
    # Ollama's port: 6 prompt + 8 generated tokens per call, from llama-server's timings.
    assert tenants.usage["bob"].tokens_total == 28
    resp = await ports.lmstudio.post("/api/v0/chat/completions",
                                     json=chat("small", stream=True), headers=auth(BOB))
    assert resp.status == 200
    await resp.read()
    assert tenants.usage["bob"].tokens_total == 42
    # LM Studio's REST v1 chat (its own SSE events): 6 + 2 tokens.
    resp = await ports.lmstudio.post("/api/v1/chat", headers=auth(BOB), json={
        "model": "small", "input": "hello there", "max_output_tokens": 2})
    assert resp.status == 200
    await resp.read()
    assert tenants.usage["bob"].tokens_total == 42 + 8
    # Anthropic Messages through the pass-through: its usage names input/output tokens.
    resp = await ports.openai.post("/v1/messages", headers=auth(BOB), json={
        "model": "small", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200
    assert tenants.usage["bob"].tokens_total > 50


async def test_lmstudio_sdk_socket_carries_the_keys_scope(
    corral_ports: Any, tmp_path: Path
) -> None:
    from tests.integration.test_lmstudio_sdk import _KeyedClient

    token = "sk-lm-Scoped12:abcdefghij0123456789"
    cfg = make_config(tmp_path, [{"name": "small"}, {"name": "big"}],
                      keys=[{"name": "sdk", "key": token, "models": ["small"]}])
    ports = await corral_ports(cfg)
    ident, passkey = token.removeprefix("sk-lm-").split(":")
    async with _KeyedClient(f"127.0.0.1:{ports.lmstudio.server.port}", ident,
                            passkey) as client:
        assert [m.model_key for m in await client.list_downloaded_models()] == ["small"]
        model = await client.llm.model("small")
        result = await model.respond({"messages": [{"role": "user", "content": "hi there"}]},
                                     config={"maxTokens": 3})
        assert result.content
    tenants = ports.openai.app[SCHEDULER].tenants
    assert tenants.usage["sdk"].requests_total >= 1 and tenants.usage["sdk"].tokens_total > 0


async def test_keys_follow_a_config_reload(corral: Any, tmp_path: Path) -> None:
    client = await corral(keyed(tmp_path))
    assert (await client.get("/v1/models", headers=auth(ALICE))).status == 200
    new = make_config(tmp_path, [{"name": "small"}, {"name": "big"}],
                      keys=[{"name": "alice", "key": "sk-alice-rotated", "models": ["big"]},
                            {"name": "carol", "key": "sk-carol"}])
    await client.app[SCHEDULER].apply_config(new)
    assert (await client.get("/v1/models", headers=auth(ALICE))).status == 401
    resp = await client.get("/v1/models", headers=auth("sk-alice-rotated"))
    assert {m["id"] for m in (await resp.json())["data"]} == {"big"}
    assert (await client.get("/v1/models", headers=auth("sk-carol"))).status == 200
    assert (await client.get("/v1/models", headers=auth(BOB))).status == 401


async def test_a_higher_priority_key_is_served_first_from_the_queue(
    corral: Any, tmp_path: Path
) -> None:
    cfg = make_config(
        tmp_path, [{"name": "m", "parallel": 1, "env": {"FAKE_TOKEN_DELAY": "0.05"}}],
        keys=[{"name": "batch", "key": ALICE}, {"name": "urgent", "key": BOB, "priority": 5}],
    )
    client = await corral(cfg)
    assert (await client.post("/v1/chat/completions", json=chat("m", max_tokens=1),
                              headers=auth(BOB))).status == 200
    order: list[str] = []

    async def call(key: str, tag: str) -> None:
        r = await client.post("/v1/chat/completions", json=chat("m", max_tokens=4),
                              headers=auth(key))
        assert r.status == 200
        order.append(tag)

    batch = [asyncio.ensure_future(call(ALICE, f"batch{i}")) for i in range(4)]
    await wait_for(lambda: len(client.app[SCHEDULER].model_status()[0]["instances"]) == 1
                   and client.app[SCHEDULER].model_status()[0]["queued"] == 3)
    await call(BOB, "urgent")
    await asyncio.gather(*batch)
    # Behind the batch call already running, ahead of the three queued ones.
    assert order.index("urgent") <= 1, order
