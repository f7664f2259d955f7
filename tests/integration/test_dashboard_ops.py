"""What the dashboard reads and does beyond the admin API, against fake llama-servers
run as real child processes: the per-second sample ring, the config dry run, the
model catalog and Ollama's handlers mounted for the playground."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from aiohttp.test_utils import TestClient

from proxy.app import CoreOptions, build_openai_app
from proxy.keys import SCHEDULER
from proxy.ops.samples import Memory, ModelTotals
from proxy.ops.timeseries import RING
from scheduler.config.root import ModelConfig, load_config
from tests.conftest import make_config, wait_for
from tests.fakes import write_dummy_gguf

TOML = {"Content-Type": "application/toml"}


def chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **kw}


async def series(client: TestClient, query: str = "window=60") -> dict[str, Any]:
    resp = await client.get("/admin/timeseries?" + query)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_timeseries_counts_known_traffic_per_second(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a", "parallel": 2}, {"name": "b"}]))
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200
    stream = await client.post("/v1/chat/completions", json=chat("a", stream=True))
    assert stream.status == 200
    await stream.read()
    assert (await client.post("/v1/chat/completions", json=chat("nope"))).status == 404
    for _ in range(20):
        await client.get("/admin/overview")  # the dashboard's own polls never count

    async def counted() -> dict[str, Any]:
        body = await series(client)
        return body

    await wait_for(lambda: _sum(client, "a") >= 4, within=6)
    await wait_for(lambda: _tokens(client) > 0, within=6)
    body = await counted()
    assert sum(body["requests"]["a"]) == 4
    assert sum(body["errors"]["(none)"]) == 1  # the unknown model: no model resolved
    assert sum(body["requests"].get("b", [0])) == 0
    assert len(body["t"]) == len(body["requests"]["a"]) >= 1
    assert body["t"] == sorted(body["t"]) and body["interval"] == 1
    assert sum(body["tokens"]["completion"]) > 0 and sum(body["tokens"]["prompt"]) > 0
    assert any(v is not None for v in body["ttft"]["p50"])  # the streamed call
    assert any(v is not None and v > 0 for v in body["duration"]["p95"])
    assert body["instances"]["ready"][-1] == 1
    (iid,) = body["load"]
    assert iid.startswith("a#") and body["load"][iid][-1] == 0.0
    assert body["memory"]["ram_total"][-1] > body["memory"]["ram_used"][-1] > 0
    assert body["memory"]["instances_rss"][-1] > 0
    assert body["capacity"] == 3600

    # A poller that has the window asks only for the seconds after its last one.
    since = body["t"][-1]
    newer = await series(client, f"window=60&since={since}")
    assert all(t > since for t in newer["t"])
    assert all(len(v) == len(newer["t"]) for v in newer["requests"].values())

    only_b = await series(client, "window=60&model=b")
    assert only_b["requests"] == {"b": [0] * len(only_b["t"])}
    assert only_b["load"] == {} and only_b["instances"] == {}
    assert sum(only_b["tokens"]["completion"]) == 0

    for query, status in (("window=0", 400), ("window=x", 400), ("window=99999", 400),
                          ("since=soon", 400),
                          ("model=nope", 404)):
        resp = await client.get("/admin/timeseries?" + query)
        assert resp.status == status, query
        assert "error" in await resp.json()


def _sum(client: TestClient, model: str) -> int:
    return sum(s.models[model].requests for s in client.app[RING].samples if model in s.models)


def _tokens(client: TestClient) -> float:
    return sum(m.completion for s in client.app[RING].samples for m in s.models.values())


async def test_timeseries_shows_queue_depth_and_wait(corral: Any, tmp_path: Path) -> None:
    slow = {"name": "a", "env": {"FAKE_TOKEN_DELAY": "0.1"}}
    client = await corral(make_config(tmp_path, [slow]))
    await client.post("/admin/models/a/load?wait=1")
    body = chat("a", max_tokens=12)
    calls = [asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
             for _ in range(3)]
    try:
        await wait_for(lambda: any(s.models.get("a") and s.models["a"].queued
                                   for s in client.app[RING].samples), within=6)
    finally:
        for resp in await asyncio.gather(*calls):
            assert resp.status == 200
    await wait_for(lambda: any(m.wait_count for s in client.app[RING].samples
                               for m in s.models.values()), within=4)
    body = await series(client)
    assert max(body["queue"]["depth"]) >= 1
    assert max(w for w in body["queue"]["wait"] if w is not None) > 0.5


# -- config dry run --------------------------------------------------------------------------


def config_text(tmp_path: Path, models: dict[str, dict[str, Any]], **server: Any) -> str:
    """A file as people write them: sections, then one [[models]] table per model."""
    data = {"server": {"ollama_enabled": False, "lmstudio_enabled": False, **server},
            "scheduler": {"health_interval": 0.02, "drain_timeout": 5, "stop_timeout": 2}}
    text = tomli_w.dumps(data)
    for name, keys in models.items():
        entry = {"name": name, "path": str(write_dummy_gguf(tmp_path / f"{name}.gguf")), **keys}
        text += "\n[[models]]\n" + tomli_w.dumps(entry)
    return text


@pytest.fixture
def from_file(aiohttp_client: Any, fake_llama: Path) -> Callable[..., Any]:
    async def start(path: Path) -> TestClient:
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
        client: TestClient = await aiohttp_client(
            build_openai_app(load_config(path), opts, config_path=path))
        return client

    return start


async def validate(client: TestClient, text: str) -> dict[str, Any]:
    resp = await client.post("/admin/config/validate", data=text, headers=TOML)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_validate_reports_errors_at_their_line_and_writes_nothing(
    from_file: Any, tmp_path: Path
) -> None:
    path = tmp_path / "corral.toml"
    old = config_text(tmp_path, {"a": {}}, admin_config_write=True)
    path.write_text(old)
    client = await from_file(path)

    bad = old + f'\n[[models]]\nname = "b"\npath = "{tmp_path / "a.gguf"}"\nparallel = 0\n'
    report = await validate(client, bad)
    assert not report["ok"] and report["writable"]
    (err,) = report["errors"]
    assert bad.splitlines()[err["line"] - 1] == "parallel = 0"
    assert "model 'b'" in err["message"] and "parallel" in err["message"]

    report = await validate(client, old + "\n[scheduler\n")
    assert not report["ok"]
    assert report["errors"][0]["line"] == len(old.splitlines()) + 2
    assert "invalid TOML" in report["errors"][0]["message"]

    # A new local model that reuses a served model's file runs nothing new: allowed.
    variant = old + f'\n[[models]]\nname = "c"\npath = "{tmp_path / "a.gguf"}"\nctx_size = 512\n'
    assert (await validate(client, variant))["ok"]
    # One that names another file: refused, shown at the line of its path.
    other = tmp_path / "other.gguf"
    other.write_bytes((tmp_path / "a.gguf").read_bytes())
    local = old + f'\n[[models]]\nname = "c"\npath = "{other}"\n'
    report = await validate(client, local)
    assert not report["ok"]
    (err,) = report["errors"]
    assert "refused over HTTP" in err["message"] and "model 'c': path" in err["message"]
    assert local.splitlines()[err["line"] - 1].startswith("path = ")

    # A missing file is caught like `corral check` catches it (the schema allows it).
    ttl = old.replace('name = "a"', 'name = "a"\nttl = 9')
    report = await validate(client, ttl)
    assert report["ok"], report["errors"]
    assert report["changes"]["changed"] == ["a"] and report["changes"]["added"] == []
    assert "+ttl = 9" in report["diff"] and "(running)" in report["diff"]

    # A URL is where Corral connects: a new remote is refused over HTTP.
    remote = old + '\n[[models]]\nname = "r"\nremotes = ["http://127.0.0.1:9"]\n'
    report = await validate(client, remote)
    assert not report["ok"] and report["changes"]["added"] == ["r"]
    assert [e["message"] for e in report["errors"]] == [
        f"{path}: model 'r': remotes: refused over HTTP (where Corral listens or connects): "
        "changes only in the file on disk"]
    assert report["changes"]["unchanged"] == ["a"]

    assert path.read_text() == old  # a dry run: nothing written, nothing applied
    assert not (tmp_path / "corral.toml.bak").exists()
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["a"]

    resp = await client.post("/admin/config/validate", data="  ", headers=TOML)
    assert resp.status == 400


async def test_validate_refuses_a_chat_template_name_in_args(
    from_file: Any, tmp_path: Path
) -> None:
    """`--chat-template gemma` would make every prompt the word "gemma": the dry run
    says so at the model's table, with the fix, as `corral check` does."""
    path = tmp_path / "corral.toml"
    old = config_text(tmp_path, {"a": {}}, admin_config_write=True)
    path.write_text(old)
    client = await from_file(path)
    bad = old.replace('name = "a"', 'name = "a"\nargs = ["--chat-template", "gemma"]')
    report = await validate(client, bad)
    assert not report["ok"]
    (err,) = report["errors"]
    assert "model 'a'" in err["message"] and "'--chat-template', 'gemma'" in err["message"]
    assert "--chat-template-file" in err["message"]
    assert bad.splitlines()[err["line"] - 1] == "[[models]]"
    # The fix is the operator's to write in the file: chat_template names a file Corral
    # reads, so it is not on the HTTP write allow-list.
    fixed = old.replace('name = "a"', 'name = "a"\nchat_template = "gemma3"')
    report = await validate(client, fixed)
    assert not report["ok"]
    assert any("chat_template" in e["message"] for e in report["errors"]), report
    assert not any("--chat-template" in e["message"] for e in report["errors"]), report


