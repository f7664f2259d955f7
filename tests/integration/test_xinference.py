"""Xinference's REST subset driven by the real xinference-client, against fake
llama-servers: list, launch from a scan root with a context size, progress, chat,
replicas, abort, terminate; what cannot map answers 400 naming it."""

from __future__ import annotations

import asyncio
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from xinference_client import RESTfulClient

from proxy.app import CoreOptions, build_openai_app
from proxy.keys import SCHEDULER
from scheduler.config.root import load_config
from tests.conftest import wait_for
from tests.fakes import write_dummy_gguf
from tests.fakes.hf_hub import FakeHub
from tests.integration import test_pull

# The fake Hub's fixtures (tests/integration/test_pull.py).
REPO = test_pull.REPO
ggufs = test_pull.ggufs
hub = test_pull.hub

ADMIN, USER = "sk-admin-0123456789", "sk-user-0123456789"


@pytest.fixture
def served(aiohttp_client: Any, fake_llama: Path, tmp_path: Path) -> Any:
    root = tmp_path / "scan"
    root.mkdir()
    write_dummy_gguf(root / "tiny-model.gguf")

    async def start(**sections: Any) -> Any:
        path = tmp_path / "corral.toml"
        path.write_text(tomli_w.dumps({
            "scheduler": {"slot_cache_dir": str(tmp_path / "slots"), "scan": [str(root)],
                          "scan_interval": 0.2, "health_interval": 0.02,
                          "max_instances": 4},
            **sections, "models": []}))
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
        client = await aiohttp_client(build_openai_app(load_config(path), opts,
                                                       config_path=path))
        await wait_for(lambda: "tiny-model" in client.app[SCHEDULER].names())
        return client

    return start


def url(client: Any) -> str:
    return f"http://127.0.0.1:{client.port}"


def lifecycle(base: str) -> dict[str, Any]:
    """The whole lifecycle through the client (blocking: run in a thread)."""
    with closing(RESTfulClient(base)) as xc:
        out: dict[str, Any] = {"listed": xc.list_models()}
        uid = xc.launch_model(model_name="tiny-model", model_engine="llama.cpp",
                              model_uid="tiny-2k", n_ctx=2048, wait_ready=False)
        out["uid"] = uid
        progress = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            progress.append(xc.get_launch_model_progress(uid))
            if progress[-1]["progress"] == 1.0:
                break
            time.sleep(0.05)
        out["progress"] = progress
        model = xc.get_model(uid)
        with closing(model):
            out["chat"] = model.chat(messages=[{"role": "user", "content": "hi"}])
        out["added"] = xc.add_model_replica(uid)
        out["remaining"] = xc.terminate_model_replica(uid, out["added"]["replica_id"])
        out["abort"] = xc.abort_request(uid, "some-request-id")
        out["workers"] = xc.get_workers_info()
        xc.terminate_model(uid)
        out["after"] = xc.list_models()
    return out


async def test_the_xinference_client_drives_a_whole_lifecycle(served: Any) -> None:
    client = await served()
    sched = client.app[SCHEDULER]
    out = await asyncio.to_thread(lifecycle, url(client))
    listed = out["listed"]["tiny-model"]
    assert listed["model_type"] == "LLM" and "chat" in listed["model_ability"]
    assert listed["object"] == "model"  # OpenAI's shape, with Xinference's fields
    assert out["uid"] == "tiny-2k"
    assert out["progress"][-1]["progress"] == 1.0 and out["progress"][-1]["state"] == "ready"
    assert all(0.0 <= p["progress"] <= 1.0 for p in out["progress"])
    assert out["chat"]["choices"][0]["message"]["content"]
    assert out["added"]["model_uid"] == "tiny-2k" and out["added"]["replica"] == 2
    assert out["remaining"] == 1
    # Xinference's abort of a call that is not in flight is a no-op.
    assert out["abort"] == {"aborted": False}
    assert out["workers"][0]["node_type"] == "Worker"
    assert "tiny-2k" not in out["after"] and "tiny-model" in out["after"]
    await wait_for(lambda: sched.instances() == [])


