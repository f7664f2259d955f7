"""The real xinference-client drives Corral through a whole model lifecycle, against the
real llama-server and Gemma 3 270M found in a scan root: list, launch by name with a
context size, follow progress, chat, add and remove a replica, reach the abort route,
terminate."""

from __future__ import annotations

import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from xinference_client import RESTfulClient

from tests.e2e.conftest import wait_until


def test_the_xinference_client_runs_a_model_s_whole_lifecycle(
    corral: Any, gemma: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "gemma-xinf.gguf").symlink_to(gemma)
    c = corral(f'[[scan]]\npath = "{root}"\nthreads = 1\n',
               scheduler="scan_interval = 0.5\nmax_instances = 3")
    wait_until(lambda: "gemma-xinf" in httpx.get(c.url + "/v1/models").text)
    xc = RESTfulClient(c.url)
    request.addfinalizer(xc.close)  # its requests session, and the sockets it keeps

    listed = xc.list_models()
    assert listed["gemma-xinf"]["model_type"] == "LLM"
    assert "chat" in listed["gemma-xinf"]["model_ability"]

    uid = xc.launch_model(model_name="gemma-xinf", model_engine="llama.cpp",
                          model_uid="gemma-1k", n_ctx=1024, wait_ready=False)
    assert uid == "gemma-1k"
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        seen.append(xc.get_launch_model_progress(uid))
        if seen[-1]["state"] in ("ready", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert seen[-1]["state"] == "ready" and seen[-1]["progress"] == 1.0, seen[-1]
    models = httpx.get(c.url + "/admin/models").json()["models"]
    mine = next(m for m in models if m["name"] == "gemma-1k")
    assert mine["origin"] == "runtime" and mine["instances"][0]["ctx_size"] == 1024

    with closing(xc.get_model(uid)) as model:
        answer = model.chat(messages=[{"role": "user", "content": "Say hi."}],
                            generate_config={"max_tokens": 8})
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] >= 1

    # A replica added and removed under load: no call fails.
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=c.url, timeout=120) as h:
            while not stop.is_set() and len(statuses) < 200:
                r = h.post("/v1/chat/completions", json={
                    "model": uid, "max_tokens": 3,
                    "messages": [{"role": "user", "content": "Hi"}]})
                statuses.append(r.status_code)

    callers = [threading.Thread(target=load) for _ in range(2)]
    for t in callers:
        t.start()
    try:
        added = xc.add_model_replica(uid)
        assert added["replica"] == 2 and added["model_uid"] == uid
        wait_until(lambda: [i["state"] for m in httpx.get(c.url + "/admin/models").json()[
            "models"] if m["name"] == uid for i in m["instances"]] == ["ready", "ready"],
            timeout=60)
        before = len(statuses)
        wait_until(lambda: len(statuses) >= before + 4, timeout=60)
        assert xc.terminate_model_replica(uid, added["replica_id"]) == 1
        before = len(statuses)
        wait_until(lambda: len(statuses) >= before + 4, timeout=60)
    finally:
        stop.set()
        for t in callers:
            t.join(120)
    assert statuses and set(statuses) == {200}
    with closing(xc.get_model(uid)) as model:
        again = model.chat(messages=[{"role": "user", "content": "Hi"}],
                           generate_config={"max_tokens": 4})
    assert again["choices"][0]["message"]["content"] is not None

    assert xc.abort_request(uid, "no-such-request") == {"aborted": False}

    assert xc.get_workers_info()[0]["models"]
    xc.terminate_model(uid)
    assert uid not in xc.list_models()
    wait_until(lambda: c.children() == [], timeout=30)
