"""Pulling hf.co/{user}/{repo}[:quant] through the Ollama port from the fake Hub:
Ollama's progress lines, a resumed download, the model served at once; auto_pull;
configured hf_repo models; mmproj and LoRA flags; images to a model that cannot see."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.keys import SCHEDULER
from scheduler.config.root import ModelConfig
from scheduler.models import pull
from tests.conftest import make_config, wait_for
from tests.fakes.hf_hub import FakeHub, close_hub_client
from tests.unit.test_discovery import write_gguf

REPO = "org/Tiny-GGUF"


@pytest.fixture
def ggufs(tmp_path: Path) -> dict[str, bytes]:
    src = tmp_path / "src"
    return {
        f"{REPO}/Tiny-Q4_K_M.gguf": write_gguf(src / "a.gguf", "Tiny A").read_bytes(),
        # Large enough for several progress lines to be possible.
        f"{REPO}/Tiny-Q8_0.gguf": write_gguf(src / "b.gguf", "Tiny B").read_bytes()
        + bytes(3 << 20),
        f"{REPO}/mmproj-Tiny-f16.gguf": write_gguf(src / "p.gguf", "P", "clip").read_bytes(),
        "org/text-only/Plain-Q4_K_M.gguf": write_gguf(src / "c.gguf", "Plain").read_bytes(),
    }


@pytest.fixture
async def hub(aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              ggufs: dict[str, bytes]) -> AsyncIterator[FakeHub]:
    fake = FakeHub(ggufs)
    server = await aiohttp_server(fake.app)
    monkeypatch.setenv("HF_ENDPOINT", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield fake
    close_hub_client()


async def ndjson(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    raw = await resp.read()
    return [json.loads(line) for line in raw.split(b"\n") if line]


def check_shapes(lines: list[dict[str, Any]]) -> None:
    """Ollama's pull stream: manifest, per-file progress, verify, write, success."""
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-3:] == [{"status": "verifying sha256 digest"},
                          {"status": "writing manifest"}, {"status": "success"}]
    progress = lines[1:-3]
    assert progress
    for line in progress:
        assert set(line) == {"status", "digest", "total", "completed"}
        m = re.fullmatch(r"pulling ([0-9a-f]{12})", line["status"])
        assert m and line["digest"] == f"sha256:{m.group(1)}" + line["digest"][19:]
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", line["digest"])
        assert 0 <= line["completed"] <= line["total"]