async def test_redacted_keys_survive_an_edit_and_never_leak(
    from_file: Any, tmp_path: Path
) -> None:
    path = tmp_path / "corral.toml"
    old = config_text(tmp_path, {"a": {}}, admin_config_write=True, api_keys=["sekret-key"])
    path.write_text(old)
    client = await from_file(path)
    auth = {"Authorization": "Bearer sekret-key"}
    shown = await (await client.get("/admin/config/file", headers=auth)).text()
    assert "sekret-key" not in shown and "<redacted>" in shown

    edited = shown.replace('name = "a"', 'name = "a"\nttl = 11')
    resp = await client.post("/admin/config/validate", data=edited, headers={**TOML, **auth})
    report = await resp.json()
    assert report["ok"], report
    assert report["restart_required"] == []  # the key came back: nothing changed there
    assert "sekret-key" not in json.dumps(report)

    resp = await client.put("/admin/config", data=edited, headers={**TOML, **auth})
    assert resp.status == 200, await resp.text()
    assert 'api_keys = [\n    "sekret-key",\n]' in path.read_text() or \
        '"sekret-key"' in path.read_text()
    assert "ttl = 11" in path.read_text()

    leak = edited.replace('name = "a"', 'name = "<redacted>"').replace(
        '"<redacted>",\n]', "]")
    resp = await client.post("/admin/config/validate", data=leak, headers={**TOML, **auth})
    assert resp.status == 400
    assert "sekret-key" not in await resp.text()