async def test_an_openai_client_gets_openai_s_shape(served: Any) -> None:
    client = await served()
    data = (await (await client.get("/v1/models", headers={
        "User-Agent": "OpenAI/Python 1.50.0"})).json())["data"]
    assert data and all(set(m) == {"id", "object", "created", "owned_by", "capabilities",
                                   "origin"} for m in data)


@pytest.mark.parametrize(("fields", "named"), [
    ({"model_engine": "vllm"}, "model_engine 'vllm' is not an engine Corral runs"),
    ({"enable_virtual_env": True}, "'enable_virtual_env' cannot map onto Corral: virtual"),
    ({"envs": {"LD_PRELOAD": "/tmp/x.so"}}, "'envs' cannot map onto Corral"),
    ({"model_type": "image"}, "model_type 'image' cannot map"),
    ({"args": ["--verbose"]}, "'args' is a protected key"),
    ({"gpu_idx": [0]}, "'gpu_idx' cannot map"),
])
async def test_what_cannot_map_is_a_400_naming_it(
    served: Any, fields: dict[str, Any], named: str
) -> None:
    client = await served()
    resp = await client.post("/v1/models", json={"model_name": "tiny-model", **fields})
    assert resp.status == 400
    assert named in (await resp.json())["detail"]
    assert client.app[SCHEDULER].instances() == []


async def test_keys_and_scopes_hold_and_errors_are_xinference_s(served: Any) -> None:
    client = await served(keys=[{"name": "admin", "key": ADMIN, "admin": True},
                                {"name": "user", "key": USER}])
    assert (await (await client.get("/v1/cluster/auth")).json()) == {"auth": True}

    def calls() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with closing(RESTfulClient(url(client), api_key=USER)) as user:
            out["listed"] = user.list_models()
            try:
                user.launch_model(model_name="tiny-model")
            except RuntimeError as e:
                out["refused"] = str(e)
        with closing(RESTfulClient(url(client), api_key=ADMIN)) as admin:
            out["uid"] = admin.launch_model(model_name="tiny-model")
            try:
                admin.get_launch_model_progress("nope")
            except RuntimeError as e:
                out["unknown"] = str(e)
        return out

    out = await asyncio.to_thread(calls)
    assert "tiny-model" in out["listed"]
    assert "not an admin key" in out["refused"]
    assert out["uid"] == "tiny-model"  # no parameters: the model itself
    assert "model 'nope' not found" in out["unknown"]
    anonymous = await client.post("/v1/models", json={"model_name": "tiny-model"})
    assert anonymous.status == 401


