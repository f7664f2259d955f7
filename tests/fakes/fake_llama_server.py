"""A fake llama.cpp ``llama-server`` for integration tests.

It takes the command line Corral builds for a real child (``-m FILE --host H --port N
--parallel P -c CTX [--embedding] [--metrics] ...``; unknown flags are ignored), answers
on the same routes with the same wire shapes, and enforces slots the way llama-server
does: at most ``--parallel`` requests are processed at once, the rest wait (deferred).
It never reads the model file.

Replies are deterministic: the generated text is the words of the last user message (or
of the prompt) repeated until ``max_tokens`` tokens, one word per token. Without
``max_tokens`` it generates 8 tokens and stops as if it met end-of-generation
(``finish_reason: "stop"``); with it, ``finish_reason`` is ``"length"``.

Fault injection, read from the environment (Corral passes a model's ``env`` to its child):

FAKE_LOAD_DELAY=s          /health answers 503 "Loading model" for s seconds (default 0)
FAKE_CRASH_AT_START=1      print llama-server-like errors to stderr and exit 1 at once
FAKE_ECHO_ENV=NAME         print NAME=<its value> to stderr at start (a child that logs a
                           secret it was given)
FAKE_CRASH_AT_START_IF=f   the same, when file f exists (a relaunch that fails)
FAKE_CRASH_AFTER_CHUNKS=n  os._exit(1) after sending n content chunks of a stream
FAKE_HANG=1                /health never turns ready
FAKE_TOKEN_DELAY=s         seconds per generated token, streamed or not (default 0)
FAKE_EXIT_AFTER=s          exit with status 1 after s seconds (a crash while idle)
FAKE_TAIL_DELAY=s          wait s seconds between a stream's [DONE] and its end (default 0)
FAKE_SLOT_SAVE_FAIL=1      POST /slots/N?action=save answers 500 (disk full)
FAKE_SLOT_RESTORE_FAIL=1   POST /slots/N?action=restore answers 400 (a bad file)
FAKE_TOOL_CALLS=1          a chat request with ``tools`` whose last message is not a tool
                           result is answered with one call of the first tool, with
                           arguments {"a": 2, "b": 3} (finish_reason "tool_calls")
FAKE_STOP_AFTER=n          a chat or completion ends after n tokens as if it met
                           end-of-generation (finish_reason "stop") when max_tokens allows more
FAKE_REFUSE=f1,f2          the routes of these API families (messages, responses) answer
                           404, as on a server that speaks only chat completions

Scripted tool calls, read from the request (a tool loop's model, tests/integration/
test_tools.py): a chat request with ``tools`` whose last user message has lines
``call: NAME {json arguments}`` calls them one per turn, in order (the tool whose name
is NAME or ends in ``__NAME``), counting the tool results after that message; then it
answers ``tool said: <the last tool result>``. A line ``call-always: NAME {json}``
calls NAME on every turn (a model that never stops).

While loading, every route but /health answers that same 503, as llama-server's do.

Slots keep their last chat prompt (one token per word, plus 4 per message as a template
would add): a chat call served from a slot that holds a prefix of its prompt reports
that prefix as ``timings.cache_n``, as llama-server does. With ``--slot-save-path DIR``,
``POST /slots/N?action=save|restore|erase`` with ``{"filename": "x.bin"}`` saves a
slot's tokens to ``DIR/x.bin`` (JSON, not llama-server's format), restores or clears
them, with llama-server's answers and errors.

Test hooks, not in llama-server: ``GET /fake/stats`` answers

    max_concurrent  most requests ever processed at once (never above --parallel)
    requests        chat, completion and embedding requests received
    cancelled       generations whose client went away before the end: streams (seen
                    at the next chunk) and, with FAKE_TOKEN_DELAY, whole answers
    max_in_flight   most requests ever inside the server, waiting for a slot included
    deferred, processing, in_flight, pid, argv, ignored_args, parallel

and ``GET /fake/requests`` the last 100 requests received (method, path, headers, JSON
body), so that a test can see what Corral forwarded. A disconnect is only seen between
tokens: to test one, set FAKE_TOKEN_DELAY, or the whole answer is written at once.

One line per request (but /health, which Corral polls) goes to stdout; start-up and
fault messages go to stderr, as llama-server does. SIGTERM and SIGINT stop it with
status 0 within about a second, in-flight streams or not.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn


def _early_start() -> None:
    """What must happen before the slow imports (aiohttp takes ~0.2 s to import).

    A launch that fails must fail as fast as a real llama-server that cannot open its
    model. And a SIGTERM that arrives while importing must still end in a clean exit 0,
    as it does once the event loop's handler is installed.
    """
    echo = os.environ.get("FAKE_ECHO_ENV", "")
    if echo:
        sys.stderr.write(f"{echo}={os.environ.get(echo, '')}\n")
        sys.stderr.flush()
    crash_file = os.environ.get("FAKE_CRASH_AT_START_IF", "")
    if os.environ.get("FAKE_CRASH_AT_START", "") not in ("", "0") or (
        crash_file and os.path.exists(crash_file)
    ):
        argv = sys.argv
        model = next((a for p, a in itertools.pairwise(argv) if p in ("-m", "--model")), "?")
        sys.stderr.write(
            "build: 6000 (fake) with cc for x86_64-linux-gnu\n"
            f"llama_model_load: error loading model: failed to open {model}\n"
            "llama_model_load_from_file_impl: failed to load model\n"
            f"common_init_from_params: failed to load model '{model}'\n"
            f"srv    load_model: failed to load model, '{model}'\n"
            "main: exiting due to model loading error\n"
        )
        sys.stderr.flush()
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # aiohttp builds two verifying SSL contexts when imported, loading the system's CA
    # certificates: ~40 ms of a ~0.25 s start. The fake never speaks TLS; skip them.
    os.environ["SSL_CERT_FILE"] = os.devnull
    os.environ["SSL_CERT_DIR"] = os.devnull


if __name__ == "__main__":
    _early_start()

# After _early_start() on purpose: this import is most of the fake's start-up time.
from aiohttp import web  # noqa: E402

if __package__:
    from tests.fakes import fake_families
else:  # run as a script (as Corral runs it): this folder is on sys.path
    import fake_families  # type: ignore[no-redef]

BUILD_NUMBER = 6000
BUILD_INFO = f"b{BUILD_NUMBER}-fake"
N_CTX_TRAIN = 8192
N_VOCAB = 32000
EMBEDDING_DIM = 8
DEFAULT_TOKENS = 8
KEPT_REQUESTS = 100

# Options that take a value, by every spelling llama-server accepts. Anything not here is
# passed over, so that Corral may add flags the fake does not know.
_VALUED = {
    "model": ("-m", "--model"),
    "host": ("--host",),
    "port": ("--port",),
    "parallel": ("-np", "--parallel"),
    "ctx_size": ("-c", "--ctx-size"),
    "n_gpu_layers": ("-ngl", "--n-gpu-layers", "--gpu-layers"),
    "threads": ("-t", "--threads"),
    "alias": ("-a", "--alias"),
    "api_key": ("--api-key",),
    "slot_save_path": ("--slot-save-path",),
}
_FLAGS = {
    "embedding": ("--embedding", "--embeddings"),
    "metrics": ("--metrics",),
    "no_webui": ("--no-webui",),
    "slots": ("--slots",),
    "no_slots": ("--no-slots",),
}


@dataclass(frozen=True)
class Options:
    model: str
    host: str
    port: int
    parallel: int
    ctx_size: int
    embedding: bool
    metrics: bool
    slots_endpoint: bool
    alias: str | None
    api_key: str | None
    slot_save_path: str | None
    argv: tuple[str, ...]
    ignored: tuple[str, ...]


def parse_args(argv: Sequence[str]) -> Options:
    """Parse a llama-server command line, ignoring what the fake does not model.

    Tokens are sorted before argparse sees them: argparse would read an unknown
    ``-ctk q8_0`` as ``-c tk`` (short options take glued values), so only exact known
    options and their values reach it.
    """
    valued = {spelling: dest for dest, names in _VALUED.items() for spelling in names}
    flags = {spelling for names in _FLAGS.values() for spelling in names}
    known: list[str] = []
    ignored: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in valued:
            known.append(token)
            if "=" not in token and i + 1 < len(argv):
                known.append(argv[i + 1])
                i += 1
        elif token in flags:
            known.append(token)
        else:
            ignored.append(token)
        i += 1

    parser = argparse.ArgumentParser(prog="fake-llama-server", allow_abbrev=False)
    for dest, names in _VALUED.items():
        kind = int if dest in ("port", "parallel", "ctx_size", "n_gpu_layers", "threads") else str
        parser.add_argument(*names, dest=dest, type=kind)
    for dest, names in _FLAGS.items():
        parser.add_argument(*names, dest=dest, action="store_true")
    ns = parser.parse_args(known)
    if ns.model is None:
        parser.error("-m/--model is required (router mode is not faked)")
    # llama-server's -np -1 means "auto", which picks 4 slots.
    parallel = ns.parallel if ns.parallel is not None and ns.parallel > 0 else 4
    return Options(
        model=ns.model,
        host=ns.host or "127.0.0.1",
        port=ns.port if ns.port is not None else 8080,
        parallel=parallel,
        ctx_size=ns.ctx_size or 0,
        embedding=ns.embedding,
        metrics=ns.metrics,
        slots_endpoint=not ns.no_slots,
        alias=ns.alias,
        api_key=ns.api_key,
        slot_save_path=ns.slot_save_path,
        argv=tuple(argv),
        ignored=tuple(ignored),
    )


def _env_int(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _env_float(name: str, default: float = 0.0) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw else default


@dataclass(frozen=True)
class Faults:
    load_delay: float
    hang: bool
    crash_after_chunks: int | None
    token_delay: float
    exit_after: float | None
    # Seconds between a stream's [DONE] and its end (the chunked terminator).
    tail_delay: float = 0.0

    @classmethod
    def from_env(cls) -> Faults:
        chunks = os.environ.get("FAKE_CRASH_AFTER_CHUNKS", "")
        exit_after = os.environ.get("FAKE_EXIT_AFTER", "")
        return cls(
            load_delay=_env_float("FAKE_LOAD_DELAY"),
            hang=os.environ.get("FAKE_HANG", "") not in ("", "0"),
            crash_after_chunks=int(chunks) if chunks else None,
            token_delay=_env_float("FAKE_TOKEN_DELAY"),
            exit_after=float(exit_after) if exit_after else None,
            tail_delay=_env_float("FAKE_TAIL_DELAY"),
        )


@dataclass
class Stats:
    requests: int = 0
    cancelled: int = 0
    processing: int = 0
    max_concurrent: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    deferred: int = 0
    prompt_tokens: int = 0
    predicted_tokens: int = 0
    prompt_seconds: float = 0.0
    predicted_seconds: float = 0.0
    n_decode: int = 0


@dataclass
class Slot:
    id: int
    task: int = -1
    # The task it ran last and the prompt tokens it holds (the prompt cache).
    last_task: int = -1
    prompt: list[str] = field(default_factory=list)


@dataclass
class Server:
    """All state of one fake instance; handlers reach it through the app."""

    opts: Options
    faults: Faults
    ready_at: float
    stats: Stats = field(default_factory=Stats)
    slots: list[Slot] = field(default_factory=list)
    free: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT_REQUESTS))
    next_task: int = 0
    model_size: int = 0

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.opts.parallel)]
        for i in range(self.opts.parallel):
            self.free.put_nowait(i)
        # Read once at start-up, not in a handler: the model's size is in /v1/models.
        try:
            self.model_size = Path(self.opts.model).stat().st_size
        except OSError:
            self.model_size = 0

    @property
    def ready(self) -> bool:
        return not self.faults.hang and time.monotonic() >= self.ready_at

    @property
    def n_ctx_slot(self) -> int:
        total = self.opts.ctx_size if self.opts.ctx_size > 0 else N_CTX_TRAIN
        return total // self.opts.parallel

    @property
    def model_id(self) -> str:
        return self.opts.alias or self.opts.model

    async def acquire_slot(self, want: int | None = None) -> Slot:
        """Wait for an idle slot (the one asked for with ``id_slot``), as llama-server
        defers a task when all are busy."""
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        if self.free.empty():
            self.stats.deferred += 1
        try:
            if want is not None and 0 <= want < len(self.slots):
                slot = await self._take(want)
            else:
                slot = self.slots[await self.free.get()]
        except BaseException:
            self.stats.in_flight -= 1
            raise
        self.next_task += 1
        slot.task = slot.last_task = self.next_task
        self.stats.processing += 1
        self.stats.max_concurrent = max(self.stats.max_concurrent, self.stats.processing)
        return slot

    async def _take(self, want: int) -> Slot:
        idle = self.free._queue  # type: ignore[attr-defined]  # asyncio.Queue's deque
        if want not in idle:
            self.stats.deferred += 1
        # Polled: a fake's stand-in for llama-server's deferred task queue (a task for
        # a busy slot waits until that slot is released).
        for _ in range(6000):
            if want in idle:
                idle.remove(want)
                return self.slots[want]
            await asyncio.sleep(0.005)
        raise TimeoutError(f"slot {want} never became idle")

    def release_slot(self, slot: Slot) -> None:
        slot.task = -1
        self.stats.processing -= 1
        self.stats.in_flight -= 1
        self.free.put_nowait(slot.id)


SERVER = web.AppKey("server", Server)


def log_err(line: str) -> None:
    log(line, err=True)


def log(line: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    # Flushed per line: Corral reads the child's output through a pipe and keeps its tail.
    stream.write(line + "\n")
    stream.flush()


# --- wire shapes ------------------------------------------------------------------------


def json_response(data: Any, status: int = 200) -> web.Response:
    # Compact, as llama-server writes it; a proxy test may compare bytes.
    return web.json_response(data, status=status, dumps=_compact_dumps)


def _compact_dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def error_body(code: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": kind}}


def error_response(code: int, message: str, kind: str) -> web.Response:
    return json_response(error_body(code, message, kind), status=code)


def exceeded(request: web.Request, tokens: int) -> web.Response | None:
    """llama-server's refusal of a prompt longer than a slot's context, with its counts."""
    n_ctx = request.app[SERVER].n_ctx_slot
    if tokens < n_ctx:
        return None
    body = error_body(400, f"request ({tokens} tokens) exceeds the available context size "
                      f"({n_ctx} tokens), try increasing it", "exceed_context_size_error")
    body["error"] |= {"n_prompt_tokens": tokens, "n_ctx": n_ctx}
    return json_response(body, status=400)


def loading_response() -> web.Response:
    return error_response(503, "Loading model", "unavailable_error")


def words_of(text: str) -> list[str]:
    return text.split() or ["ok"]


def count_tokens(text: str) -> int:
    return len(text.split())


def token_id(word: str) -> int:
    digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % N_VOCAB


def content_text(content: Any) -> str:
    """The text of an OpenAI message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return " ".join(str(p) for p in prompt)
    return str(prompt)


