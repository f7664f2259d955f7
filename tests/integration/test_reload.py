"""Config reload on a file change, on SIGHUP and through the admin API, against fake
llama-servers run as real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from aiohttp.test_utils import TestClient

from proxy.app import CoreOptions, build_openai_app
from proxy.keys import SCHEDULER
from proxy.metrics.registry import METRICS
from proxy.ops.reload import RELOADER
from scheduler.config.root import load_config
from scheduler.process.instance import State
from tests.conftest import wait_for
from tests.fakes import free_port, stop, wait_healthy, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]


def config_text(tmp_path: Path, models: dict[str, dict[str, Any]], **server: Any) -> str:
    entries = []
    for name, keys in models.items():
        path = write_dummy_gguf(tmp_path / f"{name}.gguf")
        entries.append({"name": name, "path": str(path), **keys})
    data: dict[str, Any] = {
        "server": {"ollama_enabled": False, "lmstudio_enabled": False, **server},
        "scheduler": {"health_interval": 0.02, "drain_timeout": 5, "stop_timeout": 2},
        "models": entries,
    }
    return tomli_w.dumps(data)


@pytest.fixture
def corral(aiohttp_client: Any, fake_llama: Path) -> Callable[..., Any]:
    async def start(path: Path) -> TestClient:
        opts = CoreOptions(find_binary=lambda _: fake_llama, reap_interval=0.05)
        app = build_openai_app(load_config(path), opts, config_path=path)
        client: TestClient = await aiohttp_client(app)
        return client

    return start


TOML = {"Content-Type": "application/toml"}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def instance_ids(client: TestClient, model: str) -> list[str]:
    return [
        i.id
        for i in client.app[SCHEDULER].instances()
        if i.model == model and i.state is State.READY
    ]


async def test_a_file_change_restarts_only_the_changed_models(corral: Any, tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(config_text(tmp_path, {"a": {}, "b": {}, "d": {}}))
    client = await corral(path)
    for m in ("a", "b", "d"):
        assert (await client.post("/v1/chat/completions", json=chat(m))).status == 200
    before = {m: instance_ids(client, m) for m in ("a", "b")}

    path.write_text(config_text(tmp_path, {"a": {}, "b": {"ctx_size": 2048}, "c": {}}))
    reloader = client.app[RELOADER]
    await wait_for(lambda: reloader.last is not None, within=5)
    assert reloader.last is not None and reloader.last.ok, reloader.last
    assert reloader.last.source == "file"
    assert reloader.last.changes == {
        "added": ["c"],
        "removed": ["d"],
        "changed": ["b"],
        "unchanged": ["a"],
    }
    assert instance_ids(client, "a") == before["a"]  # untouched, still serving
    await wait_for(
        lambda: not any(i.model in ("b", "d") for i in client.app[SCHEDULER].instances())
    )
    models = [m["id"] for m in (await (await client.get("/v1/models")).json())["data"]]
    assert models == ["a", "b", "c"]
    assert (await client.post("/v1/chat/completions", json=chat("d"))).status == 404
    assert (await client.post("/v1/chat/completions", json=chat("b"))).status == 200
    assert instance_ids(client, "b") != before["b"]
    assert (await client.post("/v1/chat/completions", json=chat("c"))).status == 200

    body = await (await client.get("/admin/config")).json()
    assert body["last_reload"]["changes"]["removed"] == ["d"]
    assert body["config"]["models"][1]["ctx_size"] == 2048
    assert client.app[METRICS].reloads.labels("ok")._value.get() == 1


async def test_a_broken_file_written_during_a_load_keeps_the_running_config(
    corral: Any, tmp_path: Path
) -> None:
    path = tmp_path / "corral.toml"
    good = config_text(tmp_path, {"a": {"env": {"FAKE_LOAD_DELAY": "1.5"}}})
    path.write_text(good)
    client = await corral(path)
    call = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("a")))
    await wait_for(lambda: bool(client.app[SCHEDULER].instances()))
    path.write_text(good.replace('name = "a"', 'name = "a'))  # unterminated string
    reloader = client.app[RELOADER]
    await wait_for(lambda: reloader.last_error is not None, within=5)
    resp = await call
    assert resp.status == 200  # the load went on and served the call
    assert reloader.current.models[0].name == "a"

    body = await (await client.get("/admin/config")).json()
    assert str(path) in body["last_reload_error"]
    assert "invalid TOML" in body["last_reload_error"]
    assert body["reload_success"] is False
    assert body["config"]["models"][0]["name"] == "a"
    metrics = await (await client.get("/metrics")).text()
    assert "corral_config_reload_success 0.0" in metrics
    assert 'corral_config_reloads_total{result="error"} 1.0' in metrics
    assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200

    path.write_text(config_text(tmp_path, {"a": {"parallel": 0}}))
    await wait_for(
        lambda: reloader.last is not None and "parallel" in (reloader.last_error or ""), within=5
    )

    path.write_text(good)
    await wait_for(lambda: reloader.last_error is None, within=5)
    assert "corral_config_reload_success 1.0" in await (await client.get("/metrics")).text()


async def test_put_validates_backs_up_and_reloads(corral: Any, tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    old = config_text(tmp_path, {"a": {}}, admin_config_write=True)
    path.write_text(old)
    path.chmod(0o600)
    client = await corral(path)
    assert await (await client.get("/admin/config/file")).text() == old

    bad = old.replace("parallel", "paralel") + '[[models]]\nname = "b"\nparallel = 0\n'
    resp = await client.put("/admin/config", data=bad, headers=TOML)
    assert resp.status == 400
    message = (await resp.json())["error"]["message"]
    assert "nothing written" in message and str(path) in message and ".tmp" not in message
    assert path.read_text() == old
    assert not (tmp_path / "corral.toml.bak").exists()

    # A new local model names a file: only the file on disk may do that
    # (docs/security.md); a ttl may change over HTTP.
    new = config_text(tmp_path, {"a": {"ttl": 7}}, admin_config_write=True)
    resp = await client.put("/admin/config", data=new, headers=TOML)
    assert resp.status == 200, await resp.text()
    outcome = await resp.json()
    assert outcome["ok"] and outcome["source"] == "admin-write"
    assert outcome["changes"]["changed"] == ["a"]
    assert path.read_text() == new
    assert (tmp_path / "corral.toml.bak").read_text() == old
    assert path.stat().st_mode & 0o777 == 0o600
    left = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.glob("*.toml*")))
    assert left == ["corral.toml", "corral.toml.bak"]  # no temporary file left behind
    assert (await client.post("/v1/chat/completions", json=chat("a"))).status == 200
    # The watcher must not reload again what the API just applied.
    await asyncio.sleep(1.5)
    assert client.app[RELOADER].last is not None
    assert client.app[RELOADER].last.source == "admin-write"


async def test_admin_reload_reports_changes_and_restart_only_keys(
    corral: Any, tmp_path: Path
) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(config_text(tmp_path, {"a": {}}))
    client = await corral(path)
    path.write_text(config_text(tmp_path, {"a": {"ttl": 5}}, api_keys=["k"]))
    resp = await client.post("/admin/config/reload")
    assert resp.status == 200
    outcome = await resp.json()
    assert outcome["changes"]["changed"] == ["a"]
    assert outcome["restart_required"] == ["server.api_keys"]
    # api_keys take effect at the next start: the port still needs no key.
    assert (await client.get("/admin/models")).status == 200

    path.write_text("models = 3\n")
    resp = await client.post("/admin/config/reload")
    assert resp.status == 422
    assert "models" in (await resp.json())["error"]


# -- SIGHUP, through serve() in a child process ---------------------------------------


@pytest.fixture
def serve_proc(tmp_path: Path, fake_llama: Path) -> Iterator[Callable[[Path], Any]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path) -> subprocess.Popen[bytes]:
        code = (
            "import asyncio, sys\nfrom pathlib import Path\n"
            "from proxy.app import CoreOptions, serve\n"
            "from proxy.cli import setup_logging\n"
            "from scheduler.config.root import load_config\n"
            "setup_logging('info', 'text')\n"
            "p, fake = Path(sys.argv[1]), Path(sys.argv[2])\n"
            "asyncio.run(serve(load_config(p), CoreOptions(find_binary=lambda _: fake),"
            " config_path=p))\n"
        )
        with (tmp_path / "serve.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(path), str(fake_llama)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop(proc, 15)


def test_sighup_reloads(serve_proc: Callable[[Path], Any], tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "corral.toml"
    path.write_text(config_text(tmp_path, {"a": {"ctx_size": 1024}}, port=port))
    proc = serve_proc(path)
    url = f"http://127.0.0.1:{port}"

    def get(p: str) -> Any:
        return httpx.get(url + p, timeout=5).json()

    wait_healthy(url, proc, tmp_path / "serve.log")

    # Same size and mtime as before: only the signal can make Corral look again.
    st = path.stat()
    path.write_text(path.read_text().replace("ctx_size = 1024", "ctx_size = 2048"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(1.5)
    assert get("/admin/config")["last_reload"] is None
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while get("/admin/config")["last_reload"] is None:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        time.sleep(0.05)
    body = get("/admin/config")
    assert body["last_reload"]["source"] == "SIGHUP"
    assert body["config"]["models"][0]["ctx_size"] == 2048
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "config reloaded (SIGHUP): changed: a" in (tmp_path / "serve.log").read_text()