async def test_cancel_of_a_launch_through_xinference(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every child of this test never turns healthy (the fake reads its environment).
    monkeypatch.setenv("FAKE_HANG", "1")
    client = await served()
    sched = client.app[SCHEDULER]
    resp = await client.post("/v1/models?wait_ready=false", json={
        "model_name": "tiny-model", "model_uid": "hangs", "n_ctx": 1024})
    assert resp.status == 200 and (await resp.json())["model_uid"] == "hangs"
    await wait_for(lambda: any(i.pid for i in sched.loaded("hangs")))
    progress = await (await client.get("/v1/models/hangs/progress")).json()
    assert progress["state"] == "loading" and 0.0 <= progress["progress"] < 1.0
    resp = await client.post("/v1/models/hangs/cancel")
    assert resp.status == 200 and (await resp.json())["cancelled_launches"]
    progress = await (await client.get("/v1/models/hangs/progress")).json()
    assert progress["state"] == "cancelled"
    await wait_for(lambda: sched.instances() == [])
    # The uid stays (a runtime model) until terminated; then it is gone.
    assert (await client.delete("/v1/models/hangs")).status == 200
    gone = await client.get("/v1/models/hangs/progress")
    assert gone.status == 404 and "not found" in (await gone.json())["detail"]


async def test_a_relaunch_as_it_was_keeps_the_instance_and_other_parameters_replace_it(
    served: Any
) -> None:
    client = await served()
    sched = client.app[SCHEDULER]
    body = {"model_name": "tiny-model", "model_uid": "t", "n_ctx": 2048}
    assert (await client.post("/v1/models", json=body)).status == 200
    first = [i.id for i in sched.loaded("t")]
    assert len(first) == 1
    assert (await client.post("/v1/models", json=body)).status == 200
    assert [i.id for i in sched.loaded("t")] == first
    assert (await client.post("/v1/models", json={**body, "n_ctx": 1024})).status == 200
    assert sched.resolve("t").ctx_size == 1024
    await wait_for(lambda: [i.ctx for i in sched.loaded("t")] == [1024])


async def test_a_launch_of_an_hf_name_downloads_then_loads(hub: FakeHub, served: Any) -> None:
    client = await served()
    hub.chunk_delay = 0.01
    resp = await client.post("/v1/models?wait_ready=false", json={
        "model_name": f"hf.co/{REPO}:q8_0", "model_uid": "tiny-hf", "n_ctx": 1024})
    assert resp.status == 200 and (await resp.json())["model_uid"] == "tiny-hf"
    states: list[str] = []
    for _ in range(1000):
        # Followed by its uid from the first byte of the download on.
        p = await (await client.get("/v1/models/tiny-hf/progress")).json()
        states.append(p["state"])
        if p["state"] == "downloading":
            assert 0.0 <= p["progress"] <= 0.5
        if p["state"] in ("ready", "failed", "cancelled"):
            break
        await asyncio.sleep(0.02)
    assert "downloading" in states and states[-1] == "ready", states[-5:]
    cfg = client.app[SCHEDULER].resolve("tiny-hf")
    assert (cfg.origin, cfg.hf_repo, cfg.ctx_size) == ("runtime", REPO, 1024)
    assert [i.ctx for i in client.app[SCHEDULER].loaded("tiny-hf")] == [1024]


async def test_abort_ends_a_call_in_flight_by_its_request_id(served: Any) -> None:
    client = await served(llama_server={"env": {"FAKE_TOKEN_DELAY": "0.05"}})
    sched = client.app[SCHEDULER]
    body = {"model": "tiny-model", "stream": True, "max_tokens": 2000,  # 100 s at its pace
            "messages": [{"role": "user", "content": "go on"}]}

    async def read() -> str:
        resp = await client.post("/v1/chat/completions", json=body,
                                 headers={"X-Request-Id": "xi-abort-1"})
        return await resp.text()

    reader = asyncio.create_task(read())
    for _ in range(500):
        listed = await (await client.get("/admin/requests")).json()
        if any(e["request_id"] == "xi-abort-1" and e["answering"]
               for e in listed["in_flight"]):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the call never started answering")

    def abort() -> Any:
        # The client asks the server about auth as it is made: off this loop, which
        # serves that call.
        with closing(RESTfulClient(url(client))) as xc:
            return xc.abort_request("tiny-model", "xi-abort-1")

    assert await asyncio.wait_for(asyncio.to_thread(abort), 20) == {"aborted": True}
    streamed = await asyncio.wait_for(reader, 10)
    assert "cancelled" in streamed and "[DONE]" not in streamed
    await wait_for(lambda: sum(i.in_flight for i in sched.instances()) == 0)


async def test_abort_finds_a_call_by_the_request_id_in_its_generate_config(
    served: Any
) -> None:
    client = await served(llama_server={"env": {"FAKE_TOKEN_DELAY": "0.05"}})
    sched = client.app[SCHEDULER]

    def chat() -> Any:
        # As Xinference's own clients name a call: a field of the body, not a header.
        with closing(RESTfulClient(url(client))) as xc, \
                closing(xc.get_model("tiny-model")) as model:
            try:
                return model.chat(messages=[{"role": "user", "content": "go on"}],
                                  generate_config={"request_id": "xi-body-1",
                                                   "max_tokens": 2000})
            except RuntimeError as e:
                # Not raised on: the error's traceback holds the client's unread
                # answer, and with it a socket, until some garbage collection.
                return str(e)

    def abort() -> Any:
        with closing(RESTfulClient(url(client))) as xc:
            return xc.abort_request("tiny-model", "xi-body-1")

    caller = asyncio.create_task(asyncio.to_thread(chat))
    for _ in range(500):
        if sum(i.in_flight for i in sched.instances()) == 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the call never reached its instance")
    assert await asyncio.wait_for(asyncio.to_thread(abort), 20) == {"aborted": True}
    assert "499" in await asyncio.wait_for(caller, 20)
    await wait_for(lambda: sum(i.in_flight for i in sched.instances()) == 0)
    listed = await (await client.get("/admin/requests")).json()
    assert listed["in_flight"] == []