# -- catalog and the playground's Ollama calls ---------------------------------------------------


async def test_catalog_lists_source_size_and_capabilities(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(
        tmp_path, [{"name": "a", "ctx_size": 2048}, {"name": "r", "remotes": ["http://127.0.0.1:9"]}]))
    body = await (await client.get("/admin/catalog")).json()
    a, r = body["models"]
    assert a["name"] == "a" and a["source"]["kind"] == "path" and a["source"]["configured"]
    assert a["size_bytes"] > 0 and a["ctx_size"] == 2048
    assert "completion" in a["capabilities"] and a["state"] == "not-loaded"
    assert r["source"] == {"kind": "remote", "where": "http://127.0.0.1:9", "configured": True,
                           "origin": "config"}

    # A model offered by a dynamic source (a scan, a pull) is listed as discovered.
    found = tmp_path / "found.gguf"
    write_dummy_gguf(found)
    await client.app[SCHEDULER].set_dynamic_models(
        "scan", [ModelConfig(name="found", path=found, origin="scan:dir")])
    body = await (await client.get("/admin/catalog")).json()
    (f,) = [m for m in body["models"] if m["name"] == "found"]
    assert f["source"] == {"kind": "path", "where": str(found), "configured": False,
                           "origin": "scan:dir"}
    assert f["size_bytes"] > 0