def embedding_of(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [int.from_bytes(digest[i : i + 4], "little") / 2**31 - 1.0 for i in range(0, 32, 4)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


@dataclass
class Generation:
    """What one request asks for, reduced to what the fake needs."""

    model: str
    pieces: list[str]
    finish_reason: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    started: float = field(default_factory=time.perf_counter)
    # The prompt's tokens (chat only) and how many of them the slot had cached.
    prompt_words: list[str] = field(default_factory=list)
    cache_n: int = 0
    # The slot asked for (``id_slot``); None: any idle one.
    id_slot: int | None = None

    @classmethod
    def build(
        cls, body: dict[str, Any], default_model: str, source: str, prompt_tokens: int
    ) -> Generation:
        limit = body.get("max_tokens", body.get("max_completion_tokens", body.get("n_predict")))
        if isinstance(limit, int) and limit >= 0:
            count, finish = limit, "length"
        else:
            count, finish = DEFAULT_TOKENS, "stop"
        natural = _env_int("FAKE_STOP_AFTER")
        if natural is not None and natural < count:
            count, finish = natural, "stop"
        words = words_of(source)
        pieces = [("" if i == 0 else " ") + words[i % len(words)] for i in range(count)]
        options = body.get("stream_options")
        return cls(
            model=str(body.get("model") or default_model),
            pieces=pieces,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            stream=bool(body.get("stream", False)),
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
            id_slot=body["id_slot"] if isinstance(body.get("id_slot"), int) else None,
        )

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> dict[str, int]:
        n = len(self.pieces)
        return {
            "completion_tokens": n,
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": n + self.prompt_tokens,
        }

    def timings(self) -> dict[str, float | int]:
        # A fixed prompt speed; generation time is what really elapsed.
        prompt_ms = self.prompt_tokens * 0.5
        predicted_ms = max((time.perf_counter() - self.started) * 1000.0, 0.001)
        n = len(self.pieces)
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_tokens - self.cache_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": 0.5,
            "prompt_per_second": 2000.0,
            "predicted_n": n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": n * 1000.0 / predicted_ms,
        }


def envelope(gen: Generation, ident: str, obj: str, created: int) -> dict[str, Any]:
    # Key order follows llama-server's output.
    return {
        "choices": [],
        "created": created,
        "id": ident,
        "model": gen.model,
        "system_fingerprint": BUILD_INFO,
        "object": obj,
    }


def chat_chunks(gen: Generation, ident: str, created: int) -> Iterator[tuple[dict[str, Any], bool]]:
    """The events of a chat stream, each with whether it carries a generated token."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        out = envelope(gen, ident, "chat.completion.chunk", created)
        out["choices"] = [{"finish_reason": finish, "index": 0, "delta": delta}]
        return out

    yield chunk({"role": "assistant", "content": None}, None), False
    for piece in gen.pieces:
        yield chunk({"content": piece}, None), True
    yield chunk({}, gen.finish_reason), False


def completion_chunks(
    gen: Generation, ident: str, created: int
) -> Iterator[tuple[dict[str, Any], bool]]:
    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        out = envelope(gen, ident, "text_completion", created)
        out["choices"] = [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]
        return out

    for piece in gen.pieces:
        yield chunk(piece, None), True
    yield chunk("", gen.finish_reason), False


# --- request handling -------------------------------------------------------------------


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _overflows(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(_overflows(v) for v in value.values())
    if isinstance(value, list):
        return any(_overflows(v) for v in value)
    return False


async def read_json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as e:
        # ValueError: also an integer of more digits than Python converts (llama-server
        # answers "number overflow", a 400).
        return error_response(400, f"Failed to parse JSON: {e}", "invalid_request_error")
    if not isinstance(body, dict):
        return error_response(
            400, "the request body must be a JSON object", "invalid_request_error"
        )
    if _overflows(body):
        # As llama-server's JSON parser (nlohmann) answers an integer past 64 bits.
        return error_response(400, "[json.exception.out_of_range.406] number overflow",
                              "invalid_request_error")
    srv = request.app[SERVER]
    srv.recent.append(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body": body,
        }
    )
    return body


def account(srv: Server, gen: Generation, sent: int) -> None:
    srv.stats.prompt_tokens += gen.prompt_tokens
    srv.stats.predicted_tokens += sent
    srv.stats.prompt_seconds += gen.prompt_tokens * 0.0005
    srv.stats.predicted_seconds += time.perf_counter() - gen.started
    srv.stats.n_decode += sent


async def generate(request: web.Request, gen: Generation, kind: str) -> web.StreamResponse:
    """Run one generation in a slot; stream it or answer it whole."""
    srv = request.app[SERVER]
    created = int(time.time())
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    ident = f"{prefix}-{hashlib.blake2b(os.urandom(8), digest_size=12).hexdigest()}"
    slot = await srv.acquire_slot(gen.id_slot)
    gen.started = time.perf_counter()
    if gen.prompt_words:
        gen.cache_n = common_prefix(slot.prompt, gen.prompt_words)
        slot.prompt = list(gen.prompt_words)
    try:
        if gen.stream:
            return await stream_reply(request, gen, kind, ident, created)
        sent = 0
        for _ in gen.pieces:
            if srv.faults.token_delay > 0:
                await asyncio.sleep(srv.faults.token_delay)
                # llama-server cancels the task of a closed connection; so does the fake.
                if client_gone(request):
                    srv.stats.cancelled += 1
                    account(srv, gen, sent)
                    log(f"srv  log_server_r: task cancelled: client disconnected (slot {slot.id})")
                    return web.Response(status=499)
            sent += 1
        account(srv, gen, sent)
        body = envelope(
            gen, ident, "chat.completion" if kind == "chat" else "text_completion", created
        )
        if kind == "chat":
            body["choices"] = [
                {
                    "finish_reason": gen.finish_reason,
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                }
            ]
        else:
            body["choices"] = [
                {"text": gen.text, "index": 0, "logprobs": None, "finish_reason": gen.finish_reason}
            ]
        body["usage"] = gen.usage()
        body["timings"] = gen.timings()
        return json_response(body)
    finally:
        srv.release_slot(slot)


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def crash_mid_stream(after: int) -> NoReturn:
    log(f"fake: FAKE_CRASH_AFTER_CHUNKS={after}: crashing mid-stream", err=True)
    # No cleanup, no FIN before the kernel closes the socket: as abrupt as a segfault.
    os._exit(1)


async def stream_reply(
    request: web.Request, gen: Generation, kind: str, ident: str, created: int
) -> web.StreamResponse:
    srv = request.app[SERVER]
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    events = list(
        chat_chunks(gen, ident, created)
        if kind == "chat"
        else completion_chunks(gen, ident, created)
    )
    if gen.include_usage:
        tail = envelope(gen, ident, events[-1][0]["object"], created)
        tail["usage"] = gen.usage()
        events.append((tail, False))
    sent = 0
    crash_after = srv.faults.crash_after_chunks
    try:
        for i, (chunk, is_content) in enumerate(events):
            if is_content and srv.faults.token_delay > 0:
                await asyncio.sleep(srv.faults.token_delay)
            if is_content and crash_after is not None and sent >= crash_after:
                crash_mid_stream(crash_after)  # FAKE_CRASH_AFTER_CHUNKS=0: before any token
            # A write into a closed transport may still succeed (it is buffered), so look
            # at the transport first: the disconnect must be seen at the next token.
            if client_gone(request):
                raise ConnectionResetError("client disconnected")
            if i == len(events) - 1:
                account(srv, gen, sent)
                chunk["timings"] = gen.timings()
            await resp.write(
                b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
            )
            if is_content:
                sent += 1
                if crash_after is not None and sent >= crash_after:
                    crash_mid_stream(crash_after)
        await resp.write(b"data: [DONE]\n\n")
        if srv.faults.tail_delay > 0:
            await asyncio.sleep(srv.faults.tail_delay)
        await resp.write_eof()
    except ConnectionResetError:
        # Also aiohttp's ClientConnectionResetError ("Cannot write to closing transport").
        # Counted so that a test can prove a client disconnect reached the upstream.
        srv.stats.cancelled += 1
        account(srv, gen, sent)
        log(f"srv  log_server_r: stream cancelled after {sent} tokens: client disconnected")
    return resp


async def handle_chat(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error_response(400, "'messages' is required", "invalid_request_error")
    srv.stats.requests += 1
    last_user = ""
    prompt_tokens = 0
    prompt_words: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            return error_response(400, "each message must be an object", "invalid_request_error")
        text = content_text(m.get("content"))
        # About what a chat template adds around each message.
        prompt_tokens += count_tokens(text) + 4
        prompt_words += ["<turn>", str(m.get("role")), ":", *words_of(text), "</turn>"][
            : count_tokens(text) + 4]
        if m.get("role") == "user":
            last_user = text
    if (refused := exceeded(request, prompt_tokens)) is not None:
        return refused
    tool_reply = tool_call_reply(body, srv.model_id) or scripted_tool_reply(
        body, srv.model_id, messages)
    if tool_reply is not None:
        faults = srv.faults
        if ((faults.token_delay > 0 or faults.crash_after_chunks is not None)
                and tool_reply.content_type == "text/event-stream"):
            srv.stats.in_flight += 1  # a test sees the turn still being generated
            try:
                return await _paced(request, tool_reply, faults.token_delay,
                                    faults.crash_after_chunks)
            finally:
                srv.stats.in_flight -= 1
        return tool_reply
    gen = Generation.build(body, srv.model_id, last_user, prompt_tokens)
    gen.prompt_words = prompt_words
    return await generate(request, gen, "chat")


def _script(messages: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], bool, int, int]:
    """(calls, always, index of the last user message, tool results after it)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    text = content_text(messages[last].get("content")) if last >= 0 else ""
    calls, always = [], False
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(":")
        if kind in ("call", "call-always") and rest.strip():
            name, _, args = rest.strip().partition(" ")
            calls.append((name, args.strip() or "{}"))
            always = always or kind == "call-always"
    done = sum(1 for m in messages[last + 1:] if m.get("role") == "tool")
    return calls, always, last, done


async def _paced(request: web.Request, whole: web.StreamResponse, delay: float,
                 crash_after: int | None) -> web.StreamResponse:
    """A scripted stream's events written one at a time, ``delay`` apart (and the
    process gone after ``crash_after`` text chunks)."""
    assert isinstance(whole, web.Response) and whole.text is not None
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    sent = 0
    for event in whole.text.split("\n\n"):
        if event:
            # Before each event: the stream ends as soon as its last one is written.
            await asyncio.sleep(delay)
            await out.write((event + "\n\n").encode())
            sent += '"content":' in event
            if crash_after is not None and sent >= crash_after:
                crash_mid_stream(crash_after)
    await out.write_eof()
    return out


def scripted_tool_reply(body: dict[str, Any], model: str,
                        messages: list[dict[str, Any]]) -> web.StreamResponse | None:
    """The calls a prompt scripts (see the module docstring), then the answer."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    calls, always, _, done = _script(messages)
    if not calls:
        return None
    names = [str((t.get("function") or {}).get("name", "")) for t in tools]
    if always or done < len(calls):
        want, args = calls[0] if always else calls[done]
        name = next((n for n in names if n == want or n.endswith("__" + want)), want)
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": f"call_{done}", "type": "function",
             "function": {"name": name, "arguments": args}}]}
        finish = "tool_calls"
    else:
        message = {"role": "assistant",
                   "content": "tool said: " + content_text(messages[-1].get("content"))}
        finish = "stop"
    created, ident = int(time.time()), f"chatcmpl-script{done}"
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    if not body.get("stream"):
        return json_response({"id": ident, "object": "chat.completion", "created": created,
                              "model": model, "usage": usage, "choices": [{
                                  "index": 0, "finish_reason": finish, "message": message}]})
    delta = {k: v for k, v in message.items() if v is not None}
    # An answer streams a word a chunk (paced by FAKE_TOKEN_DELAY in handle_chat).
    pieces = ([{**delta, "content": w} for w in re.findall(r"\S+\s*", delta["content"])]
              if delta.get("content") else [delta])
    chunks = [*({"choices": [{"index": 0, "finish_reason": None, "delta": d}]}
                for d in pieces),
              {"choices": [{"index": 0, "finish_reason": finish, "delta": {}}]},
              {"choices": [], "usage": usage}]
    text = "".join("data: " + _compact_dumps({"id": ident, "object": "chat.completion.chunk",
                                              "created": created, "model": model, **c}) + "\n\n"
                   for c in chunks) + "data: [DONE]\n\n"
    return web.Response(text=text, content_type="text/event-stream")


def tool_call_reply(body: dict[str, Any], model: str) -> web.StreamResponse | None:
    """FAKE_TOOL_CALLS: the first tool, called once, streamed or not."""
    tools, messages = body.get("tools"), body["messages"]
    if (os.environ.get("FAKE_TOOL_CALLS", "") in ("", "0") or not isinstance(tools, list)
            or not tools or messages[-1].get("role") == "tool"):
        return None
    name = str((tools[0].get("function") or {}).get("name", "tool"))
    call = {"index": 0, "id": "call_0", "type": "function",
            "function": {"name": name, "arguments": '{"a": 2, "b": 3}'}}
    created, ident = int(time.time()), "chatcmpl-tool"
    if not body.get("stream"):
        return json_response({"id": ident, "object": "chat.completion", "created": created,
                              "model": model, "choices": [{
                                  "index": 0, "finish_reason": "tool_calls",
                                  "message": {"role": "assistant", "content": None,
                                              "tool_calls": [call]}}]})
    chunks = [
        {"choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [call]}}]},
        {"choices": [{"index": 0, "finish_reason": "tool_calls", "delta": {}}],
         "timings": {"prompt_n": 4, "cache_n": 0, "prompt_ms": 2.0, "predicted_n": 1,
                     "predicted_ms": 1.0, "predicted_per_second": 1000.0}},
    ]
    text = "".join("data: " + _compact_dumps({"id": ident, "object": "chat.completion.chunk",
                                              "created": created, "model": model, **c}) + "\n\n"
                   for c in chunks) + "data: [DONE]\n\n"
    return web.Response(text=text, content_type="text/event-stream")


async def handle_apply_template(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    messages = body.get("messages")
    if not isinstance(messages, list):
        return error_response(400, "'messages' is required", "invalid_request_error")
    prompt = "".join(f"<{m.get('role')}>{content_text(m.get('content'))}\n"
                     for m in messages if isinstance(m, dict))
    return json_response({"prompt": prompt + "<assistant>"})


async def handle_completions(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if "prompt" not in body:
        return error_response(400, "'prompt' is required", "invalid_request_error")
    srv.stats.requests += 1
    text = prompt_text(body["prompt"])
    if (refused := exceeded(request, count_tokens(text))) is not None:
        return refused
    gen = Generation.build(body, srv.model_id, text, count_tokens(text))
    return await generate(request, gen, "completion")


async def handle_embeddings(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    if not srv.opts.embedding:
        return error_response(
            501,
            "This server does not support embeddings. Start it with `--embeddings`",
            "not_supported_error",
        )
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    raw = body.get("input", body.get("content"))
    listed = raw if isinstance(raw, list) else [raw]
    inputs = [x for x in listed if isinstance(x, str)]
    if raw is None or len(inputs) != len(listed):
        return error_response(
            400, "'input' must be a string or a list of strings", "invalid_request_error"
        )
    srv.stats.requests += 1
    slot = await srv.acquire_slot()
    try:
        if srv.faults.token_delay > 0:
            await asyncio.sleep(srv.faults.token_delay)
        tokens = sum(count_tokens(x) for x in inputs)
        srv.stats.prompt_tokens += tokens
        data = [
            {"embedding": embedding_of(x), "index": i, "object": "embedding"}
            for i, x in enumerate(inputs)
        ]
    finally:
        srv.release_slot(slot)
    return json_response(
        {
            "model": str(body.get("model") or srv.model_id),
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": data,
        }
    )


async def handle_tokenize(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    words = str(body.get("content", "")).split()
    if body.get("with_pieces"):
        return json_response({"tokens": [{"id": token_id(w), "piece": w} for w in words]})
    return json_response({"tokens": [token_id(w) for w in words]})


async def handle_health(request: web.Request) -> web.StreamResponse:
    if not request.app[SERVER].ready:
        return loading_response()
    return json_response({"status": "ok"})


async def handle_index(request: web.Request) -> web.StreamResponse:
    """llama-server's web UI page, in miniature (raw passthrough tests fetch it)."""
    return web.Response(text="<!doctype html><html><head><title>llama.cpp - chat</title>"
                        "</head><body><div id=app></div></body></html>",
                        content_type="text/html")


async def handle_props(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    return json_response(
        {
            "default_generation_settings": {
                "id": 0,
                "id_task": -1,
                "n_ctx": srv.n_ctx_slot,
                "speculative": False,
                "is_processing": False,
                "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95},
            },
            "total_slots": srv.opts.parallel,
            "model_path": srv.opts.model,
            "modalities": {"vision": False, "audio": False},
            "chat_template": "{{ messages }}",
            "build_info": BUILD_INFO,
            "is_sleeping": False,
        }
    )


async def handle_slots(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    if not srv.opts.slots_endpoint:
        return error_response(
            501,
            "This server does not support slots endpoint. Start it with `--slots`",
            "not_supported_error",
        )
    if request.query.get("fail_on_no_slot") and srv.free.empty():
        return error_response(503, "no slot available", "unavailable_error")
    return json_response(
        [
            {
                "id": s.id,
                "id_task": s.task if s.task != -1 else s.last_task,
                "n_ctx": srv.n_ctx_slot,
                "speculative": False,
                "is_processing": s.task != -1,
                "n_prompt_tokens": len(s.prompt),
            }
            for s in srv.slots
        ]
    )


async def handle_slot_action(request: web.Request) -> web.StreamResponse:
    """llama-server's POST /slots/{id}?action=save|restore|erase."""
    srv = request.app[SERVER]
    if not srv.opts.slot_save_path:
        return error_response(
            501, "This server does not support slots action. Start it with `--slot-save-path`",
            "not_supported_error")
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    try:
        slot = srv.slots[int(request.match_info["id"]) % len(srv.slots)]
    except ValueError:
        return error_response(400, "Invalid slot ID", "invalid_request_error")
    action = request.query.get("action", "")
    if action == "erase":
        n, slot.prompt = len(slot.prompt), []
        return json_response({"id_slot": slot.id, "n_erased": n})
    name = body.get("filename")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        return error_response(400, "Invalid filename", "invalid_request_error")
    path = Path(srv.opts.slot_save_path) / name
    started = time.perf_counter()
    if action == "save":
        if os.environ.get("FAKE_SLOT_SAVE_FAIL", "") not in ("", "0"):
            return error_response(500, "Unable to save slot", "server_error")
        data = json.dumps({"tokens": slot.prompt}).encode()
        path.write_bytes(data)
        return json_response({"id_slot": slot.id, "filename": name,
                              "n_saved": len(slot.prompt), "n_written": len(data),
                              "timings": {"save_ms": (time.perf_counter() - started) * 1e3}})
    if action == "restore":
        try:
            if os.environ.get("FAKE_SLOT_RESTORE_FAIL", "") not in ("", "0"):
                raise ValueError("invalid slot save file")
            raw = path.read_bytes()
            tokens = json.loads(raw)["tokens"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            slot.prompt = []
            return error_response(400, f"Unable to restore slot: {e}", "invalid_request_error")
        slot.prompt = [str(t) for t in tokens]
        return json_response({"id_slot": slot.id, "filename": name,
                              "n_restored": len(slot.prompt), "n_read": len(raw),
                              "timings": {"restore_ms": (time.perf_counter() - started) * 1e3}})
    return error_response(400, "Invalid action", "invalid_request_error")


async def handle_models(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    return json_response(
        {
            "models": [
                {
                    "name": srv.model_id,
                    "model": srv.model_id,
                    "modified_at": "",
                    "size": "",
                    "digest": "",
                    "type": "model",
                    "description": "",
                    "tags": [""],
                    "capabilities": ["completion"] + (["embedding"] if srv.opts.embedding else []),
                    "parameters": "",
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "",
                        "families": [""],
                    },
                }
            ],
            "object": "list",
            "data": [
                {
                    "id": srv.model_id,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "llamacpp",
                    "meta": {
                        "vocab_type": 2,
                        "n_vocab": N_VOCAB,
                        "n_ctx_train": N_CTX_TRAIN,
                        "n_embd": EMBEDDING_DIM,
                        "n_params": 1_000_000,
                        "size": srv.model_size,
                    },
                }
            ],
        }
    )


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    if not srv.opts.metrics:
        return error_response(
            501,
            "This server does not support metrics endpoint. Start it with `--metrics`",
            "not_supported_error",
        )
    st = srv.stats
    series: list[tuple[str, str, str, float]] = [
        ("prompt_tokens_total", "counter", "Number of prompt tokens processed.", st.prompt_tokens),
        ("prompt_seconds_total", "counter", "Prompt process time", st.prompt_seconds),
        (
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            st.predicted_tokens,
        ),
        ("tokens_predicted_seconds_total", "counter", "Predict process time", st.predicted_seconds),
        ("n_decode_total", "counter", "Total number of llama_decode() calls", st.n_decode),
        ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.", 2000.0),
        (
            "predicted_tokens_seconds",
            "gauge",
            "Average generation throughput in tokens/s.",
            st.predicted_tokens / st.predicted_seconds if st.predicted_seconds else 0.0,
        ),
        ("requests_processing", "gauge", "Number of requests processing.", st.processing),
        (
            "requests_deferred",
            "gauge",
            "Number of requests deferred.",
            st.in_flight - st.processing,
        ),
    ]
    lines: list[str] = []
    for name, kind, help_text, value in series:
        lines += [
            f"# HELP llamacpp:{name} {help_text}",
            f"# TYPE llamacpp:{name} {kind}",
            f"llamacpp:{name} {value:g}",
        ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


async def handle_fake_stats(request: web.Request) -> web.StreamResponse:
    srv = request.app[SERVER]
    st = srv.stats
    return json_response(
        {
            "max_concurrent": st.max_concurrent,
            "requests": st.requests,
            "cancelled": st.cancelled,
            "processing": st.processing,
            "in_flight": st.in_flight,
            "max_in_flight": st.max_in_flight,
            "deferred": st.deferred,
            "pid": os.getpid(),
            "argv": list(srv.opts.argv),
            "ignored_args": list(srv.opts.ignored),
            "parallel": srv.opts.parallel,
        }
    )


async def handle_fake_requests(request: web.Request) -> web.StreamResponse:
    return json_response(list(request.app[SERVER].recent))


# Routes llama-server serves before the model is loaded, and those that skip the API key.
_ALWAYS_OPEN = frozenset({"/health", "/v1/health", "/fake/stats", "/fake/requests"})
_NO_KEY = frozenset(
    {"/health", "/v1/health", "/models", "/v1/models", "/fake/stats", "/fake/requests"}
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def llama_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Loading state, API key, error shapes and the per-request log line."""
    srv = request.app[SERVER]
    started = time.perf_counter()
    if request.path not in _ALWAYS_OPEN and not srv.ready:
        resp: web.StreamResponse = loading_response()
    elif (
        srv.opts.api_key
        and request.path not in _NO_KEY
        and request.headers.get("Authorization", "") != f"Bearer {srv.opts.api_key}"
    ):
        resp = error_response(401, "Invalid API Key", "authentication_error")
    else:
        try:
            resp = await handler(request)
        except web.HTTPNotFound:
            resp = error_response(404, "File Not Found", "not_found_error")
        except web.HTTPMethodNotAllowed:
            resp = error_response(405, "Method Not Allowed", "invalid_request_error")
    if request.path != "/health":
        ms = (time.perf_counter() - started) * 1000
        log(
            f"srv  log_server_r: request: {request.method} {request.path} "
            f"{request.remote} {resp.status} {ms:.1f} ms"
        )
    return resp


def build_app(srv: Server) -> web.Application:
    # llama-server takes bodies of any size; so does the fake.
    app = web.Application(middlewares=[llama_gate], client_max_size=1 << 30)
    app[SERVER] = srv
    app.router.add_get("/health", handle_health)
    app.router.add_get("/v1/health", handle_health)
    app.router.add_get("/props", handle_props)
    app.router.add_get("/", handle_index)
    app.router.add_get("/slots", handle_slots)
    app.router.add_post("/slots/{id}", handle_slot_action)
    app.router.add_get("/models", handle_models)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/metrics", handle_metrics)
    for prefix in ("", "/v1"):
        app.router.add_post(f"{prefix}/chat/completions", handle_chat)
        app.router.add_post(f"{prefix}/completions", handle_completions)
        app.router.add_post(f"{prefix}/embeddings", handle_embeddings)
    app.router.add_post("/completion", handle_completions)
    app.router.add_post("/tokenize", handle_tokenize)
    fake_families.add_routes(app, read_json, exceeded)
    app.router.add_post("/apply-template", handle_apply_template)
    app.router.add_get("/fake/stats", handle_fake_stats)
    app.router.add_get("/fake/requests", handle_fake_requests)
    return app


@dataclass
class Lifecycle:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


def crash_idle(seconds: float) -> None:
    log(f"fake: FAKE_EXIT_AFTER={seconds:g}: exiting on its own", err=True)
    os._exit(1)


async def serve(opts: Options, faults: Faults) -> int:
    loop = asyncio.get_running_loop()
    life = Lifecycle()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Handlers only set a flag; shutdown runs in serve() below.
        loop.add_signal_handler(sig, life.stop.set)
    srv = Server(opts=opts, faults=faults, ready_at=time.monotonic() + faults.load_delay)
    log(f"build: {BUILD_NUMBER} (fake) with cc for x86_64-linux-gnu", err=True)
    log(f"system info: n_threads = 2 | fake | pid = {os.getpid()}", err=True)
    log(f"main: loading model '{opts.model}'", err=True)
    if opts.ignored:
        log(f"fake: ignored arguments: {' '.join(opts.ignored)}", err=True)
    # A small shutdown_timeout: in-flight streams must not hold SIGTERM up; llama-server
    # drops them too.
    runner = web.AppRunner(
        build_app(srv), access_log=None, handle_signals=False, shutdown_timeout=0.2
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, opts.host, opts.port, reuse_address=True)
        await site.start()
        log(
            f"main: server is listening on http://{opts.host}:{opts.port} - starting the main loop",
            err=True,
        )
        if not faults.hang:
            loaded = f"main: model loaded\nsrv  update_slots: all {opts.parallel} slots are idle"
            life.timers.append(loop.call_later(faults.load_delay, log_err, loaded))
        if faults.exit_after is not None:
            life.timers.append(loop.call_later(faults.exit_after, crash_idle, faults.exit_after))
        await life.stop.wait()
        log("srv    operator(): operator(): cleaning up before exit...", err=True)
    finally:
        for timer in life.timers:
            timer.cancel()
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    faults = Faults.from_env()
    try:
        return asyncio.run(serve(opts, faults))
    except OSError as e:
        # A port already taken: llama-server exits 1 with a log line, so does the fake.
        log(
            f"main: couldn't bind HTTP server socket, {opts.host}:{opts.port}: {e}",
            err=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
