"""``[server] workers = 2`` through ``corral serve`` in a child process, against fake
llama-servers: calls succeed on every port, leases are released, a worker killed
mid-stream gives its leases back and is replaced, and /metrics counts the calls of
every process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.process import limits
from tests.fakes import free_port, stop, write_dummy_gguf
from tests.integration import test_pull

# The fake Hugging Face Hub's fixtures, for auto_pull through a worker.
ggufs, hub = test_pull.ggufs, test_pull.hub

REPO = Path(__file__).resolve().parents[2]
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    ports: dict[str, int]
    log: Path

    def url(self, port: str = "main") -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def workers(self) -> dict[str, Any]:
        for attempt in range(5):
            try:
                data: dict[str, Any] = httpx.get(self.url() + "/admin/workers",
                                                 timeout=5).json()
                return data
            except httpx.TransportError:
                # A connection the kernel had queued on a worker just killed is reset
                # (SO_REUSEPORT gives each listener its own queue): ask again.
                if attempt == 4:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def worker_pid(self) -> int | None:
        pid: int | None = self.workers()["workers"][1]["pid"]
        return pid


def wait(pred: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def serving(cfg: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``corral serve --config cfg`` (with 2 workers) started, its workers relaying;
    stopped after, killed if it will not stop. Its log: ``corral.log`` beside ``cfg``."""
    log_path = cfg.parent / "corral.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: log_path.read_text().count("relaying on") == 2 or proc.poll() is not None,
             "the workers")
        assert proc.poll() is None, log_path.read_text()
        yield proc
    finally:
        stop(proc)


def one_model(tmp_path: Path, fake_llama: Path, port: int, server: str = "",
              model: str = "") -> str:
    """A config of two workers on the main port only, serving one fake model "m"."""
    return (f"[server]\nport = {port}\nollama_enabled = false\nlmstudio_enabled = false\n"
            f'workers = 2\n{server}[llama_server]\nbinary = "{fake_llama}"\n'
            f'[[models]]\nname = "m"\npath = "{write_dummy_gguf(tmp_path / "m.gguf")}"\n'
            f"{model}")


@pytest.fixture
def served(tmp_path: Path, fake_llama: Path) -> Iterator[Served]:
    ports = {"main": free_port(), "ollama": free_port(), "lmstudio": free_port()}
    cfg = tmp_path / "corral.toml"
    cfg.write_text(
        f"[server]\nport = {ports['main']}\nollama_port = {ports['ollama']}\n"
        f"lmstudio_port = {ports['lmstudio']}\nworkers = 2\n"
        "[scheduler]\ndrain_timeout = 3\nstop_timeout = 2\n"
        f'[llama_server]\nbinary = "{fake_llama}"\n'
        f'[[models]]\nname = "m"\npath = "{write_dummy_gguf(tmp_path / "m.gguf")}"\n'
        "parallel = 16\n"
        f'[[models]]\nname = "slow"\npath = "{write_dummy_gguf(tmp_path / "s.gguf")}"\n'
        'parallel = 16\nenv = { FAKE_TOKEN_DELAY = "0.2" }\n')
    log_path = tmp_path / "corral.log"
    with serving(cfg) as proc:
        yield Served(proc, ports, log_path)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]


