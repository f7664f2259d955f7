"""Speech and images through Corral (issue 30), against the fake media engine run for
real as the built-in ``sd-server`` and ``kokoro`` runtimes (their commands pointed at
``tests/fakes/fake_media.py``), beside a chat model, under ``max_instances = 1`` so
that every change of model is a swap. The real ``openai`` client makes the calls."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest
from aiohttp.test_utils import TestClient

from proxy.keys import SCHEDULER
from scheduler.scheduling.scheduler import Scheduler
from tests.conftest import make_config
from tests.fakes import HERE
from tests.fakes.fake_media import image_bytes, speech_bytes, speech_chunk

FAKE_MEDIA = HERE / "fake_media.py"
MEDIA = [sys.executable, str(FAKE_MEDIA), "--host", "${HOST}", "--port", "${PORT}", "${ARGS}"]
# The fake's defaults (tests/fakes/fake_media.py).
CHUNKS, CHUNK = 8, 4096


def media_cfg(tmp_path: Path, image_seconds: float = 0.5, **sched: Any) -> Any:
    env = {"FAKE_IMAGE_SECONDS": str(image_seconds)}
    models = [
        {"name": "chat"},
        # Built-in runtimes by name: their capabilities and long-job defaults apply.
        {"name": "sd", "runtime": "sd-server", "env": env},
        {"name": "tts", "runtime": "kokoro", "upstream_model": "kokoro", "env": env},
        {"name": "whisper", "runtime": "fakewhisper", "capabilities": ["audio"]},
    ]
    # Tables named after the built-ins keep their health check and api, and run the fake.
    runtimes = {"sd-server": {"command": MEDIA}, "kokoro": {"command": MEDIA},
                "fakewhisper": {"command": MEDIA, "health": "/health"}}
    return make_config(tmp_path, models, runtimes=runtimes,
                       scheduler={"max_instances": 1, **sched})


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[[TestClient], openai.AsyncOpenAI]]:
    """``sdk(client)``: the real openai client pointed at Corral, closed after the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(client: TestClient) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none",
                                       max_retries=0, timeout=60))
        return made[-1]

    yield make
    for api in made:
        await api.close()


def sched(client: TestClient) -> Scheduler:
    return client.app[SCHEDULER]


async def chat(api: openai.AsyncOpenAI) -> str:
    r = await api.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return r.choices[0].message.content or ""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_openai_client_speech_and_images_swap_with_a_chat_model(
        corral: Any, tmp_path: Path, sdk: Any) -> None:
    client = await corral(media_cfg(tmp_path))
    api = sdk(client)
    models = {m.id: m for m in (await api.models.list()).data}
    assert "image" in models["sd"].model_extra["capabilities"]  # type: ignore[index]
    assert "speech" in models["tts"].model_extra["capabilities"]  # type: ignore[index]
    assert sched(client).resolve("sd").first_byte_timeout == 1800.0  # long-job default

    assert await chat(api)
    # Speech, streamed to a file as it comes.
    out = tmp_path / "speech.mp3"
    async with api.audio.speech.with_streaming_response.create(
            model="tts", voice="af_bella", input="Hello from Corral") as resp:
        assert resp.headers["content-type"] == "audio/mpeg"
        await resp.stream_to_file(out)
    assert out.read_bytes() == speech_bytes("Hello from Corral", CHUNKS, CHUNK)
    assert [i.model for i in sched(client).instances()] == ["tts"]

    assert await chat(api)
    image = await api.images.generate(model="sd", prompt="a corral", n=2)
    assert image.data is not None
    assert [base64.b64decode(d.b64_json or "") for d in image.data] == [
        image_bytes("a corral", 0, 1024), image_bytes("a corral", 1, 1024)]

    assert await chat(api)
    photo, mask = b"\x89PNG" + bytes(range(256)) * 900, b"\x89PNG" + b"\1" * 5000
    edited = await api.images.edit(model="sd", prompt="add a horse",
                                   image=("photo.png", photo, "image/png"),
                                   mask=("mask.png", mask, "image/png"))
    # Both files reached the engine whole (streamed on, one after the other).
    assert edited.model_extra is not None
    files = edited.model_extra["corral_test"]["files"]
    assert files["image"] == [len(photo), hashlib.sha256(photo).hexdigest()]
    assert files["mask"] == [len(mask), hashlib.sha256(mask).hexdigest()]

    clip = b"RIFF" + bytes(range(256)) * 4000
    with warnings.catch_warnings():
        # This openai release marks translations deprecated; clients still call it.
        warnings.simplefilter("ignore", DeprecationWarning)
        said = await api.audio.translations.create(model="whisper",
                                                   file=("clip.wav", clip, "audio/wav"))
    assert said.text == f"{len(clip)} bytes sha256 {hashlib.sha256(clip).hexdigest()}"
    assert await chat(api)

    # Metrics count them by the capability of their route.
    text = await (await client.get("/metrics")).text()
    for model, cap in (("tts", "speech"), ("sd", "image"), ("whisper", "audio"),
                       ("chat", "chat")):
        line = (f'corral_capability_requests_total{{capability="{cap}",model="{model}",'
                f'status="200"}}')
        assert line in text, text[-3000:]


