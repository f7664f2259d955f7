"""Runtime models: created over the admin API from a file in a scan root, with
parameters that are not protected keys; kept beside the config across a restart."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from proxy.app import CoreOptions, build_openai_app
from proxy.keys import SCHEDULER
from scheduler.config.root import load_config
from tests.conftest import make_config, wait_for
from tests.fakes import write_dummy_gguf
from tests.fakes.hf_hub import FakeHub
from tests.integration import test_pull

# The fake Hub's fixtures (tests/integration/test_pull.py).
REPO = test_pull.REPO
ggufs = test_pull.ggufs
hub = test_pull.hub


@pytest.fixture
def served(aiohttp_client: Any, fake_llama: Path, tmp_path: Path) -> Any:
    """Corral with a config file and a scan root holding one GGUF ("tiny-model")."""
    root = tmp_path / "scan"
    root.mkdir()
    write_dummy_gguf(root / "tiny-model.gguf")
    path = tmp_path / "corral.toml"
    path.write_text(tomli_w.dumps({
        "scheduler": {"slot_cache_dir": str(tmp_path / "slots"), "scan": [str(root)],
                      "scan_interval": 0.2, "health_interval": 0.02},
        "models": [{"name": "a", "path": str(write_dummy_gguf(tmp_path / "a.gguf"))}]}))

    async def start() -> Any:
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
        client = await aiohttp_client(build_openai_app(load_config(path), opts,
                                                       config_path=path))
        await wait_for(lambda: "tiny-model" in client.app[SCHEDULER].names())
        return client

    return start


async def test_a_runtime_model_from_the_scan_root_serves_and_survives_a_restart(
    served: Any, tmp_path: Path
) -> None:
    client = await served()
    resp = await client.post("/admin/runtime-models", json={
        "name": "tiny-2k", "from": "tiny-model", "ctx_size": 2048, "parallel": 2,
        "replicas": {"min": 0, "max": 1}, "ttl": 60, "load": True})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    assert body["persisted"] is True and body["operation"]["model"] == "tiny-2k"
    sched = client.app[SCHEDULER]
    cfg = sched.resolve("tiny-2k")
    assert (cfg.ctx_size, cfg.parallel, cfg.ttl, cfg.origin) == (2048, 2, 60, "runtime")
    assert cfg.path == (tmp_path / "scan" / "tiny-model.gguf")
    chat = {"model": "tiny-2k", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    assert [i.ctx for i in sched.loaded("tiny-2k")] == [2048]
    saved = tomllib.loads((tmp_path / "corral.runtime.toml").read_text())
    assert saved["models"] == [{"name": "tiny-2k", "from": "tiny-model",
                                "path": str(tmp_path / "scan" / "tiny-model.gguf"),
                                "ctx_size": 2048, "parallel": 2,
                                "replicas": {"min": 0, "max": 1}, "ttl": 60}]
    await client.close()

    again = await served()
    assert again.app[SCHEDULER].resolve("tiny-2k").ctx_size == 2048
    listed = await (await again.get("/v1/models")).json()
    assert "tiny-2k" in {m["id"] for m in listed["data"]}
    assert (await again.delete("/admin/runtime-models/tiny-2k")).status == 200
    assert "tiny-2k" not in again.app[SCHEDULER].names()
    assert tomllib.loads((tmp_path / "corral.runtime.toml").read_text()) == {"models": []}


@pytest.mark.parametrize(("extra", "named"), [
    ({"args": ["--verbose"]}, "'args' is a protected key (what Corral runs)"),
    ({"env": {"LD_PRELOAD": "/tmp/x.so"}}, "'env' is a protected key"),
    ({"path": "/etc/passwd"}, "'path' is a protected key (what Corral reads or writes"),
    ({"runtime": "vllm"}, "'runtime' is a protected key"),
    ({"chat_template": "/etc/passwd"}, "'chat_template' is a protected key"),
    ({"binary": "/bin/sh"}, "'binary' cannot be set on a runtime model"),
    ({"threads": 4}, "'threads' cannot be set on a runtime model"),
])
async def test_protected_keys_are_refused_and_nothing_is_created(
    served: Any, tmp_path: Path, extra: dict[str, Any], named: str
) -> None:
    client = await served()
    resp = await client.post("/admin/runtime-models",
                             json={"name": "evil", "from": "tiny-model", **extra})
    assert resp.status == 400
    assert named in (await resp.json())["error"]["message"]
    assert "evil" not in client.app[SCHEDULER].names()
    assert not (tmp_path / "corral.runtime.toml").exists()


async def test_only_scanned_or_cached_files_make_runtime_models(served: Any) -> None:
    client = await served()
    resp = await client.post("/admin/runtime-models", json={"name": "b", "from": "a"})
    assert resp.status == 400
    assert "scan roots or its cache" in (await resp.json())["error"]["message"]
    resp = await client.post("/admin/runtime-models", json={"name": "a", "from": "tiny-model"})
    assert resp.status == 400 and "exists already" in (await resp.json())["error"]["message"]
    resp = await client.post("/admin/runtime-models", json={"name": "c", "from": "nope"})
    assert resp.status == 404


async def test_a_saved_entry_outside_the_roots_is_skipped_at_start(
    served: Any, tmp_path: Path
) -> None:
    (tmp_path / "corral.runtime.toml").write_text(tomli_w.dumps({"models": [
        {"name": "outside", "from": "x", "path": str(tmp_path / "a.gguf")},
        {"name": "flagged", "from": "tiny-model",
         "path": str(tmp_path / "scan" / "tiny-model.gguf"), "args": ["--verbose"]},
        {"name": "fine", "from": "tiny-model",
         "path": str(tmp_path / "scan" / "tiny-model.gguf"), "ctx_size": 1024}]}))
    client = await served()
    names = client.app[SCHEDULER].names()
    assert "fine" in names and "outside" not in names and "flagged" not in names
    listed = await (await client.get("/admin/runtime-models")).json()
    withheld = {m["name"]: m["reason"] for m in listed["withheld"]}
    assert "outside the scan roots" in withheld["outside"]
    assert "'args'" in withheld["flagged"]
    # Withheld, not lost: a later write keeps them in the file, and a delete removes one.
    assert (await client.delete("/admin/runtime-models/fine")).status == 200
    kept = tomllib.loads((tmp_path / "corral.runtime.toml").read_text())["models"]
    assert [m["name"] for m in kept] == ["outside", "flagged"]
    assert (await client.delete("/admin/runtime-models/flagged")).status == 200
    kept = tomllib.loads((tmp_path / "corral.runtime.toml").read_text())["models"]
    assert [m["name"] for m in kept] == ["outside"]


async def test_a_reload_that_drops_the_scan_root_withholds_its_runtime_models_until_back(
    served: Any, tmp_path: Path
) -> None:
    client = await served()
    resp = await client.post("/admin/runtime-models", json={
        "name": "tiny-2k", "from": "tiny-model", "ctx_size": 2048})
    assert resp.status == 201, await resp.text()
    sched = client.app[SCHEDULER]
    config = tmp_path / "corral.toml"
    with_root = config.read_text()
    without = tomllib.loads(with_root)
    del without["scheduler"]["scan"]
    config.write_text(tomli_w.dumps(without))
    assert (await client.post("/admin/config/reload")).status == 200
    # The scan's models go with their root, and the runtime model made from one too.
    await wait_for(lambda: "tiny-2k" not in sched.names(), within=10)
    chat = {"model": "tiny-2k", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 404
    listed = await (await client.get("/admin/runtime-models")).json()
    assert listed["models"] == []
    assert [m["name"] for m in listed["withheld"]] == ["tiny-2k"]
    assert "outside the scan roots" in listed["withheld"][0]["reason"]
    saved = tomllib.loads((tmp_path / "corral.runtime.toml").read_text())["models"]
    assert [m["name"] for m in saved] == ["tiny-2k"]
    # A name that is withheld is not taken again by a create.
    again = await client.post("/admin/runtime-models", json={"name": "tiny-2k", "from": "a"})
    assert again.status == 400 and "withheld" in (await again.text())

    config.write_text(with_root)
    assert (await client.post("/admin/config/reload")).status == 200
    await wait_for(lambda: "tiny-2k" in sched.names(), within=10)
    assert sched.resolve("tiny-2k").ctx_size == 2048
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    listed = await (await client.get("/admin/runtime-models")).json()
    assert [m["name"] for m in listed["models"]] == ["tiny-2k"] and listed["withheld"] == []


async def follow(client: Any, op_id: str, until: set[str], within: float = 20.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        op = await (await client.get(f"/admin/operations/{op_id}")).json()
        if op["state"] in until:
            return op
        assert loop.time() < deadline, op
        await asyncio.sleep(0.02)


async def test_a_runtime_model_from_hf_downloads_with_bytes_and_a_cancel_stops_it(
    hub: FakeHub, corral: Any, tmp_path: Path
) -> None:
    client = await corral(make_config(tmp_path, []))
    name = f"hf.co/{REPO}:q8_0"
    hub.chunk_delay = 0.05  # 3 MiB in 64 KiB chunks: seconds of download
    resp = await client.post("/admin/runtime-models",
                             json={"name": "tiny-q8", "from": name, "ctx_size": 1024})
    assert resp.status == 202
    op = (await resp.json())["operation"]
    assert op["kind"] == "create"
    seen = await follow(client, op["id"], {"downloading"})
    assert 0 <= seen["bytes"]["completed"] < seen["bytes"]["total"]
    cancelled = await (await client.post(f"/admin/operations/{op['id']}/cancel")).json()
    assert cancelled["state"] == "cancelled"
    assert "tiny-q8" not in client.app[SCHEDULER].names()
    # Again, quickly: downloaded (resumed), created, loaded.
    hub.chunk_delay = 0.0
    resp = await client.post("/admin/runtime-models",
                             json={"name": "tiny-q8", "from": name, "ctx_size": 1024,
                                   "load": True})
    op = (await resp.json())["operation"]
    done = await follow(client, op["id"], {"ready", "failed", "cancelled"})
    assert done["state"] == "ready", done
    cfg = client.app[SCHEDULER].resolve("tiny-q8")
    assert (cfg.origin, cfg.hf_repo, cfg.ctx_size) == ("runtime", REPO, 1024)
    assert [i.ctx for i in client.app[SCHEDULER].loaded("tiny-q8")] == [1024]


async def test_a_runtime_models_request_policy_shapes_its_calls(served: Any) -> None:
    client = await served()
    resp = await client.post("/admin/runtime-models", json={
        "name": "tiny-capped", "from": "tiny-model", "unlisted": True,
        "request": {"clamp": {"max_tokens": {"max": 3}}}})
    assert resp.status == 201, await resp.text()
    chat = {"model": "tiny-capped", "max_tokens": 200,
            "messages": [{"role": "user", "content": "hi"}]}
    answer = await (await client.post("/v1/chat/completions", json=chat)).json()
    assert answer["usage"]["completion_tokens"] <= 3
    (inst,) = client.app[SCHEDULER].loaded("tiny-capped")
    async with client.session.get(inst.base_url + "/fake/requests") as r:
        sent = [q["body"] for q in await r.json() if q["path"] == "/v1/chat/completions"]
    assert sent[-1]["max_tokens"] == 3
    listed = await (await client.get("/v1/models")).json()
    assert "tiny-capped" not in {m["id"] for m in listed["data"]}


async def test_a_configured_hf_models_load_downloads_in_its_operation_and_a_cancel_stops_it(
    hub: FakeHub, corral: Any, tmp_path: Path
) -> None:
    # Before: the file came down inside the launch, in a thread no cancel could stop,
    # and the operation said "loading" with no bytes.
    client = await corral(make_config(tmp_path, [
        {"name": "tiny", "hf_repo": REPO, "hf_file": "Tiny-Q8_0.gguf", "ctx_size": 1024}]))
    hub.chunk_delay = 0.05  # 3 MiB in 64 KiB chunks: seconds of download
    resp = await client.post("/admin/models/tiny/load")
    assert resp.status == 202
    op = (await resp.json())["operation"]
    seen = await follow(client, op["id"], {"downloading"})
    assert 0 <= seen["bytes"]["completed"] < seen["bytes"]["total"]
    cancelled = await (await client.post(f"/admin/operations/{op['id']}/cancel")).json()
    assert cancelled["state"] == "cancelled"
    served = await (await client.get(f"/admin/operations/{op['id']}")).json()
    assert served["state"] == "cancelled"
    # Stopped: no byte more comes down once the cancel has answered.
    sent = hub.bytes_sent
    await asyncio.sleep(0.3)
    assert hub.bytes_sent - sent <= 64 << 10  # at most the chunk in flight
    assert client.app[SCHEDULER].loaded("tiny") == []
    # Again, quickly: resumed, then launched from the file the pull stored.
    hub.chunk_delay = 0.0
    op = (await (await client.post("/admin/models/tiny/load")).json())["operation"]
    done = await follow(client, op["id"], {"ready", "failed", "cancelled"})
    assert done["state"] == "ready", done
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