def fresh_call(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    # A new connection each time: SO_REUSEPORT spreads connections, not requests.
    with httpx.Client(timeout=20) as c:
        return c.post(url + path, json=body)


def in_flight(s: Served) -> list[int]:
    for attempt in range(5):
        try:
            data = httpx.get(s.url() + "/admin/instances", timeout=5).json()
            return [i["in_flight"] for i in data["instances"]]
        except httpx.TransportError:  # queued on a worker just killed: see workers()
            if attempt == 4:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def requests_total(s: Served, endpoint: str) -> float:
    text = httpx.get(s.url() + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("corral_requests_total{") and f'endpoint="{endpoint}"' in line \
                and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def listeners(port: int) -> list[int]:
    """The backlog (Send-Q) of each socket listening on ``port``."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_calls_succeed_on_every_port_and_both_processes_serve(served: Served) -> None:
    s = served
    # Two listeners per port, the workers'; the owner only holds the port, unlistened.
    backlog = limits.backlog(4096, limits.somaxconn())
    assert {name: listeners(port) for name, port in s.ports.items()} == {
        name: [backlog, backlog] for name in s.ports}
    for _ in range(30):
        r = fresh_call(s.url(), "/v1/chat/completions", CHAT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith("hello")
    r = fresh_call(s.url("ollama"), "/api/chat", {**CHAT, "stream": False})
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    r = fresh_call(s.url("lmstudio"), "/api/v0/chat/completions", CHAT)
    assert r.status_code == 200 and "stats" in r.json(), r.text
    # The other API families: Anthropic in a worker, Responses in the owner (its
    # conversations are stored where they are answered).
    for _ in range(4):
        r = fresh_call(s.url(), "/v1/messages", {**CHAT, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["type"] == "message", r.text
    first = fresh_call(s.url(), "/v1/responses", {"model": "m", "input": "hello there"})
    assert first.status_code == 200, first.text
    for _ in range(4):
        r = fresh_call(s.url(), "/v1/responses", {"model": "m", "input": "and again",
                                                  "previous_response_id": first.json()["id"]})
        assert r.status_code == 200, r.text
    # Forwarded to the owner: state the worker does not hold.
    for _ in range(6):
        tags = httpx.get(s.url("ollama") + "/api/tags", headers={"Connection": "close"}).json()
        assert [m["name"] for m in tags["models"]] == ["m:latest", "slow:latest"]
        assert httpx.get(s.url() + "/v1/models").json()["data"][0]["id"] == "m"
    # Every lease given back, in the owner and on the worker's books.
    wait(lambda: in_flight(s) == [0], "in_flight 0")
    rows = s.workers()["workers"]
    assert [r["role"] for r in rows] == ["owner", "worker", "worker"]
    assert all(r["connected"] and r["leases"] == 0 for r in rows[1:])
    # /metrics counts the calls of both processes, each exactly once.
    wait(lambda: requests_total(s, "/v1/chat/completions") == 30, "30 calls in /metrics", 5)
    # The owner listens on no TCP port: every call was a worker's, each counted once.
    wait(lambda: sum(r["calls_reported"] for r in s.workers()["workers"][1:]) >= 32,
         "every call reported by the workers", 5)
    text = httpx.get(s.url() + "/metrics").text
    assert re.search(r'corral_requests_total\{dialect="ollama",endpoint="/api/chat",'
                     r'model="m",status="200"\} 1.0', text), text


def test_a_killed_worker_releases_its_leases_and_is_replaced(served: Served) -> None:
    s = served
    results: list[int | str] = []

    def stream() -> None:
        try:
            with httpx.Client(timeout=30) as c, c.stream(
                    "POST", s.url() + "/v1/chat/completions",
                    json={**CHAT, "model": "slow", "stream": True, "max_tokens": 30}) as r:
                for _ in r.iter_bytes():
                    pass
                results.append(r.status_code)
        except httpx.HTTPError as e:
            results.append(type(e).__name__)

    # SO_REUSEPORT spreads connections by a hash: 8 of them all missed the worker once
    # (a 1-in-256 chance with two listeners). Open 8 more until the worker holds a lease.
    threads: list[threading.Thread] = []
    for _ in range(5):
        batch = [threading.Thread(target=stream) for _ in range(8)]
        threads += batch
        for t in batch:
            t.start()
        try:
            wait(lambda: s.workers()["workers"][1]["leases"] > 0, "a lease held by the worker",
                 10)
            break
        except AssertionError:
            continue
    else:
        raise AssertionError("no connection of 40 reached the worker")
    n = len(threads)
    held = s.workers()["workers"][1]["leases"]
    old = s.worker_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    # Its leases are released as soon as the owner sees its socket close.
    # (The replacement may already be up by the time we look: check the pid, not the
    # connection.)
    wait(lambda: s.worker_pid() != old, "the owner noticing", 5)
    flight = in_flight(s)[0]
    assert flight <= n - held, (flight, held)
    for t in threads:
        t.join(timeout=30)
    assert results.count(200) + len([r for r in results if r != 200]) == n
    assert len([r for r in results if r != 200]) >= 1  # the killed worker's clients
    wait(lambda: in_flight(s) == [0], "in_flight 0 after the kill")
    # A new worker takes its place and serves.
    wait(lambda: s.workers()["started"] == 3 and s.workers()["workers"][1]["connected"],
         "the replacement worker")
    assert s.worker_pid() not in (None, old)
    for _ in range(10):
        assert fresh_call(s.url(), "/v1/chat/completions", CHAT).status_code == 200
    assert f"worker 1 (pid {old}) exited" in s.log.read_text()


def test_reload_reaches_the_worker(served: Served, tmp_path: Path) -> None:
    s = served
    cfg = tmp_path / "corral.toml"
    cfg.write_text(cfg.read_text().replace('name = "m"', 'name = "m"\naliases = ["mm"]'))
    s.proc.send_signal(signal.SIGHUP)

    def all_know_alias() -> bool:
        codes = {fresh_call(s.url(), "/v1/chat/completions", {**CHAT, "model": "mm"}).status_code
                 for _ in range(8)}
        return codes == {200}

    wait(all_know_alias, "every process resolving the new alias", 10)
    body = json.loads(httpx.get(s.url() + "/admin/config").text)
    assert body["reload_success"] is True


def test_websockets_probes_and_unload_through_workers(served: Served) -> None:
    import asyncio

    import lmstudio as lms

    s = served

    async def sdk() -> list[str]:
        # The SDK's websockets are forwarded by whichever process took the connection.
        async with lms.AsyncClient(f"127.0.0.1:{s.ports['lmstudio']}") as client:
            return [m.model_key for m in await client.list_downloaded_models()]

    for _ in range(4):
        assert asyncio.run(sdk()) == ["m", "slow"]
    # Ollama's load and unload probes take a lease or unload through the owner.
    for _ in range(3):
        r = fresh_call(s.url("ollama"), "/api/generate", {"model": "m"})
        assert r.status_code == 200 and r.json()["done_reason"] == "load", r.text
    assert in_flight(s) == [0]
    for _ in range(3):
        r = fresh_call(s.url("ollama"), "/api/generate", {"model": "m", "keep_alive": 0})
        assert r.status_code == 200 and r.json()["done_reason"] == "unload", r.text
    wait(lambda: in_flight(s) == [], "the instance unloaded")


async def test_auto_pull_from_a_worker_pulls_once_in_the_owner(
    hub: Any, tmp_path: Path, fake_llama: Path
) -> None:
    import asyncio

    import aiohttp

    port, oport = free_port(), free_port()
    cfg = tmp_path / "corral.toml"
    cfg.write_text(f"[server]\nport = {port}\nollama_port = {oport}\nlmstudio_enabled = false\n"
                   "workers = 2\n[scheduler]\nauto_pull = true\ndrain_timeout = 3\n"
                   f'[llama_server]\nbinary = "{fake_llama}"\n')
    log_path = tmp_path / "corral.log"
    with log_path.open("wb") as log:
        # The environment carries the fake Hub's address (HF_ENDPOINT) and a fresh cache.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), cwd=REPO,
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        for _ in range(400):
            if log_path.read_text().count("relaying on") == 2 or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode is None, log_path.read_text()
        call = {"model": "hf.co/org/text-only", "messages": [{"role": "user", "content": "hi"}]}

        async def post(url: str, body: dict[str, Any]) -> tuple[int, str]:
            # A session each: a new connection, so the calls spread over the workers.
            async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
                return r.status, await r.text()

        results = await asyncio.gather(
            *(post(f"http://127.0.0.1:{port}/v1/chat/completions", call) for _ in range(3)),
            *(post(f"http://127.0.0.1:{oport}/api/chat", {**call, "stream": False})
              for _ in range(3)))
        assert all(status == 200 for status, _ in results), results
        assert hub.downloads == 1
        status, _ = await post(f"http://127.0.0.1:{oport}/api/chat", {**call, "model": "nope"})
        assert status == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert "Traceback" not in log_path.read_text()


def test_api_keys_hold_in_workers_and_no_key_reaches_the_log(
    tmp_path: Path, fake_llama: Path
) -> None:
    key = "sk-workers-secret-1234567890"
    port = free_port()
    cfg = tmp_path / "corral.toml"
    cfg.write_text(one_model(tmp_path, fake_llama, port,
                             server=f'log_level = "debug"\napi_keys = ["{key}"]\n'))
    with serving(cfg):
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {key}"}
        for _ in range(6):
            with httpx.Client(timeout=20) as c:
                assert c.post(url + "/v1/chat/completions", json=CHAT).status_code == 401
                assert c.get(url + "/admin/instances").status_code == 401
                r = c.post(url + "/v1/chat/completions", json=CHAT, headers=auth)
                assert r.status_code == 200, r.text
                assert c.get(url + "/admin/workers", headers=auth).status_code == 200
    text = (tmp_path / "corral.log").read_text()
    assert key not in text and "Traceback" not in text


def test_a_key_s_limit_holds_across_workers_and_a_reload_reaches_their_keys(
    tmp_path: Path, fake_llama: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "corral.toml"
    head = one_model(tmp_path, fake_llama, port)
    cfg.write_text(head + '[[keys]]\nname = "ops"\nkey = "sk-ops-0123456789"\nadmin = true\n'
                   '[[keys]]\nname = "app"\nkey = "sk-app-0123456789"\n'
                   "requests_per_minute = 4\n")
    url = f"http://127.0.0.1:{port}"
    ops = {"Authorization": "Bearer sk-ops-0123456789"}
    app = {"Authorization": "Bearer sk-app-0123456789"}
    with serving(cfg):
        statuses = []
        for _ in range(8):
            # A new connection per call: the kernel spreads them over both workers.
            with httpx.Client(timeout=20) as c:
                statuses.append(c.post(url + "/v1/chat/completions", json=CHAT,
                                       headers=app).status_code)
        # Four a minute in all, not four per process.
        assert sorted(statuses) == [200] * 4 + [429] * 4, statuses
        keys = {k["name"]: k for k in httpx.get(url + "/admin/keys", headers=ops,
                                                timeout=5).json()["keys"]}
        assert keys["app"]["usage"]["requests_last_minute"] == 4
        assert keys["app"]["usage"]["in_flight"] == 0
        # A reload that drops the key: no worker accepts it any more.
        cfg.write_text(head + '[[keys]]\nname = "ops"\nkey = "sk-ops-0123456789"\n'
                       "admin = true\n")
        httpx.post(url + "/admin/config/reload", headers=ops, timeout=10).raise_for_status()

        def refused_everywhere() -> bool:
            codes = set()
            for _ in range(6):
                with httpx.Client(timeout=20) as c:
                    codes.add(c.post(url + "/v1/chat/completions", json=CHAT,
                                     headers=app).status_code)
            return codes == {401}

        wait(refused_everywhere, "the removed key to be refused by every worker", within=10)
    text = (tmp_path / "corral.log").read_text()
    assert "sk-app-0123456789" not in text and "Traceback" not in text, text[-3000:]


def test_a_stream_waiting_in_a_worker_for_a_model_that_loads_says_loading(
    tmp_path: Path, fake_llama: Path
) -> None:
    port = free_port()
    cfg = tmp_path / "corral.toml"
    cfg.write_text(one_model(tmp_path, fake_llama, port,
                             model='env = { FAKE_LOAD_DELAY = "2.5" }\n'))
    with serving(cfg), httpx.Client(timeout=30) as c, c.stream(
            "POST", f"http://127.0.0.1:{port}/v1/chat/completions",
            json={**CHAT, "stream": True, "max_tokens": 3}) as r:
        text = "".join(r.iter_text())
    # The SSE comments sent while the instance starts (the fake answers /health with
    # 503 "Loading model" for 2.5 s) name what the call waits for.
    comments = [line for line in text.splitlines() if line.startswith(": ")]
    assert comments and comments[0].startswith(": loading m "), text[:500]
    assert "data: [DONE]" in text