async def test_a_burst_of_images_speech_and_chat_under_one_instance_is_all_answered(
        corral: Any, tmp_path: Path, sdk: Any) -> None:
    client = await corral(media_cfg(tmp_path))
    api = sdk(client)

    async def speech(i: int) -> bytes:
        r = await api.audio.speech.create(model="tts", voice="am_adam", input=f"line {i}")
        return r.content

    # sd-server runs one generation at a time: each call holds its slot to the end.
    alone = await asyncio.gather(*(api.images.generate(model="sd", prompt=f"a{i}")
                                   for i in range(3)))
    assert all(a.data for a in alone)
    [sd] = sched(client).instances()
    assert sd.spec is not None
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{sd.spec.port}/fake/stats") as r:
        assert await r.json() == {"served": 3, "most_at_once": 1}

    calls = [api.images.generate(model="sd", prompt=f"p{i}") for i in range(3)]
    results = await asyncio.gather(*calls, chat(api), speech(1), chat(api), speech(2))
    for i in range(3):
        data = results[i].data
        assert data is not None and base64.b64decode(data[0].b64_json or "") == image_bytes(
            f"p{i}", 0, 1024)
    assert results[3] and results[5]
    assert results[4] == speech_bytes("line 1", CHUNKS, CHUNK)
    assert results[6] == speech_bytes("line 2", CHUNKS, CHUNK)


async def test_streamed_speech_and_partial_images_pass_through(
        corral: Any, tmp_path: Path, sdk: Any) -> None:
    client = await corral(media_cfg(tmp_path))
    api = sdk(client)
    stream = await api.images.generate(model="sd", prompt="a barn", stream=True,
                                       partial_images=2)
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"]
    assert base64.b64decode(events[-1].b64_json) == image_bytes("a barn", 0, 1024)

    r = await client.post("/v1/audio/speech", json={
        "model": "tts", "input": "sse please", "voice": "af_bella", "stream_format": "sse"})
    assert r.status == 200 and r.content_type == "text/event-stream"
    audio = b""
    async for line in r.content:
        if line.startswith(b"data: ") and b"speech.audio.delta" in line:
            audio += base64.b64decode(json.loads(line[6:])["audio"])
    assert audio == speech_bytes("sse please", CHUNKS, CHUNK)


async def test_voices_sdapi_and_models_left_out(corral: Any, tmp_path: Path, sdk: Any) -> None:
    client = await corral(media_cfg(tmp_path))
    r = await client.get("/v1/audio/voices", params={"model": "tts"})
    assert r.status == 200 and (await r.json())["voices"] == ["af_bella", "am_adam"]
    # One speech model: a call that names none is its.
    r = await client.get("/v1/audio/voices")
    assert r.status == 200, await r.text()

    r = await client.get("/sdapi/v1/sd-models")
    assert [m["model_name"] for m in await r.json()] == ["sd"]
    # The WebUI names no model, or its checkpoint in override_settings.
    for body in ({"prompt": "a cow", "batch_size": 2},
                 {"prompt": "a cow", "batch_size": 2,
                  "override_settings": {"sd_model_checkpoint": "sd"}}):
        r = await client.post("/sdapi/v1/txt2img", json=body)
        assert r.status == 200, await r.text()
        images = (await r.json())["images"]
        assert [base64.b64decode(i) for i in images] == [
            image_bytes("a cow", 0, 1024), image_bytes("a cow", 1, 1024)]
    r = await client.post("/sdapi/v1/img2img", json={
        "prompt": "a cow", "init_images": [b64(b"x" * 3000)],
        "override_settings": {"sd_model_checkpoint": "chat"}})
    assert r.status == 400 and "sd" in (await r.json())["error"]["message"]
    api = sdk(client)
    made = await api.images.generate(prompt="no model named")
    assert made.data is not None and made.data[0].b64_json
    # With two image models, one must be named: the 400 says which there are.
    cfg = media_cfg(tmp_path / "two")
    second = cfg.models[1].model_copy(update={"name": "sd2"})
    two = await corral(cfg.model_copy(update={"models": (*cfg.models, second)}))
    r = await two.post("/v1/images/generations", json={"prompt": "which?"})
    message = (await r.json())["error"]["message"]
    assert r.status == 400 and "image: sd, sd2" in message, message


