"""Issue 12's figures side by side, in one run: GC freeze, burst, streaming relay, workers.

Run by hand, never in the suite (needs wrk: ``apt-get install -y wrk``)::

    .venv/bin/python -m tests.bench.bench_relay [--duration 5] [--repeat 3]
        [--only p99,burst,relay,workers,lease]

``--repeat N`` runs every row N times and keeps the least disturbed run (the most
requests per second of Corral's CPU; for a burst, the lowest TTFB maximum, which is
also the one that finds the upstream connections pooled by the bursts before it).

The upstream is a stand-in served by this script (``--serve-upstream``): a raw asyncio
HTTP/1.1 server that streams OpenAI chat chunks or Anthropic events, ``max_tokens`` of
them, either paced (one event per write, ``--pace`` ms apart) or flooded (back to back),
and answers a fixed chat.completion to a call without ``"stream":true``. Corral reaches
it as a ``remotes`` model, so it is not Corral's child and its CPU is not charged to it.
The bare relay is ``bench_proxy.py --serve-baseline``: the least an aiohttp proxy does.

Sections (each prints its own table):

- **p99**: non-streaming chat at 32 connections: bare, Corral with its defaults, with
  Python's young GC threshold (``gc_threshold = 700``) and without ``gc_freeze``; the
  p99 ratio to bare.
- **burst**: 1,000 streams opened at once (5 chunks each); TTFB p50/max and the
  ``TcpExt ListenOverflows`` counted meanwhile (system-wide: other load shows too), for
  the upstream direct, the bare relay, Corral's OpenAI and Ollama ports, Corral with
  backlog 128, and Corral with 2 workers.
- **relay**: chunks/s and Corral's CPU µs per chunk, flood (32 streams) and paced (64
  and 256 streams), for the bare relay and Corral's OpenAI pass-through, Ollama's
  /api/chat, and Anthropic Messages and Responses translated over a chat-only upstream
  (``api = ["chat"]``), each with its ratio to the pass-through.
- **workers**: paced-stream relay capacity and non-streaming req/s, workers 1 vs 2, with
  the cores Corral used and the cores wrk and the stand-in used meanwhile.
- **lease**: the cost of a lease taken in-process vs from a worker over the socket.

CPU per chunk counts Corral's processes (owner and workers), not wrk or the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.bench import bench_proxy as bp

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
MSGS = [{"role": "user", "content": "Say hello."}]


# -- the upstream stand-in --------------------------------------------------------------


def serve_upstream(port: int, pace_ms: float) -> None:
    """One event per write, ``pace_ms`` apart (0: back to back, yielding in between)."""
    pace = pace_ms / 1000.0
    chat_json = json.dumps({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
    chunk = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
             b'"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}\n\n')
    last = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
            b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},'
            b'"timings":{"prompt_ms":1.0,"predicted_ms":2.0,"predicted_per_second":500.0}}\n\n'
            b"data: [DONE]\n\n")
    a_start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
               b'"type":"message","role":"assistant","model":"m","content":[],'
               b'"stop_reason":null,"usage":{"input_tokens":3,"output_tokens":0}}}\n\n'
               b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
               b'"content_block":{"type":"text","text":""}}\n\n')
    a_chunk = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
               b'"delta":{"type":"text_delta","text":"tok "}}\n\n')
    a_end = (b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
             b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
             b'"max_tokens"},"usage":{"output_tokens":1}}\n\n'
             b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    max_tokens = re.compile(rb'"max_tokens"\s*:\s*(\d+)')

    def framed(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""
            self.busy = False

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if not self.busy:
                self.next()

        def next(self) -> None:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            m = re.search(r"(?i)content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4:head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length:]
            method, path = head.split(" ", 2)[:2]
            self.close = "connection: close" in head.lower()
            if method == "GET":
                self.whole(b'{"status":"ok","data":[]}')
            elif b'"stream":true' in body or b'"stream": true' in body:
                n = max_tokens.search(body)
                self.busy = True
                self.stream(int(n.group(1)) if n else 10, path.startswith("/v1/messages"))
                return
            else:
                self.whole(chat_json)
            if self.buf:
                self.next()

        def whole(self, body: bytes) -> None:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            if self.close:
                self.t.close()

        def stream(self, n: int, anthropic: bool) -> None:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            self.one, first, self.end = ((a_chunk, a_start, a_end) if anthropic
                                         else (chunk, b"", last))
            if first:
                self.t.write(framed(first))
            self.left = n
            if pace:
                paced.add(self)  # the ticker writes one event per stream per tick
            else:
                asyncio.get_running_loop().create_task(self.flood())

        async def flood(self) -> None:
            # Back to back, yielding between events so that every stream moves.
            for _ in range(self.left + 1):
                if not self.tick():
                    return
                await asyncio.sleep(0)

        def tick(self) -> bool:
            """One event; False once the stream has ended."""
            if self.t.is_closing():
                return False
            if self.left:
                self.left -= 1
                self.t.write(framed(self.one))
                return True
            self.t.write(framed(self.end) + b"0\r\n\r\n")
            if self.close:
                self.t.close()
                return False
            self.busy = False
            if self.buf:
                self.next()
            return False

    # Paced streams share one timer: every ``pace`` each writes its next event, so the
    # stand-in spends a write per event and no task step or timer of its own.
    paced: set[Upstream] = set()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += pace
            await asyncio.sleep(max(0.0, due - loop.time()))
            for s in list(paced):
                if not s.tick():
                    paced.discard(s)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=4096)
        ticking = loop.create_task(ticker()) if pace else None
        async with server:
            await server.serve_forever()
        if ticking is not None:
            ticking.cancel()

    _run(main())


def _run(coro: object) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


# -- processes ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str  # OpenAI-shaped calls
    ollama: str | None
    pids: list[int]

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                for q in [p, *p.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        t = q.cpu_times()
                        total += t.user + t.system
        return total


UPSTREAMS: list[int] = []  # the stand-ins' pids, whose CPU the workers section reports


@contextlib.contextmanager
def upstream(tmp: Path, pace_ms: float) -> Iterator[str]:
    port = bp.free_port()
    argv = [PY, "-m", "tests.bench.bench_relay", "--serve-upstream", str(port), str(pace_ms)]
    with bp.started(argv, tmp / f"upstream-{port}.log", {**os.environ}) as proc:
        url = f"http://127.0.0.1:{port}"
        bp.wait_healthy(url, proc, 20, tmp / f"upstream-{port}.log")
        UPSTREAMS.append(proc.pid)
        yield url


@contextlib.contextmanager
def bare(tmp: Path, up: str) -> Iterator[Target]:
    port = bp.free_port()
    argv = [PY, str(REPO / "tests/bench/bench_proxy.py"), "--serve-baseline", str(port), up]
    with bp.started(argv, tmp / f"bare-{port}.log", {**os.environ}) as proc:
        url = f"http://127.0.0.1:{port}"
        bp.wait_healthy(url, proc, 20, tmp / f"bare-{port}.log")
        yield Target("bare", url, None, [proc.pid])


# Models whose upstream is declared to speak chat only: Anthropic Messages and Responses
# calls to them are translated (proxy/dialects/families/).
CHAT_ONLY = "-chat"


@contextlib.contextmanager
def corral(tmp: Path, models: dict[str, str], name: str, **server: object) -> Iterator[Target]:
    port, oport = bp.free_port(), bp.free_port()
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in server.items())
    cfg = tmp / f"corral-{port}.toml"
    cfg.write_text(
        f'[server]\nport = {port}\nollama_port = {oport}\nlmstudio_enabled = false\n{keys}'
        "[scheduler]\nqueue_size = 100000\n"
        + "".join(f'[[models]]\nname = "{m}"\nremotes = ["{u}"]\nremote_slots = 100000\n'
                  + ('api = ["chat"]\n' if m.endswith(CHAT_ONLY) else "")
                  for m, u in models.items()))
    log = tmp / f"corral-{port}.log"
    argv = [PY, "-m", "proxy.cli", "serve", "--config", str(cfg)]
    with bp.started(argv, log, {**os.environ, "PYTHONPATH": str(REPO)}) as proc:
        url = f"http://127.0.0.1:{port}"
        bp.wait_healthy(url, proc, 30, log)
        if int(server.get("workers", 1)) > 1:  # type: ignore[call-overload]
            deadline = time.monotonic() + 30
            while "relaying on" not in log.read_text():
                assert time.monotonic() < deadline, bp.tail(log)
                time.sleep(0.1)
        for m in models:  # the remote is healthy before the clock starts
            bp.http_ok(url + "/v1/chat/completions",
                       json.dumps({"model": m, "messages": MSGS}).encode(), timeout=10)
        yield Target(name, url, f"http://127.0.0.1:{oport}", [proc.pid])
    # wrk closes its connections mid-answer at the end of each run: a client's hang-up,
    # which must not read as an upstream's failure (issue 26).
    complaints = [line for line in bp.tail(log, 100_000).splitlines()
                  if "WARNING" in line or "ERROR" in line or "Traceback" in line]
    if complaints:
        print(f"  {name} logged {len(complaints)} warnings or errors; the last ones:",
              *complaints[-5:], sep="\n    ", flush=True)


# -- load --------------------------------------------------------------------------------


def lua(tmp: Path, body: dict[str, object]) -> Path:
    text = json.dumps(body).replace("'", "\\'")
    path = tmp / f"s{abs(hash(text))}.lua"
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f"wrk.body = '{text}'\n")
    return path


@dataclass
class Load:
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    cpu_s: float  # Corral's processes
    requests: int
    wall_s: float
    others_s: float  # the stand-ins' and wrk's CPU meanwhile


REPEAT = 1  # --repeat: runs per row; the least disturbed one is kept


def load(target: Target, base: str, path: str, script: Path, conns: int, secs: int,
         threads: int = 2, repeat: int | None = None) -> Load:
    """One wrk run, or the best of REPEAT: the most requests per second of Corral's
    CPU. Anything else on the machine only ever makes a run slower and costlier."""
    case = bp.Case("x", path, script, conns)
    runs = []
    for _ in range(REPEAT if repeat is None else repeat):
        before, others, wall = target.cpu(), _others_cpu(), time.perf_counter()
        r = bp.run_wrk(base, case, secs, threads)
        runs.append(Load(r.rps, r.p50_us, r.p99_us, r.errors, target.cpu() - before,
                         r.requests, time.perf_counter() - wall, _others_cpu() - others))
    return max(runs, key=lambda r: r.requests / max(r.cpu_s, 1e-9))


def body(kind: str, model: str, tokens: int) -> tuple[str, dict[str, object]]:
    if kind == "ollama":
        return "/api/chat", {"model": model, "messages": MSGS,
                             "options": {"num_predict": tokens}}
    if kind == "anthropic":
        return "/v1/messages", {"model": model, "messages": MSGS, "max_tokens": tokens,
                                "stream": True}
    if kind == "responses":
        return "/v1/responses", {"model": model, "input": "Say hello.",
                                 "max_output_tokens": tokens, "stream": True}
    if kind == "chat":
        return "/v1/chat/completions", {"model": model, "messages": MSGS}
    return "/v1/chat/completions", {"model": model, "messages": MSGS, "stream": True,
                                    "max_tokens": tokens}


def stream_load(tmp: Path, t: Target, kind: str, model: str, tokens: int, conns: int,
                secs: int, repeat: int | None = None) -> Load:
    path, b = body(kind, model, tokens)
    base = t.ollama if kind == "ollama" else t.url
    assert base is not None
    return load(t, base, path, lua(tmp, b), conns, secs, repeat=repeat)


def per_chunk(r: Load, tokens: int) -> tuple[float, float]:
    """(chunks/s, CPU µs per chunk) of a streaming row."""
    chunks = r.requests * tokens
    return r.rps * tokens, (r.cpu_s / chunks * 1e6 if chunks else 0.0)


def stream_row(tmp: Path, t: Target, kind: str, model: str, tokens: int, conns: int,
               secs: int, r: Load | None = None, versus: Load | None = None) -> str:
    """One row; ``versus``: the OpenAI pass-through's row of the same load, for the
    ratios (issue 26: translated ≤ 1.2× its CPU per chunk, ≥ 0.9× its flood rate)."""
    if r is None:
        r = stream_load(tmp, t, kind, model, tokens, conns, secs)
    cps, cpu = per_chunk(r, tokens)
    ratio = ""
    if versus is not None:
        vcps, vcpu = per_chunk(versus, tokens)
        ratio = (f"  ÷ openai: {cps / max(vcps, 1e-9):4.2f}× chunks/s, "
                 f"{cpu / max(vcpu, 1e-9):4.2f}× CPU")
    return (f"{t.name:10} {kind:9} {model:10} c={conns:<4} {cps:10.0f} chunks/s "
            f"{cpu:7.1f} µs CPU/chunk  p99 {bp.fmt_us(r.p99_us):>8}  errors {r.errors}{ratio}")


# -- burst -------------------------------------------------------------------------------


def overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return 0


async def _burst(host: str, port: int, path: str, payload: bytes, n: int) -> list[float]:
    req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload

    async def one() -> float:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(req)
        first = await reader.read(1)
        ttfb = time.perf_counter() - t0
        while await reader.read(65536):
            pass
        writer.close()
        if not first:
            raise RuntimeError("closed without an answer")
        return ttfb

    async with asyncio.timeout(60):
        return await asyncio.gather(*(one() for _ in range(n)))


def burst_row(name: str, url: str, path: str, b: dict[str, object], n: int) -> str:
    host, port = url.removeprefix("http://").split(":")
    runs = []
    for _ in range(REPEAT):  # the least disturbed burst: the lowest TTFB maximum
        before = overflows()
        start = time.perf_counter()
        ttfb = sorted(asyncio.run(_burst(host, int(port), path, json.dumps(b).encode(), n)))
        runs.append((ttfb, time.perf_counter() - start, overflows() - before))
    ttfb, took, _ = min(runs, key=lambda r: r[0][-1])
    lost = sum(r[2] for r in runs)  # overflows in every run: one is too many
    return (f"{name:24} {n} streams  TTFB p50 {ttfb[len(ttfb) // 2] * 1000:7.1f} ms  "
            f"max {ttfb[-1] * 1000:7.1f} ms  all done in {took:5.2f} s  "
            f"ListenOverflows +{lost}" + (f" in {REPEAT} runs" if REPEAT > 1 else ""))


# -- lease cost --------------------------------------------------------------------------


async def lease_cost(up: str, n: int) -> str:
    import socket

    import aiohttp

    from scheduler.config.root import CorralConfig, ModelConfig
    from scheduler.ipc import wire as ipc_wire
    from scheduler.ipc.owner import Owner, _Peer
    from scheduler.ipc.worker import WorkerScheduler, connect
    from scheduler.scheduling.scheduler import Scheduler

    cfg = CorralConfig(models=(ModelConfig(name="m", remotes=(up,), remote_slots=1000),))
    async with aiohttp.ClientSession() as session:
        sched = Scheduler(cfg, session)
        await sched.start()
        try:
            async with sched.lease("m"):
                pass  # healthy before timing
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                async with sched.lease("m"):
                    pass
            local = (time.perf_counter() - t0) / n
            local_cpu = (time.process_time() - c0) / n
            a, b = socket.socketpair()
            owner = Owner(sched, 2, lambda i, fd: [])
            ra, wa = await asyncio.open_unix_connection(sock=a)
            peer = _Peer(1, ipc_wire.Line(ra, wa))
            serving = asyncio.create_task(owner._serve(peer))
            line = await connect(b.detach())
            await line.next()  # the config frame
            worker = WorkerScheduler(cfg, session, line)
            reader = asyncio.create_task(worker.run())
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                async with worker.lease("m"):
                    pass
            remote = (time.perf_counter() - t0) / n
            remote_cpu = (time.process_time() - c0) / n

            async def loop(k: int) -> None:
                for _ in range(k):
                    async with worker.lease("m"):
                        await asyncio.sleep(0)

            c0 = time.process_time()
            await asyncio.gather(*(loop(n // 64) for _ in range(64)))
            busy_cpu = (time.process_time() - c0) / (n // 64 * 64)
            await worker.close()
            reader.cancel()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, serving)
        finally:
            await sched.close()
    return (f"lease + release, {n} in a row: in-process {local * 1e6:.1f} µs "
            f"({local_cpu * 1e6:.1f} µs CPU); from a worker over the socket "
            f"{remote * 1e6:.1f} µs ({remote_cpu * 1e6:.1f} µs CPU, owner and worker sides "
            f"together): +{(remote_cpu - local_cpu) * 1e6:.1f} µs CPU per call; "
            f"64 at once: {busy_cpu * 1e6:.1f} µs CPU per lease")


# -- main --------------------------------------------------------------------------------


# -- workers -----------------------------------------------------------------------------


def _others_cpu() -> float:
    """CPU seconds of everything that is not Corral: the stand-ins and the finished wrk runs."""
    total = 0.0
    for pid in UPSTREAMS:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    mine = os.times()
    return total + mine.children_user + mine.children_system


def workers_section(tmp: Path, models: dict[str, str], secs: int) -> None:
    """Relay capacity with 1 and 2 workers, and where the machine's cores went.

    The offered load (768 streams, an event every 10 ms each: 76,800 events/s) is far
    past what one core relays, so each row is a capacity. wrk and the stand-in share the
    machine with Corral: "cores" splits the run's CPU time between Corral's processes
    and the rest; "per core" is Corral's events relayed per second of its own CPU.
    """
    print(f"\n== workers: paced relay capacity (768 streams, 40 events 10 ms apart, {secs} s) "
          "and non-streaming req/s (64 connections) ==", flush=True)
    for n in (1, 2):
        with corral(tmp, models, f"workers={n}", workers=n) as t:
            # (what, model, events per call, connections, unit)
            for kind, model, per, conns, unit in (("openai", "paced", 40, 768, "chunk"),
                                                  ("chat", "flood", 1, 64, "req")):
                path, b = body(kind, model, per)  # a chat call ignores the count
                r = load(t, t.url, path, lua(tmp, b), conns, secs)
                rate = r.rps * per
                print(f"{t.name:10} {kind:9} {model:6} c={conns:<4} {rate:10.0f} {unit}s/s  "
                      f"{r.cpu_s / max(1, r.requests * per) * 1e6:6.1f} µs CPU/{unit}  "
                      f"cores: corral {r.cpu_s / r.wall_s:4.2f}, "
                      f"wrk+upstream {r.others_s / r.wall_s:4.2f}  "
                      f"per corral core {rate * r.wall_s / max(r.cpu_s, 1e-9):7.0f}/s  "
                      f"errors {r.errors}", flush=True)


def relay_section(tmp: Path, models: dict[str, str], secs: int) -> None:
    """Chunks/s and CPU per chunk of every streaming family against the OpenAI
    pass-through, side by side: flood (200 chunks back to back, 32 streams) and paced
    (50 chunks 10 ms apart, 64 and 256 streams). Anthropic Messages and Responses go to
    a model declared ``api = ["chat"]``: translated to chat and back, as for an upstream
    that lacks them; Ollama's /api/chat is always a translation. The kinds take turns
    within each repeat, so a slow minute of the host hits them alike."""
    kinds = (("openai", "{}"), ("ollama", "{}"), ("anthropic", "{}" + CHAT_ONLY),
             ("responses", "{}" + CHAT_ONLY))
    print("\n== streaming relay: flood (200 chunks back to back, 32 streams), paced (50 "
          "chunks 10 ms apart, 64 and 256 streams); translated families over a chat-only "
          "upstream ==", flush=True)
    with bare(tmp, models["flood"]) as t:
        print(stream_row(tmp, t, "openai", "flood", 200, 32, secs), flush=True)
    with bare(tmp, models["paced"]) as t:
        for conns in (64, 256):
            print(stream_row(tmp, t, "openai", "paced", 50, conns, secs), flush=True)
    with corral(tmp, models, "corral") as t:
        for model, tokens, conns in (("flood", 200, 32), ("paced", 50, 64),
                                     ("paced", 50, 256)):
            runs: dict[str, list[Load]] = {k: [] for k, _ in kinds}
            for _ in range(REPEAT):
                for kind, name in kinds:
                    runs[kind].append(stream_load(tmp, t, kind, name.format(model), tokens,
                                                  conns, secs, repeat=1))
            best = {k: max(rs, key=lambda r: r.requests / max(r.cpu_s, 1e-9))
                    for k, rs in runs.items()}
            for kind, name in kinds:
                print(stream_row(tmp, t, kind, name.format(model), tokens, conns, secs,
                                 best[kind], None if kind == "openai" else best["openai"]),
                      flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--only", default="p99,burst,relay,workers,lease")
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per row, the least disturbed kept (as bench_proxy.py)")
    ap.add_argument("--serve-upstream", nargs=2, metavar=("PORT", "PACE_MS"),
                    help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    global REPEAT
    REPEAT = max(1, opts.repeat)
    if opts.serve_upstream:
        serve_upstream(int(opts.serve_upstream[0]), float(opts.serve_upstream[1]))
        return 0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    only = set(opts.only.split(","))
    secs = opts.duration
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores; "
          f"somaxconn {Path('/proc/sys/net/core/somaxconn').read_text().strip()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="corral-bench-relay-") as d, \
            upstream(Path(d), 0) as flood, upstream(Path(d), 10) as paced:
        tmp = Path(d)
        models = {"flood": flood, "paced": paced, "flood" + CHAT_ONLY: flood,
                  "paced" + CHAT_ONLY: paced}
        if "p99" in only:
            print("\n== p99, non-streaming chat, 32 connections ==", flush=True)
            rows = []
            with bare(tmp, flood) as t:
                path, b = body("chat", "flood", 0)
                base = load(t, t.url, path, lua(tmp, b), 32, secs)
                rows.append(("bare", base))
            # The defaults (freeze, young threshold 50,000), then one change at a time.
            for name, gc_settings in (("corral (defaults)", {}),
                                      ("corral gc_threshold=700", {"gc_threshold": 700}),
                                      ("corral gc_freeze=false", {"gc_freeze": False})):
                with corral(tmp, models, "corral", **gc_settings) as t:
                    rows.append((name, load(t, t.url, path, lua(tmp, b), 32, secs)))
            for name, r in rows:
                cpu = f"{r.cpu_s / max(1, r.requests) * 1e6:6.1f} µs CPU/req" if name != "bare" \
                    else " " * 17
                print(f"{name:26} {r.rps:8.0f} req/s  p50 {bp.fmt_us(r.p50_us):>8}  "
                      f"p99 {bp.fmt_us(r.p99_us):>8}  p99/bare {r.p99_us / base.p99_us:5.2f}  "
                      f"{cpu}  errors {r.errors}", flush=True)
        if "burst" in only:
            print(f"\n== burst: {opts.burst} streams at once, 5 chunks each ==", flush=True)
            n = opts.burst
            path, b = body("openai", "flood", 5)
            print(burst_row("direct (upstream)", flood, path, b, n), flush=True)
            with bare(tmp, flood) as t:
                print(burst_row("bare relay", t.url, path, b, n), flush=True)
            with corral(tmp, models, "corral") as t:
                print(burst_row("corral OpenAI port", t.url, path, b, n), flush=True)
                assert t.ollama is not None
                opath, ob = body("ollama", "flood", 5)
                print(burst_row("corral Ollama port", t.ollama, opath, ob, n), flush=True)
            with corral(tmp, models, "corral", backlog=128) as t:
                print(burst_row("corral backlog=128", t.url, path, b, n), flush=True)
            with corral(tmp, models, "corral", workers=2) as t:
                print(burst_row("corral workers=2", t.url, path, b, n), flush=True)
        if "relay" in only:
            relay_section(tmp, models, secs)
        if "workers" in only:
            workers_section(tmp, models, max(secs, 10))
        if "lease" in only:
            print("\n== lease cost ==", flush=True)
            print(asyncio.run(lease_cost(flood, 5000)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
