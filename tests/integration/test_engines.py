"""Engines behind Corral, against fakes run for real: a vLLM-style engine launched
through ``runtime``, a cloud behind a key that names its model differently, and a
provider whose listing changes between refreshes (issue 10, parts 1-3 and 5)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp.test_utils import TestClient

from proxy.keys import SCHEDULER
from scheduler.engines.remote import Remote
from scheduler.engines.settings import ProviderConfig
from scheduler.process.instance import Instance, State
from scheduler.scheduling.scheduler import Scheduler
from tests.conftest import make_config, wait_for
from tests.fakes import HERE
from tests.fakes.fake_cloud import STATE, build_app

FAKE_ENGINE = HERE / "fake_engine.py"
CLOUD_KEY = "sk-cloud-7f3a9c1e5b2d4f60"
PROVIDER_KEY = "sk-prov-0e9d8c7b6a5f4e3d"

# A vLLM-style command line, as a [runtimes.NAME] table writes it.
VLLM_LIKE = [sys.executable, str(FAKE_ENGINE), "serve", "${MODEL}", "--host", "${HOST}",
             "--port", "${PORT}", "--served-model-name", "${MODEL}",
             "--max-num-seqs", "${SLOTS}", "${ARGS}"]


def chat(model: str, content: str = "hello there", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def sched(client: TestClient) -> Scheduler:
    return client.app[SCHEDULER]


def engine_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and str(FAKE_ENGINE) in " ".join(p.cmdline()):
                out.append(p)
    return out


def engine_cfg(tmp_path: Path, **model: Any) -> Any:
    runtime = {"command": VLLM_LIKE, "health": "/health", "stop_signal": "SIGINT",
               "env": {"FAKE_ENGINE_ECHO": "port=${PORT} model=${MODEL}"},
               "api": ["chat", "completions"]}
    m = {"name": "eng", "runtime": "fakevllm", "upstream_model": "org/Engine-1B",
         "parallel": 2, "footprint": "1GiB", "args": ["--enforce-eager", "a b; echo pwned"],
         **model}
    return make_config(tmp_path, [m], runtimes={"fakevllm": runtime})


# -- runtimes --------------------------------------------------------------------------


async def test_runtime_substitutes_its_command_line_and_serves(corral, tmp_path: Path) -> None:
    client = await corral(engine_cfg(tmp_path))
    r = await client.post("/v1/chat/completions", json=chat("eng"))
    # The engine answers 404 unless the body names its served model: renamed.
    assert r.status == 200, await r.text()
    [inst] = sched(client).instances()
    assert inst.state is State.READY and inst.spec is not None
    port = inst.spec.port
    argv_line = next(line for line in inst.log if line.startswith("fake-engine argv: "))
    assert json.loads(argv_line.removeprefix("fake-engine argv: ")) == [
        "serve", "org/Engine-1B", "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "org/Engine-1B", "--max-num-seqs", "2",
        # ${ARGS}: one element per arg, never split or run by a shell.
        "--enforce-eager", "a b; echo pwned",
    ]
    assert f"fake-engine env FAKE_ENGINE_ECHO=port={port} model=org/Engine-1B" in inst.log
    assert inst.footprint == 2**30  # the configured footprint: no GGUF to size
    assert inst.apis == frozenset({"chat", "completions"})
    assert inst.describe()["engine"] == Path(sys.executable).name
    seen = await (await client.get("/admin/instances")).json()
    assert any(i["id"] == inst.id for i in seen["instances"])


async def test_runtime_readiness_waits_for_health(corral, tmp_path: Path) -> None:
    client = await corral(engine_cfg(tmp_path, env={"FAKE_LOAD_DELAY": "0.6"}))
    s = sched(client)
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat("eng")))
    await wait_for(lambda: bool(s.instances()), within=5)
    inst = s.instances()[0]
    await asyncio.sleep(0.3)
    assert inst.state is State.STARTING  # /health answers 503 while it loads
    r = await task
    assert r.status == 200
    assert inst.stats.load_seconds >= 0.5


async def test_runtime_tcp_readiness(corral, tmp_path: Path) -> None:
    cfg = engine_cfg(tmp_path)
    cfg = cfg.model_copy(update={"runtimes": {"fakevllm": cfg.runtimes["fakevllm"].model_copy(
        update={"health": cfg.runtimes["fakevllm"].health.model_copy(update={"path": "tcp"})})}})
    client = await corral(cfg)
    r = await client.post("/v1/chat/completions", json=chat("eng"))
    assert r.status == 200


async def test_runtime_crash_at_start_fails_with_its_log(corral, tmp_path: Path) -> None:
    client = await corral(engine_cfg(tmp_path, env={"FAKE_CRASH_AT_START": "1"}))
    r = await client.post("/v1/chat/completions", json=chat("eng"))
    assert r.status == 503
    err = (await r.json())["error"]
    assert "exited with status 1 while loading" in err["message"]
    [status] = sched(client).model_status()
    assert "fake-engine argv" in status["last_error"]  # the child's last words


async def test_runtime_past_its_ready_timeout_is_killed(corral, tmp_path: Path) -> None:
    cfg = engine_cfg(tmp_path, env={"FAKE_HANG": "1"})
    rt = cfg.runtimes["fakevllm"].model_copy(update={"ready_timeout": 0.8})
    client = await corral(cfg.model_copy(update={"runtimes": {"fakevllm": rt}}))
    r = await client.post("/v1/chat/completions", json=chat("eng"))
    assert r.status == 503
    assert "not ready after 0.8 s" in (await r.json())["error"]["message"]
    [status] = sched(client).model_status()
    assert status["failures"] == 1 and status["instances"] == []
    await wait_for(lambda: not engine_children(), within=5)  # killed, not left behind


async def test_runtime_crash_while_ready_is_replaced(corral, tmp_path: Path) -> None:
    client = await corral(engine_cfg(tmp_path, env={"FAKE_EXIT_AFTER": "0.5"}))
    s = sched(client)
    assert (await client.post("/v1/chat/completions", json=chat("eng"))).status == 200
    first = s.instances()[0]
    await wait_for(lambda: first.state is State.FAILED, within=5)
    assert first.failure is not None and "exited unexpectedly with status 1" in first.failure
    r = await client.post("/v1/chat/completions", json=chat("eng"))
    assert r.status == 200
    assert s.instances()[0] is not first


async def test_runtime_drains_then_stops_with_its_signal(corral, tmp_path: Path) -> None:
    client = await corral(engine_cfg(tmp_path, env={"FAKE_TOKEN_DELAY": "0.1"}))
    s = sched(client)
    assert (await client.post("/v1/chat/completions", json=chat("eng"))).status == 200
    inst: Instance = s.instances()[0]
    call = asyncio.ensure_future(
        client.post("/v1/chat/completions", json=chat("eng", max_tokens=8, stream=True)))
    await wait_for(lambda: inst.in_flight == 1, within=5)
    assert await s.unload("eng") == 1
    await wait_for(lambda: inst.state is State.DRAINING, within=2)
    r = await call
    text = await r.text()
    assert r.status == 200 and "[DONE]" in text  # the running call finished
    await wait_for(lambda: inst.state is State.STOPPED, within=10)
    assert not engine_children()
    # SIGINT (its stop_signal) let it exit cleanly; SIGKILL would read -9.
    assert inst.exit_code == 0
    assert inst.spec is not None and inst.spec.stop_signal is signal.SIGINT


# -- remotes: a cloud behind a key -----------------------------------------------------


async def test_cloud_remote_sends_key_and_its_model_name(
    corral, aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cloud = await aiohttp_server(build_app(CLOUD_KEY, ["gpt-cloud-large"], "/openai/v1"))
    monkeypatch.setenv("FAKE_CLOUD_KEY", CLOUD_KEY)
    base = str(cloud.make_url("/openai/v1"))
    cfg = make_config(tmp_path, [
        {"name": "cloud", "remotes": [{"url": base, "api_key_env": "FAKE_CLOUD_KEY",
                                       "model": "gpt-cloud-large", "health": "none",
                                       "headers": {"X-Title": "corral"}}]},
        {"name": "keyless", "remotes": [{"url": base, "model": "gpt-cloud-large",
                                         "health": "none"}]},
    ])
    client = await corral(cfg)
    r = await client.post("/v1/chat/completions", json=chat("cloud", "hi"))
    assert r.status == 200, await r.text()
    assert (await r.json())["choices"][0]["message"]["content"] == "cloud gpt-cloud-large: hi"
    r = await client.post("/v1/chat/completions", json=chat("cloud", "yo", stream=True))
    assert r.status == 200 and "[DONE]" in await r.text()
    seen = list(cloud.app[STATE]["requests"])
    assert all(c["key_ok"] and c["extra"] == "corral" for c in seen[:2])
    # The cloud refuses a call without its key; Corral relays its answer.
    r = await client.post("/v1/chat/completions", json=chat("keyless"))
    assert r.status == 401
    # No probe ever: health = "none" costs the cloud nothing.
    assert all(c["path"] == "/openai/v1/chat/completions" for c in cloud.app[STATE]["requests"])


async def test_cloud_transcription_form_gets_the_cloud_model_name(
    corral, aiohttp_server: Any, tmp_path: Path
) -> None:
    cloud = await aiohttp_server(build_app(CLOUD_KEY, ["whisper-1"]))
    cfg = make_config(tmp_path, [{"name": "stt", "capabilities": ["audio"], "remotes": [
        {"url": str(cloud.make_url("/v1")), "api_key": CLOUD_KEY, "model": "whisper-1",
         "health": "none"}]}])
    client = await corral(cfg)
    form = aiohttp.FormData()
    form.add_field("model", "stt")
    form.add_field("file", b"RIFF" + b"\0" * 2000, filename="a.wav", content_type="audio/wav")
    r = await client.post("/v1/audio/transcriptions", data=form)
    assert r.status == 200, await r.text()
    assert (await r.json())["text"] == "whisper-1 heard 2004 bytes"


async def test_cloud_down_sits_out_its_cooldown_with_a_retry_hint(
    corral, tmp_path: Path, unused_tcp_port: int
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/v1"
    cfg = make_config(tmp_path, [{"name": "cloud", "remotes": [
        {"url": url, "api_key": CLOUD_KEY, "health": "none", "cooldown": 30}]}])
    client = await corral(cfg)
    [remote] = sched(client).remotes()
    assert remote.state is State.READY  # taken on trust
    for _ in range(2):
        # Nobody listens: learned from the call, which is not resent to a remote
        # that sits out its cooldown.
        r = await client.post("/v1/chat/completions", json=chat("cloud"))
        assert r.status == 503
        assert remote.state is State.FAILED
        assert 20 <= int(r.headers["Retry-After"]) <= 30
        assert CLOUD_KEY not in await r.text()


async def test_rate_limited_cloud_sits_out_its_retry_after(
    corral, aiohttp_server: Any, tmp_path: Path
) -> None:
    cloud = await aiohttp_server(build_app(CLOUD_KEY, ["m"]))
    cfg = make_config(tmp_path, [{"name": "m", "remotes": [
        {"url": str(cloud.make_url("/v1")), "api_key": CLOUD_KEY, "health": "none"}]}])
    client = await corral(cfg)
    [remote] = sched(client).remotes()
    cloud.app[STATE]["fail"] = (429, "7")
    r = await client.post("/v1/chat/completions", json=chat("m"))
    assert r.status == 429  # the cloud's own answer, relayed
    assert remote.state is State.FAILED and remote.failure == "answered 429"
    r = await client.post("/v1/chat/completions", json=chat("m"))
    assert r.status == 503 and 5 <= int(r.headers["Retry-After"]) <= 7
    assert len(cloud.app[STATE]["requests"]) == 1  # not hammered meanwhile
    cloud.app[STATE]["fail"] = None
    remote.recover()
    assert (await client.post("/v1/chat/completions", json=chat("m"))).status == 200


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 signed by itself, and a server context using it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return cert, ctx


async def test_tls_remote_with_ca_file_or_without_verification(
    corral, aiohttp_server: Any, tmp_path: Path, self_signed: tuple[Path, ssl.SSLContext]
) -> None:
    cert, ctx = self_signed
    cloud = await aiohttp_server(build_app(CLOUD_KEY, ["m"]), ssl=ctx)
    url = f"https://127.0.0.1:{cloud.port}/v1"
    assert url.startswith("https://")
    cfg = make_config(tmp_path, [
        {"name": "ca", "remotes": [{"url": url, "api_key": CLOUD_KEY, "ca_file": str(cert),
                                    "health": "none", "model": "m"}]},
        {"name": "insecure", "remotes": [{"url": url, "api_key": CLOUD_KEY, "model": "m",
                                          "tls_verify": False, "health": "none"}]},
        {"name": "strict", "remotes": [{"url": url, "api_key": CLOUD_KEY, "model": "m",
                                        "health": "none"}]},
    ])
    client = await corral(cfg)
    assert (await client.post("/v1/chat/completions", json=chat("ca"))).status == 200
    assert (await client.post("/v1/chat/completions", json=chat("insecure"))).status == 200
    # An unknown issuer is refused: the call fails, nothing reached the server.
    served = len(cloud.app[STATE]["requests"])
    r = await client.post("/v1/chat/completions", json=chat("strict"))
    assert r.status in (502, 503)
    assert len(cloud.app[STATE]["requests"]) == served


async def test_remote_timeout_bounds_the_first_byte(
    corral, aiohttp_server: Any, tmp_path: Path
) -> None:
    cloud = await aiohttp_server(build_app(CLOUD_KEY, ["m"]))
    cloud.app[STATE]["delay"] = 2.0
    cfg = make_config(tmp_path, [{"name": "m", "remotes": [
        {"url": str(cloud.make_url("/v1")), "api_key": CLOUD_KEY, "health": "none",
         "timeout": 0.3}]}])
    client = await corral(cfg)
    loop = asyncio.get_running_loop()
    began = loop.time()
    r = await client.post("/v1/chat/completions", json=chat("m"))
    assert r.status in (502, 503)
    assert loop.time() - began < 1.5  # not the model's 600 s, nor the cloud's 2 s
    assert sched(client).remotes()[0].state is State.FAILED


async def test_weights_split_calls_between_remotes(
    corral, aiohttp_server: Any, tmp_path: Path
) -> None:
    a = await aiohttp_server(build_app(CLOUD_KEY, ["m"]))
    b = await aiohttp_server(build_app(CLOUD_KEY, ["m"]))
    cfg = make_config(tmp_path, [{"name": "m", "remotes": [
        {"url": str(a.make_url("/v1")), "api_key": CLOUD_KEY, "health": "none", "weight": 3},
        {"url": str(b.make_url("/v1")), "api_key": CLOUD_KEY, "health": "none"}]}])
    client = await corral(cfg)
    for i in range(8):
        # Distinct conversations: a repeated one would follow its affinity instead.
        r = await client.post("/v1/chat/completions", json=chat("m", f"question {i}"))
        assert r.status == 200
    assert (len(a.app[STATE]["requests"]), len(b.app[STATE]["requests"])) == (6, 2)


# -- providers -------------------------------------------------------------------------


async def test_provider_models_come_and_go_and_survive_an_outage(
    corral_ports, aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prov = await aiohttp_server(build_app(PROVIDER_KEY, ["m1", "m2", "m3"]))
    monkeypatch.setenv("FAKE_PROVIDER_KEY", PROVIDER_KEY)
    cfg = make_config(tmp_path, [{"name": "local"}], providers=[{
        "name": "fakeprov", "url": str(prov.make_url("")), "api_key_env": "FAKE_PROVIDER_KEY",
        "prefix": "prov/", "refresh": 0.2}])
    ports = await corral_ports(cfg)
    s = sched(ports.openai)

    async def listed() -> dict[str, set[str]]:
        main = await (await ports.openai.get("/v1/models")).json()
        oll = await (await ports.ollama.get("/api/tags")).json()
        lms = await (await ports.lmstudio.get("/v1/models")).json()
        return {"main": {m["id"] for m in main["data"]},
                "ollama": {m["name"].removesuffix(":latest") for m in oll["models"]},
                "lmstudio": {m["id"] for m in lms["data"]}}

    want = {"local", "prov/m1", "prov/m2", "prov/m3"}
    seen = await listed()
    assert all(want <= names for names in seen.values()), seen
    r = await ports.openai.post("/v1/chat/completions", json=chat("prov/m2", "hey"))
    assert r.status == 200
    assert (await r.json())["choices"][0]["message"]["content"] == "cloud m2: hey"
    r = await ports.ollama.post("/api/chat", json={**chat("prov/m1"), "stream": False})
    assert r.status == 200, await r.text()

    # m1 goes, m4 comes.
    prov.app[STATE]["ids"] = ["m2", "m3", "m4"]
    await wait_for(lambda: "prov/m4" in s.names() and "prov/m1" not in s.names(), within=5)
    assert (await ports.openai.post("/v1/chat/completions", json=chat("prov/m1"))).status == 404
    assert (await ports.openai.post("/v1/chat/completions", json=chat("prov/m4"))).status == 200

    # Down: the last list stays, its models answer 503 with a hint.
    prov.app[STATE]["down"] = True
    remotes = [r for r in s.remotes() if r.model.startswith("prov/")]
    await wait_for(lambda: all(r.state is State.FAILED for r in remotes), within=5)
    assert {"prov/m2", "prov/m3", "prov/m4"} <= (await listed())["main"]
    r = await ports.openai.post("/v1/chat/completions", json=chat("prov/m3"))
    assert r.status == 503 and "Retry-After" in r.headers
    status = (await (await ports.openai.get("/admin/providers")).json())["providers"]
    assert status[0]["ok"] is False and "503" in status[0]["error"]
    metrics = await (await ports.openai.get("/metrics")).text()
    assert 'corral_provider_up{provider="fakeprov"} 0.0' in metrics
    assert 'corral_provider_models{provider="fakeprov"} 3.0' in metrics
    assert 'corral_remote_up{model="prov/m3",remote="prov/m3@' in metrics

    # Back: in rotation at the next listing.
    prov.app[STATE]["down"] = False
    await wait_for(lambda: all(r.state is State.READY for r in remotes), within=5)
    assert (await ports.openai.post("/v1/chat/completions", json=chat("prov/m3"))).status == 200
    metrics = await (await ports.openai.get("/metrics")).text()
    assert 'corral_provider_up{provider="fakeprov"} 1.0' in metrics


async def test_provider_added_changed_and_removed_by_reload(
    corral, aiohttp_server: Any, tmp_path: Path
) -> None:
    prov = await aiohttp_server(build_app(PROVIDER_KEY, ["m1", "m2"]))
    base = make_config(tmp_path, [{"name": "local"}])
    client = await corral(base)
    s = sched(client)
    assert s.names() == ["local"]
    table = {"name": "p", "url": str(prov.make_url("")), "api_key": PROVIDER_KEY}
    with_p = base.model_copy(update={"providers": (ProviderConfig(**table),)})
    report = await s.apply_config(with_p)
    assert s.names() == ["local", "m1", "m2"]  # listed before the reload returns
    assert report["added"] == ["m1", "m2"] and report["unchanged"] == ["local"]
    renamed = base.model_copy(update={"providers": (
        ProviderConfig(**table, prefix="p/", models=("m2",)),)})
    report = await s.apply_config(renamed)
    assert report == {"added": ["p/m2"], "removed": ["m1", "m2"], "changed": [],
                      "unchanged": ["local"]}
    assert s.names() == ["local", "p/m2"]
    r = await client.post("/v1/chat/completions", json=chat("p/m2", "x"))
    assert (await r.json())["choices"][0]["message"]["content"] == "cloud m2: x"
    await s.apply_config(base)
    assert s.names() == ["local"]
    assert (await client.post("/v1/chat/completions", json=chat("p/m2"))).status == 404


# -- keys never leak -------------------------------------------------------------------


async def test_no_key_in_logs_admin_metrics_or_errors(
    corral, aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = await aiohttp_server(build_app(CLOUD_KEY, ["gpt-x"]))
    prov = await aiohttp_server(build_app(PROVIDER_KEY, ["p1"]))
    header_key = "hdr-secret-5a4b3c2d1e"
    monkeypatch.setenv("FAKE_PROVIDER_KEY", PROVIDER_KEY)
    cfg = make_config(
        tmp_path,
        [{"name": "cloud", "remotes": [{"url": str(cloud.make_url("/v1")),
                                        "api_key": CLOUD_KEY, "model": "gpt-x"}]},
         {"name": "hdr", "remotes": [{"url": str(cloud.make_url("/v1")), "health": "none",
                                      "headers": {"X-Api-Key": header_key}}]},
         {"name": "gone", "remotes": [{"url": "http://127.0.0.1:9/v1", "api_key": CLOUD_KEY,
                                       "health": "none"}]}],
        providers=[{"name": "p", "url": str(prov.make_url("")),
                    "api_key_env": "FAKE_PROVIDER_KEY", "prefix": "p/"}],
    )
    client = await corral(cfg)
    await wait_for(lambda: sched(client).remotes()[0].state is State.READY, within=5)
    outputs = []
    for body in (chat("cloud"), chat("p/p1"), chat("gone"), chat("gone"), chat("hdr"),
                 chat("nope")):
        r = await client.post("/v1/chat/completions", json=body)
        outputs.append(await r.text())
    for path in ("/admin/config", "/admin/models", "/admin/instances", "/admin/providers",
                 "/admin/overview", "/admin/events", "/admin/requests", "/metrics"):
        r = await client.get(path)
        assert r.status == 200, path
        outputs.append(await r.text())
    outputs += [rec.getMessage() for rec in caplog.records]
    outputs += [repr(r.config) for r in sched(client).remotes() if isinstance(r, Remote)]
    text = "\n".join(outputs)
    assert "p/p1" in text and "gone" in text  # the run did produce output
    for key in (CLOUD_KEY, PROVIDER_KEY, header_key):
        assert key not in text