async def test_pull_streams_progress_and_the_model_is_served(
        hub: FakeHub, corral_ports: Any, tmp_path: Path, ggufs: dict[str, bytes]) -> None:
    ports = await corral_ports(make_config(tmp_path, []))
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:q8_0"})
    assert r.status == 200 and r.content_type == "application/x-ndjson"
    lines = await ndjson(r)
    check_shapes(lines)
    body = ggufs[f"{REPO}/Tiny-Q8_0.gguf"]
    digest = hashlib.sha256(body).hexdigest()
    files = [x for x in lines if "digest" in x and x["completed"] == x["total"]]
    assert {"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
            "total": len(body), "completed": len(body)} in files
    # The projector beside it came too.
    assert len({x["digest"] for x in files}) == 2
    tags = [m["name"] for m in (await (await ports.ollama.get("/api/tags")).json())["models"]]
    assert f"hf.co/{REPO}:Q8_0" in tags
    r = await ports.openai.get("/v1/models")
    listed = {m["id"]: m for m in (await r.json())["data"]}
    assert f"hf.co/{REPO}:Q8_0" in listed
    # Served (by the fake llama-server) under the name as asked and as listed.
    r = await ports.ollama.post("/api/chat", json={
        "model": f"hf.co/{REPO}:q8_0", "stream": False,
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200, await r.text()
    inst = ports.openai.app[SCHEDULER].instances()[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as st:
        argv = (await st.json())["argv"]
    model_file = Path(argv[argv.index("-m") + 1])
    assert await asyncio.to_thread(model_file.read_bytes) == body
    assert "huggingface" in str(model_file) and "snapshots" in str(model_file)
    assert Path(argv[argv.index("--mmproj") + 1]).name == "mmproj-Tiny-f16.gguf"
    # Pulling again downloads nothing and says success at once.
    before = hub.downloads
    r = await ports.ollama.post("/api/pull", json={"name": f"hf.co/{REPO}:Q8_0",
                                                   "stream": False})
    assert (r.status, await r.json()) == (200, {"status": "success"})
    assert hub.downloads == before


async def test_delete_a_pulled_model(hub: FakeHub, corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [{"name": "mine"}]))
    for name in (f"hf.co/{REPO}:Q4_K_M", f"hf.co/{REPO}:Tiny-Q4_K_M.gguf", f"hf.co/{REPO}:Q8_0"):
        r = await ports.ollama.post("/api/pull", json={"model": name, "stream": False})
        assert r.status == 200
    snap = tmp_path / "cache" / "models" / "huggingface" / "models--org--Tiny-GGUF"
    r = await ports.ollama.delete("/api/delete", json={"model": f"hf.co/{REPO}:Q8_0"})
    assert r.status == 200
    names = ports.openai.app[SCHEDULER].names()
    assert f"hf.co/{REPO}:Q8_0" not in names and f"hf.co/{REPO}:Q4_K_M" in names
    assert not list(snap.rglob("Tiny-Q8_0.gguf"))
    # The projector is still used by the Q4_K_M model: it stays, as does the file
    # two names share until both are deleted.
    assert list(snap.rglob("mmproj-Tiny-f16.gguf"))
    r = await ports.ollama.delete("/api/delete", json={"model": f"hf.co/{REPO}:Q4_K_M"})
    assert r.status == 200
    assert (await asyncio.to_thread(
        lambda: (next(snap.rglob("Tiny-Q4_K_M.gguf"))).read_bytes()))[:4] == b"GGUF"
    r = await ports.ollama.delete("/api/delete", json={"model": "mine"})
    assert r.status == 501 and "corral.toml" in (await r.json())["error"]


async def test_a_broken_download_resumes_with_a_range_request(
        hub: FakeHub, corral_ports: Any, tmp_path: Path, ggufs: dict[str, bytes]) -> None:
    ports = await corral_ports(make_config(tmp_path, []))
    body = ggufs[f"{REPO}/Tiny-Q8_0.gguf"]
    hub.cut_after = len(body) // 2
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0"})
    lines = await ndjson(r)
    assert "pull again to resume" in lines[-1]["error"]
    assert f"hf.co/{REPO}:Q8_0" not in ports.openai.app[SCHEDULER].names()
    partial = list((tmp_path / "cache").rglob("*.corral-partial"))
    assert len(partial) == 1 and partial[0].stat().st_size == len(body) // 2
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0"})
    lines = await ndjson(r)
    check_shapes(lines)
    assert hub.ranges == [f"bytes={len(body) // 2}-"]
    # The first progress line of the resumed file starts where the first pull stopped.
    first = next(x for x in lines if x.get("total") == len(body))
    assert first["completed"] >= len(body) // 2
    blob = tmp_path / "cache" / "models" / "huggingface" / "models--org--Tiny-GGUF" / "blobs"
    assert (blob / hashlib.sha256(body).hexdigest()).read_bytes() == body
    assert not list((tmp_path / "cache").rglob("*.corral-partial"))


async def test_a_mirror_that_ignores_range_restarts_the_file(
        hub: FakeHub, corral_ports: Any, tmp_path: Path, ggufs: dict[str, bytes]) -> None:
    ports = await corral_ports(make_config(tmp_path, []))
    body = ggufs[f"{REPO}/Tiny-Q8_0.gguf"]
    hub.cut_after = len(body) // 3
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0"})
    assert "error" in (await ndjson(r))[-1]
    hub.honour_range = False
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0"})
    check_shapes(await ndjson(r))
    blobs = tmp_path / "cache" / "models" / "huggingface" / "models--org--Tiny-GGUF" / "blobs"
    assert (blobs / hashlib.sha256(body).hexdigest()).read_bytes() == body


async def test_a_client_that_goes_away_stops_the_download_and_it_resumes(
        hub: FakeHub, corral_ports: Any, tmp_path: Path, ggufs: dict[str, bytes]) -> None:
    ports = await corral_ports(make_config(tmp_path, []))
    body = ggufs[f"{REPO}/Tiny-Q8_0.gguf"]
    hub.chunk_delay = 0.02  # 48 chunks: about a second for the file
    url = ports.ollama.make_url("/api/pull")
    async with (aiohttp.ClientSession() as s,
                s.post(url, json={"model": f"hf.co/{REPO}:Q8_0"}) as r):
        async for raw in r.content:
            line = json.loads(raw)
            if line.get("total") == len(body) and line["completed"] > 0:
                break  # leave mid-file
    partial = tmp_path / "cache" / "models" / "huggingface" / "models--org--Tiny-GGUF" / "blobs"

    def parts() -> list[Path]:
        return list(partial.glob("*.corral-partial"))

    await wait_for(lambda: len(parts()) == 1)
    # The transfer stops: the partial file stops growing, short of the whole.
    size = -1
    for _ in range(50):
        await asyncio.sleep(0.1)
        now = parts()[0].stat().st_size
        if now == size:
            break
        size = now
    assert 0 < size < len(body)
    hub.chunk_delay = 0.0
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q8_0"})
    check_shapes(await ndjson(r))
    assert hub.ranges[-1] == f"bytes={size}-"


async def test_unknown_quant_and_repo_are_clear_errors(hub: FakeHub, corral_ports: Any,
                                                       tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, []))
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q2_K",
                                                   "stream": False})
    assert r.status == 404
    assert (await r.json())["error"] == (
        "no GGUF file for 'Q2_K' in the repo; it has Q4_K_M, Q8_0")
    r = await ports.ollama.post("/api/pull", json={"model": "hf.co/org/nothing-here",
                                                   "stream": False})
    assert r.status == 404 and "org/nothing-here" in (await r.json())["error"]
    # Streaming: the error is the last line, as Ollama's clients expect.
    r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}:Q2_K"})
    lines = await ndjson(r)
    assert lines[0] == {"status": "pulling manifest"} and "Q2_K" in lines[-1]["error"]


