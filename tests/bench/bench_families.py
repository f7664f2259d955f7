"""What translating Anthropic Messages and Responses to chat costs, against the
pass-through of the same family.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_families.py [--n 300] [--tokens 16]

First the pure state machines alone: a 1,000-chunk chat stream through each, encoded
as SSE, in µs per chunk. Then Corral as a real ``corral serve`` process around two
fake llama-servers, one that speaks the families (pass-through) and one declared
``api = ["chat"]`` (translated): ``--n`` sequential calls per case, streamed and not,
with p50 and p90 latency. The fake answers at once, so the difference is Corral's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.dialects.families import anthropic_chat, bridge, responses_chat
from proxy.edge import jsonc
from tests.fakes import fake_binary, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pure(chunks: int) -> None:
    stream = [{"id": "chatcmpl-1", "model": "m", "choices": [
        {"index": 0, "delta": {"content": f" word{i}"}, "finish_reason": None}]}
        for i in range(chunks)]
    raw = [jsonc.dumps(c) for c in stream]
    cases: list[tuple[str, Any]] = [
        ("anthropic", anthropic_chat.Stream(anthropic_chat.Asked("m", True, False))),
        ("responses", responses_chat.Stream(responses_chat.asked({"model": "m", "input": "x"}))),
    ]
    for name, machine in cases:
        t = time.perf_counter()
        out = bytearray(bridge.encode(machine.start(stream[0])))
        for data in raw:
            out += bridge.encode(machine.feed(jsonc.loads(data)))
        out += bridge.encode(machine.finish())
        dt = time.perf_counter() - t
        print(f"  {name:10s} {dt / chunks * 1e6:6.1f} µs per chunk (parse, translate, "
              f"encode; {len(out) / chunks:.0f} bytes out per chunk)")


async def timed(s: aiohttp.ClientSession, url: str, body: dict[str, Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with s.post(url, json=body) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t)
    return out


async def through_corral(n: int, tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port, oport, lport = free_port(), free_port(), free_port()
        fake = fake_binary(root / "bin")
        cfg = root / "corral.toml"
        cfg.write_text(
            f'[server]\nport = {port}\nollama_port = {oport}\nlmstudio_port = {lport}\n'
            f'[llama_server]\nbinary = "{fake}"\n'
            f'[[models]]\nname = "native"\npath = "{write_dummy_gguf(root / "n.gguf")}"\n'
            f'[[models]]\nname = "chat-only"\napi = ["chat"]\n'
            f'path = "{write_dummy_gguf(root / "c.gguf")}"\n'
        )
        proc = subprocess.Popen(  # noqa: ASYNC220 - once, before anything is measured
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as s:
                for _ in range(200):
                    try:
                        async with s.get(base + "/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
                message = {"max_tokens": tokens,
                           "messages": [{"role": "user", "content": "a b c d"}]}
                response = {"max_output_tokens": tokens, "input": "a b c d"}
                for path, body in (("/v1/messages", message), ("/v1/responses", response)):
                    for stream in (False, True):
                        for model in ("native", "chat-only"):
                            call = {**body, "model": model, "stream": stream}
                            await timed(s, base + path, call, 20)  # launch, warm up
                            lat = sorted(await timed(s, base + path, call, n))
                            print(f"  {path:14s} {'stream' if stream else 'whole':6s} "
                                  f"{model:9s} p50 {statistics.median(lat) * 1e3:6.2f} ms  "
                                  f"p90 {lat[int(len(lat) * 0.9)] * 1e3:6.2f} ms")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("state machines alone, 1000 chunks:")
    pure(1000)
    print(f"through corral serve, {args.n} sequential calls of {args.tokens} tokens each:")
    asyncio.run(through_corral(args.n, args.tokens))
