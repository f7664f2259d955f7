"""The fake llama-server itself, run as a real child process on a loopback port.

Other integration tests trust the fake's wire shapes, slot limits and fault modes to
stand for llama-server's; these tests hold it to that.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.fakes import FAKE_SERVER, fake_binary, free_port, write_dummy_gguf

# Every wait is bounded: a broken fake must fail a test, never hang the suite.
START_WITHIN = 10.0
EXIT_WITHIN = 5.0


@dataclass
class Fake:
    proc: subprocess.Popen[bytes]
    url: str
    out: Path
    err: Path
    http: aiohttp.ClientSession

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as r:
            return r.status, await r.json(content_type=None)

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as r:
            return r.status, await r.json(content_type=None)

    async def stats(self) -> dict[str, Any]:
        status, body = await self.get("/fake/stats")
        assert status == 200
        return dict(body)

    async def wait_exit(self, within: float = EXIT_WITHIN) -> int:
        return await asyncio.to_thread(self.proc.wait, within)


async def wait_until(
    pred: Callable[[], Awaitable[bool]], within: float = 5.0, step: float = 0.02
) -> None:
    deadline = time.monotonic() + within
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within:.1f} s")
        await asyncio.sleep(step)


@asynccontextmanager
async def run_fake(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True
) -> AsyncIterator[Fake]:
    """Start the fake through the wrapper Corral runs; kill its process group on exit."""
    binary = fake_binary(tmp_path / "bin")
    model = write_dummy_gguf(tmp_path / "model.gguf")
    port = free_port()
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as fo, err.open("wb") as fe:
        # Its own session: the finally block kills the whole group, whatever it started.
        proc = await asyncio.to_thread(
            subprocess.Popen,
            argv,
            stdout=fo,
            stderr=fe,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            fake = Fake(proc, f"http://127.0.0.1:{port}", out, err, http)
            if wait_ready:

                async def ready() -> bool:
                    assert proc.poll() is None, err.read_text()
                    try:
                        return (await fake.get("/health"))[0] == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_until(ready, START_WITHIN)
            yield fake
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, EXIT_WITHIN)


def answering_503(fake: Fake) -> Callable[[], Awaitable[bool]]:
    """A predicate: the fake listens and reports that it is loading."""

    async def check() -> bool:
        try:
            return (await fake.get("/health"))[0] == 503
        except aiohttp.ClientConnectionError:
            return False

    return check


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    return [line.strip() async for line in resp.content if line.strip()]


def chat(content: str = "one two three", **kw: Any) -> dict[str, Any]:
    return {"model": "my-model", "messages": [{"role": "user", "content": content}], **kw}


# --- shapes -----------------------------------------------------------------------------


async def test_status_endpoints(tmp_path: Path) -> None:
    async with run_fake(tmp_path, "--parallel", "3", "-c", "6000", "--metrics") as fake:
        assert await fake.get("/health") == (200, {"status": "ok"})

        status, props = await fake.get("/props")
        assert status == 200
        assert props["default_generation_settings"]["n_ctx"] == 2000  # -c is across slots
        assert props["total_slots"] == 3
        assert props["model_path"].endswith("model.gguf")
        assert props["build_info"]

        status, slots = await fake.get("/slots")
        assert [(s["id"], s["is_processing"]) for s in slots] == [
            (0, False),
            (1, False),
            (2, False),
        ]

        status, models = await fake.get("/v1/models")
        assert models["object"] == "list"
        assert models["data"][0]["id"].endswith("model.gguf")
        assert models["data"][0]["owned_by"] == "llamacpp"

        async with fake.http.get(fake.url + "/metrics") as r:
            assert r.status == 200
            text = await r.text()
        assert "# TYPE llamacpp:prompt_tokens_total counter" in text
        assert "llamacpp:requests_processing 0" in text


async def test_optional_endpoints_answer_501_when_off(tmp_path: Path) -> None:
    async with run_fake(tmp_path) as fake:
        status, body = await fake.get("/metrics")
        assert status == 501
        assert body["error"]["type"] == "not_supported_error"
        status, body = await fake.post("/v1/embeddings", {"input": "x"})
        assert status == 501
        assert body["error"]["code"] == 501


async def test_alias_names_the_model_and_unknown_flags_are_ignored(tmp_path: Path) -> None:
    args = ("--alias", "gemma", "-ctk", "q8_0", "-fa", "on", "--jinja", "-ngl", "99", "-t", "2")
    async with run_fake(tmp_path, *args) as fake:
        _, models = await fake.get("/v1/models")
        assert models["data"][0]["id"] == "gemma"
        stats = await fake.stats()
        # -ctk must not be read as "-c tk": only exact known options are parsed.
        assert stats["ignored_args"] == ["-ctk", "q8_0", "-fa", "on", "--jinja"]


async def test_chat_completion_non_streaming(tmp_path: Path) -> None:
    async with run_fake(tmp_path) as fake:
        status, body = await fake.post("/v1/chat/completions", chat(max_tokens=4))
        assert status == 200
        assert body["object"] == "chat.completion"
        assert body["model"] == "my-model"
        assert body["id"].startswith("chatcmpl-")
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "one two three one"}
        assert choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 4
        assert body["usage"]["total_tokens"] == 4 + body["usage"]["prompt_tokens"]
        assert body["timings"]["predicted_n"] == 4

        # No max_tokens: 8 tokens, then a natural stop.
        _, body = await fake.post("/v1/chat/completions", chat("hi"))
        assert body["choices"][0]["message"]["content"] == " ".join(["hi"] * 8)
        assert body["choices"][0]["finish_reason"] == "stop"


async def test_chat_completion_streaming(tmp_path: Path) -> None:
    async with run_fake(tmp_path) as fake:
        body = chat(max_tokens=3, stream=True, stream_options={"include_usage": True})
        async with fake.http.post(fake.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.read()
        # Every event is one "data: ..." line followed by a blank line.
        events = raw.split(b"\n\n")
        assert events[-1] == b""
        assert events[-2] == b"data: [DONE]"
        chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert all(c["model"] == "my-model" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        content = [c["choices"][0]["delta"]["content"] for c in chunks[1:4]]
        assert content == ["one", " two", " three"]
        assert chunks[4]["choices"][0] == {"finish_reason": "length", "index": 0, "delta": {}}
        assert chunks[5]["choices"] == []
        assert chunks[5]["usage"]["completion_tokens"] == 3
        assert "timings" in chunks[5]
        assert all("timings" not in c for c in chunks[:5])

        # Without include_usage the finish chunk is the last and carries the timings.
        async with fake.http.post(
            fake.url + "/v1/chat/completions", json=chat(max_tokens=2, stream=True)
        ) as r:
            events2 = await sse_events(r)
        last = json.loads(events2[-2].removeprefix(b"data: "))
        assert last["choices"][0]["finish_reason"] == "length"
        assert "timings" in last
        assert "usage" not in last


async def test_text_completions(tmp_path: Path) -> None:
    async with run_fake(tmp_path) as fake:
        status, body = await fake.post(
            "/v1/completions", {"model": "m", "prompt": "alpha beta", "max_tokens": 3}
        )
        assert status == 200
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == "alpha beta alpha"
        assert body["usage"]["prompt_tokens"] == 2

        req = {"model": "m", "prompt": "alpha", "max_tokens": 2, "stream": True}
        async with fake.http.post(fake.url + "/v1/completions", json=req) as r:
            events = await sse_events(r)
        assert events[-1] == b"data: [DONE]"
        chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
        assert [c["choices"][0]["text"] for c in chunks] == ["alpha", " alpha", ""]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_embeddings_and_tokenize(tmp_path: Path) -> None:
    async with run_fake(tmp_path, "--embedding") as fake:
        status, body = await fake.post("/v1/embeddings", {"model": "e", "input": ["a b", "c"]})
        assert status == 200
        assert body["object"] == "list"
        assert body["model"] == "e"
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        vectors = [d["embedding"] for d in body["data"]]
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert all(len(v) == 8 for v in vectors)
        assert all(math.isclose(math.hypot(*v), 1.0) for v in vectors)
        _, again = await fake.post("/v1/embeddings", {"input": "a b"})
        assert again["data"][0]["embedding"] == vectors[0]

        status, tokens = await fake.post("/tokenize", {"content": "hello world hello"})
        assert status == 200
        ids = tokens["tokens"]
        assert len(ids) == 3
        assert ids[0] == ids[2]


async def test_errors_have_llama_server_shape(tmp_path: Path) -> None:
    async with run_fake(tmp_path, "--api-key", "sekrit") as fake:
        status, body = await fake.post("/v1/chat/completions", chat())
        assert status == 401
        assert body["error"]["type"] == "authentication_error"
        # /health needs no key.
        assert (await fake.get("/health"))[0] == 200
        async with fake.http.get(
            fake.url + "/nowhere", headers={"Authorization": "Bearer sekrit"}
        ) as r:
            status, body = r.status, await r.json()
        assert status == 404
        assert body["error"]["type"] == "not_found_error"


# --- slots and disconnects --------------------------------------------------------------


async def test_slots_limit_concurrency(tmp_path: Path) -> None:
    env = {"FAKE_TOKEN_DELAY": "0.05"}
    async with run_fake(tmp_path, "--parallel", "2", env=env) as fake:
        calls = [
            asyncio.create_task(fake.post("/v1/chat/completions", chat(max_tokens=4)))
            for _ in range(6)
        ]
        try:

            async def two_busy() -> bool:
                _, slots = await fake.get("/slots")
                return [s["is_processing"] for s in slots] == [True, True]

            await wait_until(two_busy)
            results = await asyncio.wait_for(asyncio.gather(*calls), 10)
        finally:
            for c in calls:
                c.cancel()
        assert [status for status, _ in results] == [200] * 6
        stats = await fake.stats()
        assert stats["max_concurrent"] == 2
        assert stats["requests"] == 6
        assert stats["deferred"] >= 1
        assert stats["max_in_flight"] > 2
        assert stats["processing"] == 0
        _, slots = await fake.get("/slots")
        assert not any(s["is_processing"] for s in slots)


async def test_token_delay_paces_non_streaming_replies(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_TOKEN_DELAY": "0.05"}) as fake:
        started = time.monotonic()
        status, _ = await fake.post("/v1/chat/completions", chat(max_tokens=4))
        assert status == 200
        assert time.monotonic() - started >= 0.2


async def test_stream_client_disconnect_is_counted(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_TOKEN_DELAY": "0.05"}) as fake:
        body = chat(max_tokens=100, stream=True)
        async with fake.http.post(fake.url + "/v1/chat/completions", json=body) as r:
            await r.content.readline()  # the role chunk
            await r.content.readline()
            await r.content.readline()  # the first content chunk
            r.close()  # drop the connection, as a client that went away

        async def cancelled() -> bool:
            stats = await fake.stats()
            return bool(stats["cancelled"] == 1 and stats["processing"] == 0)

        await wait_until(cancelled)
        assert "client disconnected" in fake.out.read_text()


async def test_one_log_line_per_request_on_stdout(tmp_path: Path) -> None:
    async with run_fake(tmp_path) as fake:
        await fake.post("/v1/chat/completions", chat())
        await fake.get("/props")

        async def logged() -> bool:
            text = fake.out.read_text()
            return "POST /v1/chat/completions" in text and "GET /props" in text

        await wait_until(logged)


# --- faults and lifecycle ---------------------------------------------------------------


async def test_load_delay_answers_loading_then_ok(tmp_path: Path) -> None:
    env = {"FAKE_LOAD_DELAY": "0.6"}
    async with run_fake(tmp_path, env=env, wait_ready=False) as fake:
        await wait_until(answering_503(fake))
        status, body = await fake.get("/health")
        assert (status, body) == (
            503,
            {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
        )
        # Inference is refused while loading, as llama-server does.
        assert (await fake.post("/v1/chat/completions", chat()))[0] == 503

        async def ok() -> bool:
            return (await fake.get("/health"))[0] == 200

        await wait_until(ok, within=5)


async def test_hang_never_turns_ready(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_HANG": "1"}, wait_ready=False) as fake:
        await wait_until(answering_503(fake))
        await asyncio.sleep(0.5)
        assert (await fake.get("/health"))[0] == 503
        assert fake.proc.poll() is None


async def test_crash_at_start(tmp_path: Path) -> None:
    env = {"FAKE_CRASH_AT_START": "1"}
    async with run_fake(tmp_path, env=env, wait_ready=False) as fake:
        assert await fake.wait_exit() == 1
        assert "failed to load model" in fake.err.read_text()


async def test_crash_after_chunks(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_CRASH_AFTER_CHUNKS": "2"}) as fake:
        received: list[bytes] = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async with fake.http.post(
                fake.url + "/v1/chat/completions", json=chat(max_tokens=10, stream=True)
            ) as r:
                async for line in r.content:
                    if line.strip():
                        received.append(line.strip())
        content = [json.loads(e.removeprefix(b"data: ")) for e in received[1:]]
        assert [c["choices"][0]["delta"]["content"] for c in content] == ["one", " two"]
        assert await fake.wait_exit() == 1


async def test_exit_after_crashes_while_idle(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_EXIT_AFTER": "0.5"}) as fake:
        assert await fake.wait_exit() == 1


async def test_sigterm_exits_zero_quickly_mid_stream(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_TOKEN_DELAY": "0.2"}) as fake:
        assert psutil.Process(fake.proc.pid).children(recursive=True) == []
        body = chat(max_tokens=100, stream=True)
        async with fake.http.post(fake.url + "/v1/chat/completions", json=body) as r:
            await r.content.readline()
            started = time.monotonic()
            fake.proc.send_signal(signal.SIGTERM)
            assert await fake.wait_exit() == 0
            assert time.monotonic() - started < 2.0


def test_fake_runs_with_this_interpreter(tmp_path: Path) -> None:
    wrapper = fake_binary(tmp_path)
    text = wrapper.read_text()
    assert text.startswith("#!/bin/sh\nexec ")
    assert str(FAKE_SERVER) in text
    assert os.access(wrapper, os.X_OK)


async def test_sigterm_while_loading_exits_zero(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_HANG": "1"}, wait_ready=False) as fake:
        await wait_until(answering_503(fake))
        fake.proc.send_signal(signal.SIGTERM)
        assert await fake.wait_exit() == 0


async def test_non_streaming_client_disconnect_is_counted(tmp_path: Path) -> None:
    async with run_fake(tmp_path, env={"FAKE_TOKEN_DELAY": "0.05"}) as fake:
        with pytest.raises(TimeoutError):
            # The client gives up after 0.2 s of a 2.5 s answer and closes the connection.
            await fake.http.post(
                fake.url + "/v1/chat/completions",
                json=chat(max_tokens=50),
                timeout=aiohttp.ClientTimeout(total=0.2),
            )

        async def cancelled() -> bool:
            stats = await fake.stats()
            return bool(stats["cancelled"] == 1 and stats["processing"] == 0)

        await wait_until(cancelled)