async def test_configured_hf_repo_model_is_pulled(hub: FakeHub, corral_ports: Any,
                                                  tmp_path: Path) -> None:
    tiny = ModelConfig(name="tiny", hf_repo=REPO, hf_file="Tiny-Q4_K_M.gguf",
                       mmproj="mmproj-Tiny-f16.gguf")
    cfg = make_config(tmp_path, []).model_copy(update={"models": (tiny,)})
    ports = await corral_ports(cfg)
    r = await ports.ollama.post("/api/pull", json={"model": "tiny"})
    lines = await ndjson(r)
    check_shapes(lines)
    assert len({x["digest"] for x in lines if "digest" in x}) == 2  # model and projector
    assert hub.downloads == 2
    # hf_hub_download finds both in the cache: the launch downloads nothing more.
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200
    assert hub.downloads == 2
    assert ports.openai.app[SCHEDULER].names() == ["tiny"]
    inst = ports.openai.app[SCHEDULER].instances()[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as st:
        argv = (await st.json())["argv"]
    mmproj = Path(argv[argv.index("--mmproj") + 1])
    assert mmproj.name == "mmproj-Tiny-f16.gguf" and mmproj.is_absolute()


async def test_auto_pull_on_first_use(hub: FakeHub, corral_ports: Any, tmp_path: Path) -> None:
    call = {"model": "hf.co/org/text-only", "messages": [{"role": "user", "content": "hi"}]}
    off = await corral_ports(make_config(tmp_path, []))
    r = await off.openai.post("/v1/chat/completions", json=call)
    assert r.status == 404
    on = await corral_ports(make_config(tmp_path, [], scheduler={"auto_pull": True}))
    # Two calls at once (two dialects): one download, both answered.
    r1, r2 = await asyncio.gather(
        on.openai.post("/v1/chat/completions", json=call),
        on.ollama.post("/api/chat", json={**call, "stream": False}))
    assert (r1.status, r2.status) == (200, 200), (await r1.text(), await r2.text())
    assert hub.downloads == 1
    assert "hf.co/org/text-only:Q4_K_M" in on.openai.app[SCHEDULER].names()
    # Not a Hub reference: an unknown model stays a 404, nothing is fetched.
    r = await on.ollama.post("/api/chat", json={**call, "model": "nope"})
    assert r.status == 404


def test_choose_files() -> None:
    files = ["README.md", "x-Q4_K_M.gguf", "x-Q8_0.gguf", "mmproj-x-f16.gguf",
             "mmproj-x-f32.gguf", "big/x-Q6_K-00002-of-00002.gguf",
             "big/x-Q6_K-00001-of-00002.gguf"]
    c = pull.choose(files, None)
    assert (c.files, c.mmproj, c.tag) == (("x-Q4_K_M.gguf",), "mmproj-x-f16.gguf", "Q4_K_M")
    assert pull.choose(files, "q6_k").files == (
        "big/x-Q6_K-00001-of-00002.gguf", "big/x-Q6_K-00002-of-00002.gguf")
    assert pull.choose(files, "x-Q8_0.gguf").tag == "x-Q8_0.gguf"
    assert pull.choose(["only-F16.gguf"], None).files == ("only-F16.gguf",)
    with pytest.raises(pull.NothingToPull):
        pull.choose(files, "IQ2_XS")
    assert pull.parse_ref("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M") == pull.Ref(
        "bartowski/Llama-3.2-1B-Instruct-GGUF", "Q4_K_M")
    assert pull.parse_ref("huggingface.co/a/b") == pull.Ref("a/b", None)
    assert pull.parse_ref("hf.co/a/b:latest") == pull.Ref("a/b", None)
    assert pull.parse_ref("gemma3:270m") is None


# --- vision and adapters ------------------------------------------------------------------

IMAGE = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
         "AAAABJRU5ErkJggg==")


