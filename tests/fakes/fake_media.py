"""A fake speech and image engine: ``fake_media.py --host H --port P [...]``.

It stands in for stable-diffusion.cpp's ``sd-server`` (OpenAI's image routes, the
stable-diffusion WebUI's ``/sdapi/v1/*``, ``GET /`` once up) and for an
OpenAI-compatible TTS server such as Kokoro-FastAPI (``/v1/audio/speech`` streamed at
a pace, ``stream_format = "sse"``, ``/v1/audio/voices``, ``/health``), plus
``/v1/audio/translations``. Unknown flags are ignored (sd-server's ``-m FILE``, a
model's args).

Its answers are deterministic, so a test can check every byte that came through:

* speech: ``FAKE_SPEECH_CHUNKS`` chunks (default 8) of ``FAKE_SPEECH_CHUNK`` bytes
  (default 4096), one every ``FAKE_SPEECH_PACE`` seconds (default 0.02); see
  ``speech_bytes()``;
* images: each generation takes ``FAKE_IMAGE_SECONDS`` (default 1.0) and one image
  is ``FAKE_IMAGE_BYTES`` bytes (default 1024); see ``image_bytes()``; uploaded files
  are described back (name, size, sha256) under ``corral_test`` in the answer;
* ``FAKE_SPEECH_HOLD=1``: after the first chunk of a speech answer, wait for
  ``POST /fake/release`` before the rest (a test shows the first bytes arrived first);
* ``FAKE_LOAD_DELAY`` seconds before it listens (sd-server loads first);
* ``GET /fake/stats``: generations served and the most ever run at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import time
from typing import Any

import aiohttp
from aiohttp import web

VOICES = ["af_bella", "am_adam"]


def speech_chunk(text: str, index: int, size: int) -> bytes:
    """Chunk ``index`` of the audio the fake answers for ``text``."""
    seed = hashlib.sha256(f"{text}\0{index}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def speech_bytes(text: str, chunks: int, size: int) -> bytes:
    """The whole audio the fake answers for ``text``."""
    return b"".join(speech_chunk(text, i, size) for i in range(chunks))


def image_bytes(prompt: str, index: int, size: int) -> bytes:
    """Image ``index`` of a generation for ``prompt`` (its PNG signature first)."""
    seed = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    body = seed * (size // 32 + 1)
    return (b"\x89PNG\r\n\x1a\n" + body)[:size]


class Engine:
    def __init__(self) -> None:
        self.image_seconds = float(os.environ.get("FAKE_IMAGE_SECONDS", "1.0"))
        self.image_size = int(os.environ.get("FAKE_IMAGE_BYTES", "1024"))
        self.chunks = int(os.environ.get("FAKE_SPEECH_CHUNKS", "8"))
        self.chunk = int(os.environ.get("FAKE_SPEECH_CHUNK", "4096"))
        self.pace = float(os.environ.get("FAKE_SPEECH_PACE", "0.02"))
        self.hold = os.environ.get("FAKE_SPEECH_HOLD") == "1"
        self.released = asyncio.Event()
        self.running = 0
        self.most = 0
        self.served = 0

    async def generate(self) -> None:
        """One generation: holds the engine for its whole duration."""
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.image_seconds)
        finally:
            self.running -= 1
            self.served += 1


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}},
                             status=status)


async def _json(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def routes(engine: Engine) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/")
    async def root(_: web.Request) -> web.Response:
        return web.Response(text="Stable Diffusion Server is running")

    @r.get("/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    @r.get("/fake/stats")
    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"served": engine.served, "most_at_once": engine.most})

    @r.post("/fake/release")
    async def release(_: web.Request) -> web.Response:
        engine.released.set()
        return web.json_response({"released": True})

    @r.get("/v1/audio/voices")
    async def voices(_: web.Request) -> web.Response:
        return web.json_response({"voices": VOICES})

    @r.post("/v1/audio/speech")
    async def speech(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        if body is None or not isinstance(body.get("input"), str) or not body["input"]:
            return _error(400, "'input' is required")
        if body.get("voice", VOICES[0]) not in VOICES:
            return _error(400, f"unknown voice {body.get('voice')!r}")
        text = body["input"]
        sse = body.get("stream_format") == "sse"
        out = web.StreamResponse()
        out.content_type = "text/event-stream" if sse else {
            "wav": "audio/wav", "pcm": "audio/pcm", "opus": "audio/opus",
            "flac": "audio/flac", "aac": "audio/aac"}.get(
                str(body.get("response_format")), "audio/mpeg")
        await out.prepare(request)
        for i in range(engine.chunks):
            part = speech_chunk(text, i, engine.chunk)
            if engine.pace:
                await asyncio.sleep(engine.pace)
            if i == 1 and engine.hold:
                await engine.released.wait()
            if sse:
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(part).decode()}
                await out.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            else:
                await out.write(part)
        if sse:
            done = {"type": "speech.audio.done",
                    "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}}
            await out.write(b"data: " + json.dumps(done).encode() + b"\n\n")
        await out.write_eof()
        return out

    @r.post("/v1/audio/translations")
    async def translations(request: web.Request) -> web.Response:
        form = await _form(request)
        if "file" not in form["files"]:
            return _error(400, "'file' is required")
        size, digest = form["files"]["file"]
        return web.json_response({"text": f"{size} bytes sha256 {digest}"})

    @r.post("/v1/images/generations")
    async def generations(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        if body is None or not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return _error(400, "'prompt' is required")
        return await _images(request, engine, body, {})

    @r.post("/v1/images/edits")
    @r.post("/v1/images/variations")
    async def edits(request: web.Request) -> web.StreamResponse:
        form = await _form(request)
        if not form["files"]:
            return _error(400, "an image file is required")
        fields = form["fields"]
        body: dict[str, Any] = {"prompt": fields.get("prompt", "variation"),
                                "n": int(fields.get("n", "1")),
                                "response_format": fields.get("response_format", "b64_json"),
                                "stream": fields.get("stream") == "true",
                                "partial_images": int(fields.get("partial_images", "0"))}
        return await _images(request, engine, body, form["files"])

    @r.post("/sdapi/v1/txt2img")
    @r.post("/sdapi/v1/img2img")
    async def sdapi(request: web.Request) -> web.Response:
        body = await _json(request)
        if body is None or not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return web.json_response({"error": "prompt required"}, status=400)
        await engine.generate()
        n = body.get("batch_size", 1)
        if not isinstance(n, int) or not 1 <= n <= 8:
            return web.json_response({"error": "batch_size must be in range [1, 8]"}, status=400)
        images = [base64.b64encode(image_bytes(body["prompt"], i, engine.image_size)).decode()
                  for i in range(n)]
        return web.json_response({"images": images, "parameters": body, "info": ""})

    @r.get("/sdapi/v1/sd-models")
    async def sd_models(_: web.Request) -> web.Response:
        return web.json_response([{"title": "fake", "model_name": "fake"}])

    return r


async def _form(request: web.Request) -> dict[str, Any]:
    """Fields as text; files as (size, sha256), read a chunk at a time."""
    fields: dict[str, str] = {}
    files: dict[str, tuple[int, str]] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        name = part.name or ""
        if part.filename is None:
            fields[name] = (await part.read()).decode()
            continue
        digest = hashlib.sha256()
        size = 0
        while chunk := await part.read_chunk(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        key = name if name not in files else f"{name}#{len(files)}"
        files[key] = (size, digest.hexdigest())
    return {"fields": fields, "files": files}


async def _images(request: web.Request, engine: Engine, body: dict[str, Any],
                  files: dict[str, tuple[int, str]]) -> web.StreamResponse:
    prompt = str(body["prompt"])
    n = body.get("n") or 1
    if not isinstance(n, int) or not 1 <= n <= 8:
        return _error(400, "'n' must be 1 to 8")
    if body.get("stream"):
        partials = body.get("partial_images") or 0
        if not isinstance(partials, int) or not 0 <= partials <= 3:
            return _error(400, "'partial_images' must be 0 to 3")
        return await _image_stream(request, engine, prompt, partials)
    await engine.generate()
    data = []
    for i in range(n):
        if body.get("response_format") == "url":
            host = request.host
            data.append({"url": f"http://{host}/files/{i}.png"})
        else:
            data.append({"b64_json": base64.b64encode(
                image_bytes(prompt, i, engine.image_size)).decode()})
    return web.json_response({"created": int(time.time()), "data": data,
                              "corral_test": {"files": files}})


async def _image_stream(request: web.Request, engine: Engine, prompt: str,
                        partials: int) -> web.StreamResponse:
    out = web.StreamResponse()
    out.content_type = "text/event-stream"
    await out.prepare(request)
    common = {"background": "opaque", "created_at": int(time.time()), "output_format": "png",
              "quality": "auto", "size": "512x512"}
    engine.running += 1
    engine.most = max(engine.most, engine.running)
    try:
        for i in range(partials):
            await asyncio.sleep(engine.image_seconds / (partials + 1))
            event = {"type": "image_generation.partial_image", "partial_image_index": i,
                     "b64_json": base64.b64encode(image_bytes(prompt, 100 + i, 64)).decode(),
                     **common}
            await out.write(b"event: image_generation.partial_image\ndata: "
                            + json.dumps(event).encode() + b"\n\n")
        await asyncio.sleep(engine.image_seconds / (partials + 1))
    finally:
        engine.running -= 1
        engine.served += 1
    done = {"type": "image_generation.completed",
            "b64_json": base64.b64encode(image_bytes(prompt, 0, engine.image_size)).decode(),
            "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
                      "input_tokens_details": {"image_tokens": 0, "text_tokens": 1}},
            **common}
    await out.write(b"event: image_generation.completed\ndata: "
                    + json.dumps(done).encode() + b"\n\n")
    await out.write_eof()
    return out


@web.middleware
async def bad_input(request: web.Request, handler: Any) -> web.StreamResponse:
    """What a form's text fields fail to parse as is the caller's error, not a 500."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except (ValueError, AssertionError) as e:
        return _error(400, f"bad request: {e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", "--listen-ip", default="127.0.0.1")
    parser.add_argument("--port", "--listen-port", type=int, required=True)
    args, unknown = parser.parse_known_args()
    print(f"fake-media: ignoring {unknown}", flush=True)
    time.sleep(float(os.environ.get("FAKE_LOAD_DELAY", "0")))
    app = web.Application(client_max_size=1 << 30, middlewares=[bad_input])
    app.add_routes(routes(Engine()))
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
