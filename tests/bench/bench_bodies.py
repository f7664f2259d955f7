"""What a big body costs everyone else: /health latency on another port and Corral's
RSS while one 50 MB JSON body (and one 200 MB multipart upload) goes through.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_bodies.py [--mb 50] [--upload-mb 200]

Corral runs as a real ``corral serve`` process around the fake llama-server, on free
loopback ports. A poller sends ``GET /health`` to the Ollama port back to back and
records each latency; Corral's RSS is sampled every 10 ms. Figures are printed for an
idle period (the baseline, same run) and for the time each big call was in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import io
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
import psutil

from tests.fakes import fake_binary, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Probe:
    def __init__(self, pid: int, health_url: str) -> None:
        self.proc = psutil.Process(pid)
        self.url = health_url
        self.latencies: list[float] = []
        self.peak_rss = 0

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        async def rss() -> None:
            while not stop.is_set():
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(rss())
        while not stop.is_set():
            t = time.perf_counter()
            async with session.get(self.url) as r:
                await r.read()
            self.latencies.append(time.perf_counter() - t)
        await sampler


def _figures(label: str, probe: Probe, rss0: int, size: int) -> str:
    lat = sorted(probe.latencies) or [0.0]
    return (f"{label:<24} {len(lat):>6} probes  p50 {statistics.median(lat) * 1e3:6.2f} ms  "
            f"max {lat[-1] * 1e3:7.2f} ms  RSS +{(probe.peak_rss - rss0) / 2**20:6.1f} MiB"
            + (f" ({(probe.peak_rss - rss0) / size:.2f}x the body)" if size else ""))


async def measure(label: str, pid: int, health: str, size: int, call: object) -> str:
    async with aiohttp.ClientSession() as s:
        probe = Probe(pid, health)
        rss0 = probe.proc.memory_info().rss
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(s, stop))
        try:
            if call is None:
                await asyncio.sleep(2.0)
            else:
                await call  # type: ignore[misc]
        finally:
            stop.set()
            await task
        return _figures(label, probe, rss0, size)


async def main(mb: int, upload_mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port, oport, lport = free_port(), free_port(), free_port()
        fake = fake_binary(root / "bin")
        cfg = root / "corral.toml"
        cfg.write_text(
            f'[server]\nport = {port}\nollama_port = {oport}\nlmstudio_port = {lport}\n'
            f'[llama_server]\nbinary = "{fake}"\n'
            f'[[models]]\nname = "emb"\nembedding = true\n'
            f'path = "{write_dummy_gguf(root / "e.gguf")}"\n'
            f'[[models]]\nname = "aud"\ncapabilities = ["audio"]\n'
            f'path = "{write_dummy_gguf(root / "a.gguf")}"\n'
        )
        proc = subprocess.Popen(  # noqa: ASYNC220 - once, before anything is measured
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            health = f"http://127.0.0.1:{oport}/health"
            async with aiohttp.ClientSession() as s:
                for _ in range(200):
                    try:
                        async with s.get(base + "/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
                big = json.dumps({"model": "emb", "input": ["lorem ipsum " * 1000] *
                                  (mb * 2**20 // 12000)}).encode()

                async def embeddings() -> None:
                    async with s.post(base + "/v1/embeddings", data=io.BytesIO(big),
                                      headers={"Content-Type": "application/json"}) as r:
                        assert r.status == 200, await r.text()
                        await r.read()

                async def upload() -> None:
                    form = aiohttp.FormData()
                    form.add_field("model", "aud")

                    async def chunks():  # type: ignore[no-untyped-def]
                        for _ in range(upload_mb):
                            yield b"\0" * 2**20

                    form.add_field("file", chunks(), filename="a.wav")
                    async with s.post(base + "/v1/audio/transcriptions", data=form) as r:
                        assert r.status == 200, await r.text()
                        await r.read()

                # Launch both models first: their load is not what is measured.
                async with s.post(base + "/v1/embeddings", json={"model": "emb", "input": "x"}):
                    pass
                print(f"/health on the Ollama port while one call passes through the main port "
                      f"(Corral pid {proc.pid})")
                print(await measure("idle (baseline)", proc.pid, health, 0, None))
                print(await measure(f"{len(big) / 1e6:.0f} MB JSON body", proc.pid, health,
                                    len(big), embeddings()))
                print(await measure(f"{upload_mb} MiB multipart upload", proc.pid, health,
                                    upload_mb << 20, upload()))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--upload-mb", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(main(args.mb, args.upload_mb))