async def test_images_to_a_model_without_projector_are_a_400_in_each_dialect(
        corral_ports: Any, tmp_path: Path) -> None:
    proj = write_gguf(tmp_path / "mmproj.gguf", "P", "clip")
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "text"}, {"name": "eyes", "mmproj": str(proj)}]))
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE}"}}
    oa = {"model": "text", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, part]}]}
    r = await ports.openai.post("/v1/chat/completions", json=oa)
    assert r.status == 400
    err = (await r.json())["error"]
    assert "cannot serve vision" in err["message"] and "eyes" in err["message"]
    assert "mmproj" in err["message"]
    r = await ports.ollama.post("/api/chat", json={"model": "text", "messages": [
        {"role": "user", "content": "what?", "images": [IMAGE]}]})
    assert r.status == 400 and "cannot serve vision" in (await r.json())["error"]
    r = await ports.ollama.post("/api/generate", json={"model": "text", "prompt": "what?",
                                                       "images": [IMAGE]})
    assert r.status == 400
    anthropic = {
        "model": "text", "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": IMAGE}},
            {"type": "text", "text": "what?"}]}]}
    r = await ports.openai.post("/v1/messages", json=anthropic)
    assert r.status == 400
    body = await r.json()
    assert body["type"] == "error" and "cannot serve vision" in body["error"]["message"]
    for path in ("/api/v0/chat/completions", "/v1/chat/completions"):
        r = await ports.lmstudio.post(path, json=oa)
        assert r.status == 400 and "cannot serve vision" in (await r.json())["error"]["message"]
    # Nothing was launched for them; the vision model takes the same calls.
    assert ports.openai.app[SCHEDULER].instances() == []
    r = await ports.openai.post("/v1/chat/completions", json={**oa, "model": "eyes"})
    assert r.status == 200
    r = await ports.ollama.post("/api/chat", json={"model": "eyes", "stream": False,
                                                   "messages": [{"role": "user",
                                                                 "content": "what?",
                                                                 "images": [IMAGE]}]})
    assert r.status == 200
    r = await ports.openai.post("/v1/messages", json={**anthropic, "model": "eyes"})
    assert r.status == 200
    # The image reached the upstream as sent.
    inst = ports.openai.app[SCHEDULER].instances()[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/requests") as rq:
        sent = [q for q in await rq.json() if q["path"] == "/v1/messages"]
    assert sent[-1]["body"]["messages"][0]["content"][0]["source"]["data"] == IMAGE
    models = (await (await ports.openai.get("/v1/models")).json())["data"]
    assert "vision" in next(m for m in models if m["id"] == "eyes")["capabilities"]


async def test_mmproj_and_lora_reach_the_argv_and_the_footprint(
        corral_ports: Any, tmp_path: Path) -> None:
    proj = write_gguf(tmp_path / "mmproj.gguf", "P", "clip")
    a = write_gguf(tmp_path / "a.gguf", "A", "llama")
    b = write_gguf(tmp_path / "b.gguf", "B", "llama")
    base = write_gguf(tmp_path / "base.gguf", "Base")
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "plain", "path": str(base)},
        {"name": "full", "path": str(base), "mmproj": str(proj),
         "lora": [{"path": str(a)}, {"path": str(b), "scale": 0.5}]}]))
    sched = ports.openai.app[SCHEDULER]
    await wait_for(lambda: all(m["footprint_bytes"] for m in sched.model_status()))
    sizes = {m["name"]: m["footprint_bytes"] for m in sched.model_status()}
    extra = proj.stat().st_size + a.stat().st_size + b.stat().st_size
    assert sizes["full"] - sizes["plain"] == extra
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "full", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200
    inst = sched.instances()[0]
    async with aiohttp.ClientSession() as s, s.get(inst.base_url + "/fake/stats") as st:
        argv = (await st.json())["argv"]
    joined = " ".join(argv)
    assert f"--mmproj {proj}" in joined
    assert f"--lora {a}" in joined and f"--lora-scaled {b}:0.5" in joined


