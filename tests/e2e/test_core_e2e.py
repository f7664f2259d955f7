"""The core through the real llama-server and Gemma 3 270M, with the `openai` package."""

from __future__ import annotations

import concurrent.futures
import http.server
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, model_toml, reaped, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def client(tidy: Callable[[openai.OpenAI], openai.OpenAI]) -> Callable[[CorralProc], openai.OpenAI]:
    """An OpenAI client of a Corral, closed when the test ends."""

    def make(c: CorralProc) -> openai.OpenAI:
        return tidy(openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=120))

    return make


def admin(c: CorralProc, path: str) -> dict:
    r = httpx.get(c.url + path, timeout=10)
    r.raise_for_status()
    return r.json()


def states(c: CorralProc) -> dict[str, str]:
    return {m["name"]: m["state"] for m in admin(c, "/admin/models")["models"]}


def test_list_chat_and_stream(client, corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, aliases=["g"]))
    oc = client(c)
    assert [m.id for m in oc.models.list().data] == ["gemma", "g"]

    resp = oc.chat.completions.create(model="g", messages=HELLO, max_tokens=8)
    assert resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens > 0

    stream = oc.chat.completions.create(
        model="gemma", messages=HELLO, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text
    assert usage is not None and usage.completion_tokens > 0

    comp = oc.completions.create(model="gemma", prompt="Once upon a time", max_tokens=5)
    assert comp.choices[0].text


def test_unknown_model_is_not_found(client, corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma))
    with pytest.raises(openai.NotFoundError) as exc:
        client(c).chat.completions.create(model="nope", messages=HELLO)
    assert "gemma" in str(exc.value)


def test_two_models_swap_under_max_instances_one(client, corral, gemma: Path) -> None:
    c = corral(model_toml("a", gemma) + model_toml("b", gemma), scheduler="max_instances = 1")
    oc = client(c)
    for model in ("a", "b", "a"):
        oc.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        assert states(c)[model] == "loaded"
        assert len(c.children()) <= 1
    other = {"a": "b", "b": "a"}["a"]
    assert states(c)[other] == "not-loaded"


def test_ttl_unloads_the_instance(client, corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, ttl=1))
    client(c).chat.completions.create(model="gemma", messages=HELLO, max_tokens=2)
    assert len(c.children()) == 1
    wait_until(lambda: states(c)["gemma"] == "not-loaded", timeout=15)
    wait_until(lambda: c.children() == [], timeout=10)


def test_more_concurrent_calls_than_slots(client, corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, parallel=2))
    oc = client(c)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futs = [
            pool.submit(oc.chat.completions.create, model="gemma", messages=HELLO, max_tokens=8)
            for _ in range(6)
        ]
        results = [f.result(timeout=120) for f in futs]
    assert all(r.choices[0].message.content for r in results)
    # The lease is released just after the answer is sent: poll, don't race it.
    wait_until(lambda: admin(c, "/admin/instances")["instances"][0]["served"] == 6, timeout=5)
    assert admin(c, "/admin/instances")["instances"][0]["in_flight"] == 0


def test_disconnect_mid_stream_frees_the_slot(client, corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, parallel=1))
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as hc, hc.stream("POST", c.url + "/v1/chat/completions",
                                                   json=body) as r:
        # Hold the iterator: breaking out of a bare `for` over it would close the
        # response (a disconnect) before we look.
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                break
        assert admin(c, "/admin/instances")["instances"][0]["in_flight"] == 1
    # The stream is closed: Corral's slot frees and llama-server stops generating,
    # so a new call on the single slot gets through well before 400 tokens' time.
    wait_until(lambda: admin(c, "/admin/instances")["instances"][0]["in_flight"] == 0,
               timeout=10)
    t0 = time.monotonic()
    client(c).chat.completions.create(model="gemma", messages=HELLO, max_tokens=2)
    assert time.monotonic() - t0 < 4


def test_sigkill_of_corral_leaves_no_llama_server(client, corral, gemma: Path) -> None:
    c = corral(model_toml("a", gemma) + model_toml("b", gemma))
    oc = client(c)
    for model in ("a", "b"):
        oc.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    children = c.children()
    assert len(children) == 2
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait(timeout=10)

    wait_until(lambda: all(reaped(p) for p in children), timeout=10)


def test_sigterm_drains_and_exits_zero(client, corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma))
    client(c).chat.completions.create(model="gemma", messages=HELLO, max_tokens=2)
    children = c.children()
    assert children
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=30) == 0
    assert all(not Path(f"/proc/{p}").exists() for p in children)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """The `resolve` route of the Hugging Face Hub, serving one real GGUF file."""

    file: Path

    def _headers(self) -> bool:
        if not self.path.endswith("/resolve/main/gemma.gguf"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{self.file.stat().st_size:x}-gemma"')
        self.send_header("Content-Length", str(self.file.stat().st_size))
        self.end_headers()
        return True

    def do_HEAD(self) -> None:
        self._headers()

    def do_GET(self) -> None:
        if self._headers():
            with self.file.open("rb") as f:
                shutil.copyfileobj(f, self.wfile)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_model_downloaded_from_hugging_face_on_first_use(
    client, corral, gemma: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = type("H", (_HubHandler,), {"file": gemma})
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.server_address[1]}")
        monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))
        c = corral('[[models]]\nname = "hub"\nhf_repo = "google/gemma"\nhf_file = "gemma.gguf"\n'
                   "ctx_size = 1024\nthreads = 1\n")
        resp = client(c).chat.completions.create(model="hub", messages=HELLO, max_tokens=4)
        assert resp.choices[0].message.content
        assert list((tmp_path / "cache").rglob("gemma.gguf"))
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)


def test_second_signal_forces_exit_and_children_still_die(corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma))
    # 900 tokens fit the 1,024-token context (OpenAI's family refuses what cannot) and
    # take seconds: the call is still running when the signals come.
    body = {"model": "gemma", "messages": HELLO, "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as hc, hc.stream("POST", c.url + "/v1/chat/completions",
                                                   json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        children = c.children()
        assert children
        c.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert c.proc.poll() is None  # draining: the running call may finish
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(timeout=10) == 130

    wait_until(lambda: all(reaped(p) for p in children), timeout=10)