async def test_ollama_chat_for_the_playground_streams_ndjson(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    resp = await client.post("/admin/ollama/api/chat", json=chat("a", stream=True))
    assert resp.status == 200
    lines = [json.loads(x) for x in (await resp.text()).splitlines() if x.strip()]
    assert lines[-1]["done"] is True
    assert "".join(x["message"]["content"] for x in lines if "message" in x)
    # The pull form reads Ollama's NDJSON progress from the same handler.
    resp = await client.post("/admin/ollama/api/pull", json={"model": "a", "stream": True})
    assert resp.status == 200
    steps = [json.loads(x) for x in (await resp.text()).splitlines() if x.strip()]
    assert steps[0]["status"] and steps[-1] == {"status": "success"}
    resp = await client.post("/admin/ollama/api/chat", json=chat("nope"))
    assert resp.status == 404
    assert isinstance((await resp.json())["error"], str)  # Ollama's envelope


async def test_pin_edits_the_models_evictable_key_through_the_config_write(
    from_file: Any, tmp_path: Path
) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(config_text(tmp_path, {"a": {}}))
    client = await from_file(path)
    resp = await client.post("/admin/models/a/pin")
    assert resp.status == 403
    assert "admin_config_write" in (await resp.json())["error"]["message"]

    old = config_text(tmp_path, {"a": {}, "b": {}}, admin_config_write=True)
    path.write_text(old)
    client = await from_file(path)
    assert (await client.post("/admin/models/nope/pin")).status == 404
    resp = await client.post("/admin/models/b/pin")
    if "evictable" in ModelConfig.model_fields:  # the scheduling work's key is merged
        assert resp.status == 200, await resp.text()
        assert "evictable = false" in path.read_text()
        assert (tmp_path / "corral.toml.bak").read_text() == old
        catalog = (await (await client.get("/admin/catalog")).json())["models"]
        assert [m["pinned"] for m in catalog] == [False, True]
        resp = await client.post("/admin/models/b/unpin")
        assert resp.status == 200 and "evictable = true" in path.read_text()
    else:  # refused by validation, at the key's name; the file stays as it was
        assert resp.status == 400
        message = (await resp.json())["error"]["message"]
        assert "model 'b': evictable: unknown key" in message
        assert path.read_text() == old


async def test_a_long_window_is_laid_out_whole(corral: Any, tmp_path: Path) -> None:
    client = await corral(make_config(tmp_path, [{"name": "a"}]))
    ring = client.app[RING]
    ring.samples.clear()
    start = int(time.time()) - 1000
    for t in range(start, start + 400):  # older than anything the sampler adds
        ring.add(t, {"a": ModelTotals(requests=t - start)}, {}, [], Memory(ram_total=1))
    body = await series(client, "window=3600")  # over the on-loop limit: in a thread
    assert body["t"][:400] == list(range(start, start + 400))
    assert body["requests"]["a"][1:400] == [1] * 399