async def test_missing_adapter_fails_the_launch_clearly(corral_ports: Any, tmp_path: Path) -> None:
    ports = await corral_ports(make_config(tmp_path, [
        {"name": "m", "lora": [{"path": str(tmp_path / "gone.gguf")}]}]))
    r = await ports.openai.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status >= 500
    assert "lora file" in (await r.json())["error"]["message"]


async def test_an_unreachable_hub_fails_a_pull_at_once(
    corral_ports: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 25: huggingface_hub lists a repository with five retries and backoff, so a
    non-streamed pull of an unreachable name held its caller 23 s. The Hub here is a
    port that hangs up on every connection: one try, then the error."""
    tries = 0

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal tries
        tries += 1
        writer.close()

    hub = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = hub.sockets[0].getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    try:
        ports = await corral_ports(make_config(tmp_path, [{"name": "m"}]))
        for stream in (False, True):
            r = await ports.ollama.post("/api/pull", json={"model": f"hf.co/{REPO}",
                                                           "stream": stream})
            if stream:
                lines = await ndjson(r)
                assert r.status == 200 and "cannot reach the Hub" in lines[-1]["error"]
            else:
                assert r.status == 502, await r.text()
                assert "cannot reach the Hub" in (await r.json())["error"]
        assert tries == 2  # one connection per pull: no retries
    finally:
        hub.close()
        await hub.wait_closed()
