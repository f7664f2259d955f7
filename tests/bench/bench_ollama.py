"""Ollama-translated streaming vs the OpenAI pass-through, in the same run.

Run by hand, never in the suite::

    .venv/bin/python -m tests.bench.bench_ollama [--tokens 2000] [--rounds 5] [--streams 1,4]

Corral's ports run in this process around the Python fake llama-server (one child,
token delay 0, as many slots as the widest concurrency), so the upstream is the same
for both paths. Each round streams ``--tokens`` tokens per stream through
``POST /v1/chat/completions`` (bytes relayed as they come) and through
``POST /api/chat`` (every SSE chunk parsed and re-encoded as an NDJSON line),
alternating, and counts the content chunks the client received. The figure is the
median of the rounds, in content chunks per second over all concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.app import CoreOptions, build_openai_app, port_app
from tests.conftest import make_config
from tests.fakes import fake_binary

MESSAGES = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]


async def openai_stream(session: aiohttp.ClientSession, base: str, tokens: int) -> int:
    body = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": tokens}
    chunks = 0
    async with session.post(base + "/v1/chat/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content":"' in line:
                chunks += 1
    return chunks


async def ollama_stream(session: aiohttp.ClientSession, base: str, tokens: int) -> int:
    body = {"model": "m", "messages": MESSAGES, "options": {"num_predict": tokens}}
    chunks = 0
    async with session.post(base + "/api/chat", json=body) as r:
        async for line in r.content:
            # A byte test, as for the OpenAI stream: the client's own parsing is not
            # what is measured.
            if line.endswith(b'"done":false}\n'):
                chunks += 1
    return chunks


Stream = Callable[[aiohttp.ClientSession, str, int], Awaitable[int]]


async def measure(
    stream: Stream, session: aiohttp.ClientSession, base: str, tokens: int, streams: int
) -> float:
    start = time.perf_counter()
    counts = await asyncio.gather(*(stream(session, base, tokens) for _ in range(streams)))
    elapsed = time.perf_counter() - start
    if any(c != tokens for c in counts):
        raise RuntimeError(f"expected {tokens} chunks per stream, got {counts}")
    return sum(counts) / elapsed


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def main(tokens: int, rounds: int, widths: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(Path(tmp), [{"name": "m", "parallel": max(widths), "ctx_size": 1 << 20}])
        fake = fake_binary(Path(tmp) / "bin")
        core = build_openai_app(cfg, CoreOptions(find_binary=lambda _: fake))
        core_runner, openai_base = await start(core)
        ollama_runner, ollama_base = await start(port_app(core, "ollama"))
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                await openai_stream(session, openai_base, 4)  # launch the instance
                await ollama_stream(session, ollama_base, 4)
                print(
                    f"{tokens} tokens per stream, median of {rounds} rounds, "
                    "content chunks/s received by the client"
                )
                print(
                    f"{'streams':>8} {'OpenAI pass-through':>20} {'Ollama NDJSON':>14} {'ratio':>6}"
                )
                for width in widths:
                    o, n = [], []
                    for _ in range(rounds):
                        o.append(await measure(openai_stream, session, openai_base, tokens, width))
                        n.append(await measure(ollama_stream, session, ollama_base, tokens, width))
                    om, nm = statistics.median(o), statistics.median(n)
                    print(f"{width:>8} {om:>20,.0f} {nm:>14,.0f} {nm / om:>6.2f}")
        finally:
            await ollama_runner.cleanup()
            await core_runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", default="1,4", help="comma-separated concurrencies")
    args = parser.parse_args()
    asyncio.run(main(args.tokens, args.rounds, [int(w) for w in args.streams.split(",")]))