async def test_a_model_without_the_capability_gets_the_400_naming_those_with_it(
        corral: Any, tmp_path: Path) -> None:
    client = await corral(media_cfg(tmp_path))
    cases = [("/v1/audio/speech", {"model": "chat", "input": "x"}, "tts"),
             ("/v1/images/generations", {"model": "tts", "prompt": "x"}, "sd"),
             ("/sdapi/v1/txt2img", {"model": "whisper", "prompt": "x"}, "sd")]
    for path, body, able in cases:
        r = await client.post(path, json=body)
        message = (await r.json())["error"]["message"]
        assert r.status == 400 and able in message, (path, message)
    form = aiohttp.FormData()
    form.add_field("model", "chat")
    form.add_field("image", b"abc", filename="a.png")
    r = await client.post("/v1/images/edits", data=form)
    assert r.status == 400 and "sd" in (await r.json())["error"]["message"]
    assert sched(client).instances() == []  # nothing launched for them
    # llama-server's own API is not the media engines': a 400 before any launch.
    r = await client.post("/tokenize", json={"model": "tts", "content": "x"})
    assert r.status == 400 and "does not speak native" in (await r.json())["error"]["message"]
    assert sched(client).instances() == []
    # sd-server's errors are {"error": "..."}: in OpenAI's envelope, its status kept.
    r = await client.post("/sdapi/v1/txt2img", json={"prompt": ""})
    assert r.status == 400 and (await r.json())["error"]["message"] == "prompt required"


async def test_a_large_image_answer_is_relayed_whole(corral: Any, tmp_path: Path) -> None:
    cfg = media_cfg(tmp_path, image_seconds=0.1)
    sd = cfg.models[1].model_copy(update={"env": {"FAKE_IMAGE_BYTES": str(6 << 20),
                                                  "FAKE_IMAGE_SECONDS": "0.1"}})
    client = await corral(cfg.model_copy(update={"models": (cfg.models[0], sd)}))
    r = await client.post("/v1/images/generations", json={"model": "sd", "prompt": "big"})
    assert r.status == 200
    body = await r.json()
    assert base64.b64decode(body["data"][0]["b64_json"]) == image_bytes("big", 0, 6 << 20)


class _Peak:
    """The most this process's RSS grew over its start while a block ran."""

    def __init__(self) -> None:
        self._me = psutil.Process(os.getpid())
        self.before = self.peak = 0
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Peak:
        self.before = self.peak = self._me.memory_info().rss
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done.set()
        assert self._task is not None
        await self._task

    async def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._me.memory_info().rss)
            await asyncio.sleep(0.01)

    @property
    def grew(self) -> int:
        return self.peak - self.before


@pytest.mark.parametrize("what", ["speech", "image"])
async def test_large_answers_are_relayed_chunk_by_chunk_not_held(
        corral: Any, tmp_path: Path, what: str) -> None:
    """A 200 MB speech answer (chunked) and an 80 MB image answer (one JSON body with a
    Content-Length): Corral's RSS grows by far less than either, read as they come."""
    speech_env = {"FAKE_SPEECH_CHUNKS": "800", "FAKE_SPEECH_CHUNK": str(256 << 10),
                  "FAKE_SPEECH_PACE": "0"}
    image_env = {"FAKE_IMAGE_BYTES": str(60 << 20), "FAKE_IMAGE_SECONDS": "0"}
    cfg = media_cfg(tmp_path)
    models = [m.model_copy(update={"env": speech_env if m.name == "tts" else image_env})
              for m in cfg.models if m.name in ("sd", "tts")]
    client = await corral(cfg.model_copy(update={"models": tuple(models)}))
    if what == "speech":
        path, body = "/v1/audio/speech", {"model": "tts", "input": "long"}
        expected = hashlib.sha256()
        for i in range(800):
            expected.update(speech_chunk("long", i, 256 << 10))
        want = expected.hexdigest()
    else:
        path, body = "/v1/images/generations", {"model": "sd", "prompt": "huge"}
        want = None
    warm = await client.post(path, json={**body, "n": 1} if what == "image" else {
        **body, "input": "warm"})
    await warm.read()  # the instance is up before measuring
    got = hashlib.sha256()
    size = 0
    async with _Peak() as peak:
        r = await client.post(path, json=body)
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1 << 20):
            got.update(chunk)
            size += len(chunk)
    if want is not None:
        assert (size, got.hexdigest()) == (800 * (256 << 10), want)
    else:
        assert size > 80 << 20  # 60 MB as base64
    # The test client, Corral and its upstream client share this process: 40 MB of
    # slack for all of them.
    assert peak.grew < 40 << 20, peak.grew >> 20


