"""``[server] workers = 2`` through the real llama-server and Gemma 3 270M: streamed and
whole answers on the OpenAI and Ollama ports from both processes, leases given back,
every call counted once in /metrics, and no process left after SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import CorralProc, model_toml, reaped, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Say hello."}]


def chat_total(c: CorralProc) -> float:
    # Every status: the count is of calls, whatever they ended with.
    text = httpx.get(c.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("corral_requests_total{")
               and 'endpoint="/v1/chat/completions"' in line)


def test_two_workers_serve_gemma(corral, gemma: Path) -> None:
    c = corral(model_toml("gemma", gemma, parallel=4), server="workers = 2")
    wait_until(lambda: c.log().count("relaying on") == 2, timeout=30)
    calls = 12
    for i in range(calls):
        # A new client (a new connection) per call: the kernel spreads connections.
        with openai.OpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0,
                           timeout=120) as oc:
            if i % 2:
                stream = oc.chat.completions.create(model="gemma", messages=HELLO,
                                                    max_tokens=8, stream=True)
                text = "".join(ch.choices[0].delta.content or "" for ch in stream
                               if ch.choices)
            else:
                text = oc.chat.completions.create(model="gemma", messages=HELLO,
                                                  max_tokens=8).choices[0].message.content or ""
            assert text.strip(), i
    with httpx.Client(timeout=120) as h, h.stream(
            "POST", f"http://127.0.0.1:{c.ollama_port}/api/chat",
            json={"model": "gemma", "messages": HELLO, "options": {"num_predict": 8}}) as r:
        lines = [json.loads(ln) for ln in r.iter_lines() if ln]
    assert lines[-1]["done"] is True and any(ln["message"]["content"] for ln in lines)
    instances = httpx.get(c.url + "/admin/instances", timeout=10).json()["instances"]
    assert [i["in_flight"] for i in instances] == [0]
    workers = httpx.get(c.url + "/admin/workers", timeout=10).json()["workers"]
    assert all(w["leases"] == 0 for w in workers[1:]), workers

    def reported() -> int:
        rows = httpx.get(c.url + "/admin/workers", timeout=10).json()["workers"]
        return sum(w["calls_reported"] for w in rows[1:])

    # The owner listens on no TCP port: every call was a worker's (reported within 0.5 s).
    wait_until(lambda: reported() >= calls + 1, timeout=5)
    wait_until(lambda: chat_total(c) >= calls, timeout=5)
    assert chat_total(c) == calls
    pids = [c.proc.pid, *(w["pid"] for w in workers[1:]), *c.children()]
    c.proc.send_signal(signal.SIGTERM)
    c.proc.wait(timeout=60)
    wait_until(lambda: all(reaped(p) for p in pids), timeout=10)
