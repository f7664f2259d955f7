"""What the MCP tool loop costs: a chat call that makes one tool call (two model turns
and one ``tools/call``) against the same chat call without tools, through a real
``corral serve`` around the fake llama-server, with a stdio and an HTTP MCP server
written with the ``mcp`` SDK.

Run by hand, never by the test suite::

    PYTHONPATH=. .venv/bin/python tests/bench/bench_tools.py [--n 100]

The fake answers at once, so the figures are Corral's loop plus the MCP server's own
time (the SDK's, in Python); the first call of each case starts its server and is not
counted. Then a model paced at PACE seconds a token (FAKE_TOKEN_DELAY) answers a
streamed loop: when its first and last text deltas reach the client, against the end
of the stream (a loop that ran its last turn whole would show all three together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.bench.bench_families import free_port, timed
from tests.fakes import fake_binary, mcp_proc, write_dummy_gguf

REPO = Path(__file__).resolve().parents[2]
PACE = 0.05
WORDS = "one two three four five six seven eight nine ten"


async def paced(s: aiohttp.ClientSession, url: str, n: int) -> None:
    body = {"model": "slow", "stream": True, "mcp_servers": ["local"], "messages": [
        {"role": "user", "content": "call: echo " + json.dumps({"text": WORDS})}]}
    firsts, lasts, ends, counts = [], [], [], []
    for _ in range(n):
        t = time.perf_counter()
        seen: list[float] = []
        async with s.post(url, json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and b'"content":"' in line:
                    seen.append(time.perf_counter() - t)
        ends.append(time.perf_counter() - t)
        firsts.append(seen[0])
        lasts.append(seen[-1])
        counts.append(len(seen))
    print(f"  paced {PACE * 1e3:.0f} ms/token, {len(WORDS.split()) + 2} words: "
          f"{statistics.median(counts):.0f} text deltas; first at "
          f"{statistics.median(firsts) * 1e3:.0f} ms, last at "
          f"{statistics.median(lasts) * 1e3:.0f} ms, stream over at "
          f"{statistics.median(ends) * 1e3:.0f} ms (p50 of {n})")


async def run(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, mcp_proc.http_server() as url:
        root = Path(tmp)
        port, oport, lport = free_port(), free_port(), free_port()
        cfg = root / "corral.toml"
        cfg.write_text(
            f'[server]\nport = {port}\nollama_port = {oport}\nlmstudio_port = {lport}\n'
            f'[llama_server]\nbinary = "{fake_binary(root / "bin")}"\n'
            f'[[mcp_servers]]\nname = "local"\ncommand = {json.dumps(list(mcp_proc.STDIO))}\n'
            f'env = {{ PYTHONPATH = "{mcp_proc.ROOT}" }}\n'
            f'[[mcp_servers]]\nname = "remote"\nurl = "{url}"\n'
            f'[[models]]\nname = "m"\npath = "{write_dummy_gguf(root / "m.gguf")}"\n'
            f'[[models]]\nname = "slow"\npath = "{write_dummy_gguf(root / "s.gguf")}"\n'
            f'env = {{ FAKE_TOKEN_DELAY = "{PACE}" }}\n')
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
                ask = [{"role": "user", "content": 'call: echo {"text": "x"}'}]
                cases: list[tuple[str, dict[str, Any]]] = [
                    ("no tools", {"model": "m", "messages": ask, "max_tokens": 4}),
                    ("stdio, 1 call", {"model": "m", "messages": ask, "mcp_servers": ["local"]}),
                    ("stdio, streamed", {"model": "m", "messages": ask, "stream": True,
                                         "mcp_servers": ["local"]}),
                    ("http, 1 call", {"model": "m", "messages": ask,
                                      "mcp_servers": ["remote"]})]
                for name, body in cases:
                    await timed(s, base + "/v1/chat/completions", body, 5)  # start, warm up
                    lat = sorted(await timed(s, base + "/v1/chat/completions", body, n))
                    print(f"  {name:15s} p50 {statistics.median(lat) * 1e3:6.2f} ms  "
                          f"p90 {lat[int(len(lat) * 0.9)] * 1e3:6.2f} ms")
                await paced(s, base + "/v1/chat/completions", 1)  # load, warm up
                await paced(s, base + "/v1/chat/completions", 5)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    asyncio.run(run(args.n))
    print(f"({time.perf_counter() - t:.1f} s)")