@pytest.mark.parametrize("files_first", [True, False])
async def test_an_edit_form_of_several_files_streams_through(
        corral: Any, tmp_path: Path, files_first: bool) -> None:
    client = await corral(media_cfg(tmp_path, image_seconds=0.05))
    parts = [("image", b"A" * 300_000, "a.png"), ("image", b"B" * 200_000, "b.png"),
             ("mask", b"M" * 1000, "m.png")]
    form = aiohttp.FormData()
    if not files_first:
        form.add_field("model", "sd")
    for name, data, filename in parts:
        form.add_field(name, data, filename=filename, content_type="image/png")
    form.add_field("prompt", "merge them")
    if files_first:
        form.add_field("model", "sd")
    r = await client.post("/v1/images/edits", data=form)
    assert r.status == 200, await r.text()
    files = (await r.json())["corral_test"]["files"]
    assert sorted(files.values()) == sorted(
        [len(d), hashlib.sha256(d).hexdigest()] for _, d, _ in parts)


async def test_a_streamed_image_shows_loading_as_comments_only(
        corral: Any, tmp_path: Path) -> None:
    cfg = media_cfg(tmp_path)
    sd = cfg.models[1].model_copy(update={"env": {"FAKE_LOAD_DELAY": "1.5",
                                                  "FAKE_IMAGE_SECONDS": "0.1"}})
    client = await corral(cfg.model_copy(update={"models": (cfg.models[0], sd)}))
    r = await client.post("/v1/images/generations", headers={"X-Corral-Loading": "visible"},
                          json={"model": "sd", "prompt": "slow", "stream": True})
    assert r.status == 200 and r.content_type == "text/event-stream"
    text = (await r.read()).decode()
    # sd-server loads before it listens: the wait shows as SSE comments, never as a
    # chat chunk an image client would choke on; then the events.
    assert text.startswith(": loading sd"), text[:200]
    assert "chat.completion.chunk" not in text
    assert "event: image_generation.completed" in text


@pytest.mark.parametrize("files_first", [True, False])
async def test_a_form_of_too_many_files_is_refused(
        corral: Any, tmp_path: Path, files_first: bool) -> None:
    client = await corral(media_cfg(tmp_path, image_seconds=0.05))
    form = aiohttp.FormData()
    if not files_first:
        form.add_field("model", "sd")
    for i in range(33):
        form.add_field("image", b"x" * 100, filename=f"{i}.png", content_type="image/png")
    if files_first:
        form.add_field("model", "sd")
    r = await client.post("/v1/images/edits", data=form)
    assert r.status == 400, await r.text()
    assert "at most 32 files" in (await r.json())["error"]["message"]


async def test_an_upload_over_its_limit_midway_is_a_413_not_an_upstream_failure(
        corral: Any, tmp_path: Path) -> None:
    """A chunked form (no Content-Length) passes the edit route's 512 MiB midway, after
    the call was leased and its file began to stream on: the client's 413, and the
    engine is not taken for failing (it stays up and serves the next call)."""
    client = await corral(media_cfg(tmp_path, image_seconds=0.05))

    async def big() -> Any:
        chunk = b"\0" * (4 << 20)
        for _ in range(130):  # 520 MiB
            yield chunk

    form = aiohttp.FormData()
    form.add_field("model", "sd")
    form.add_field("image", big(), filename="huge.png", content_type="image/png")
    r = await client.post("/v1/images/edits", data=form)
    assert r.status == 413, await r.text()
    [sd] = sched(client).instances()
    r = await client.post("/v1/images/generations", json={"model": "sd", "prompt": "next"})
    assert r.status == 200
    assert sched(client).instances() == [sd]


async def test_speech_bytes_reach_the_client_while_the_engine_still_synthesises(
        corral: Any, tmp_path: Path) -> None:
    """The engine sends its first chunk, then waits to be released: the client has
    that chunk through Corral before the engine writes the rest."""
    cfg = media_cfg(tmp_path)
    tts = cfg.models[2].model_copy(update={"env": {"FAKE_SPEECH_HOLD": "1"}})
    client = await corral(cfg.model_copy(update={"models": (tts,)}))
    r = await client.post("/v1/audio/speech", json={"model": "tts", "input": "held"})
    assert r.status == 200
    first = b""
    async with asyncio.timeout(10):
        while len(first) < CHUNK:
            first += await r.content.readany()
    assert first == speech_chunk("held", 0, CHUNK)
    [inst] = sched(client).instances()
    assert inst.spec is not None
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{inst.spec.port}/fake/release") as released:
        assert released.status == 200
    assert first + await r.read() == speech_bytes("held", CHUNKS, CHUNK)
