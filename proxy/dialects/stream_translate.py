"""llama-server's answers as Ollama lines and LM Studio stats (pure, no I/O).

``OllamaStream`` turns the SSE events of a chat, completion or /infill stream into
Ollama's NDJSON lines (or the one object of ``stream: false``); ``durations`` and
``lmstudio_stats`` read llama-server's timings. The streaming writer hands it one read
batch at a time: the batch's timestamp is formatted once, not per line (a per-line
RFC 3339 timestamp was 10 % of the Ollama path's CPU).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from proxy.dialects.translate import rfc3339, upstream_error
from scheduler.errors import UpstreamFailed

# --- metrics --------------------------------------------------------------------------


def _num(d: Mapping[str, Any] | None, key: str) -> float:
    value = d.get(key) if d else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def durations(
    timings: Mapping[str, Any] | None, usage: Mapping[str, Any] | None
) -> dict[str, int]:
    """llama-server timings/usage -> Ollama's counts and integer nanoseconds.

    Zero values are left out, as Go's omitempty does. eval_duration stays >= 1 ns
    whenever tokens were generated: clients divide by it for tokens per second.
    """
    if timings:
        prompt_count = int(_num(timings, "cache_n") + _num(timings, "prompt_n"))
        eval_count = int(_num(timings, "predicted_n"))
    else:
        prompt_count = int(_num(usage, "prompt_tokens"))
        eval_count = int(_num(usage, "completion_tokens"))
    out = {
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": round(_num(timings, "prompt_ms") * 1e6),
        "eval_count": eval_count,
        "eval_duration": round(_num(timings, "predicted_ms") * 1e6),
    }
    if eval_count > 0:
        out["eval_duration"] = max(1, out["eval_duration"])
    return {k: v for k, v in out.items() if v}


def done_reason(finish_reason: str | None) -> str:
    # "tool_calls" is "stop" in Ollama: the model stopped to let the client call.
    return "length" if finish_reason == "length" else "stop"


# llama-server's native stop_type, and OpenAI finish_reason, -> LM Studio stop_reason.
_STOP_REASONS = {
    "eos": "eosFound",
    "word": "stopStringFound",
    "limit": "maxPredictedTokensReached",
    "length": "maxPredictedTokensReached",
    "tool_calls": "toolCalls",
    "stop": "eosFound",
}


def lmstudio_stop_reason(finish_reason: str | None, stop_type: str | None = None) -> str:
    """OpenAI's "stop" does not say whether an EOS token or a stop string ended the
    answer; the native ``stop_type`` does, and wins when it is known."""
    for key in (stop_type, finish_reason):
        if key is not None and key in _STOP_REASONS:
            return _STOP_REASONS[key]
    return "eosFound"


def lmstudio_stats(
    timings: Mapping[str, Any] | None, finish_reason: str | None, stop_type: str | None = None
) -> dict[str, Any]:
    """LM Studio's /api/v0 ``stats`` from llama-server's timings."""
    return {
        "tokens_per_second": _num(timings, "predicted_per_second"),
        "time_to_first_token": _num(timings, "prompt_ms") / 1000.0,
        "generation_time": _num(timings, "predicted_ms") / 1000.0,
        "stop_reason": lmstudio_stop_reason(finish_reason, stop_type),
    }


# --- llama-server SSE -> Ollama lines -------------------------------------------------


def probe_line(kind: str, model: str, reason: str) -> dict[str, Any]:
    """The answer to a load/unload probe (empty messages or prompt)."""
    line: dict[str, Any] = {"model": model, "created_at": rfc3339()}
    if kind == "chat":
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    line.update({"done": True, "done_reason": reason})
    return line


log = logging.getLogger(__name__)


# -- the fast path: the common chunk, decoded into structs ------------------------------
# Nearly every chunk of a stream is one content delta. msgspec decodes it into these
# structs, skipping every other field without building it, and the line is written
# from bytes around the encoded text: 1.3 µs a chunk against 4.7 µs for a dict parse,
# OllamaStream.feed and a dict encode. Anything else (tool calls, reasoning, logprobs,
# errors, usage-only and /infill events) takes the general path, ``feed``.


# A field typed None takes only null: tool calls or logprobs fail the decode, in C, and
# the chunk takes the general path (``Raw | None`` is no union msgspec decodes: it
# takes null only, the same way, and its ``!= b"null"`` checks never ran).
class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None
    logprobs: None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    error: msgspec.Raw | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_any = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


@dataclass
class _ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


@dataclass
class OllamaStream:
    """Turns llama-server stream events into Ollama chat or generate lines.

    Feed every event (OpenAI chat or completion chunks, or native /infill events);
    ``feed`` returns a line to send, or None. Usage and timings are stashed from any
    chunk, since they ride on the last one, which may have no choices. Tool-call
    fragments are accumulated by index and sent whole at the end (Ollama's arguments
    are objects, which cannot be streamed in pieces). ``tail`` gives the closing
    lines; ``whole`` the single object of a non-streamed answer.
    """

    kind: Literal["chat", "generate"]
    model: str
    # False: the client asked for no reasoning; drop any that still arrives.
    show_thinking: bool = True
    now: Callable[[], str] = rfc3339
    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None
    stop_type: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    # The timestamp of the read batch being fed (``feed_batch``); None: ask ``now``.
    _stamp: str | None = None
    _model_json: bytes | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed_batch(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The lines for the events of one network read, all stamped with one time:
        they arrived together, and formatting a timestamp per token was a tenth of the
        path's CPU."""
        self._stamp = self.now()
        try:
            return [line for event in events if (line := self.feed(event)) is not None]
        finally:
            self._stamp = None

    def feed_data_batch(self, datas: list[bytes]) -> bytes:
        """``feed_batch`` from the events' JSON text, straight to NDJSON bytes."""
        self._stamp = stamp = self.now()
        if self._model_json is None:
            self._model_json = b'{"model":' + _encode(self.model) + b',"created_at":"'
        head = self._model_json + stamp.encode() + (
            b'","message":{"role":"assistant","content":' if self.kind == "chat"
            else b'","response":')
        tail = b'},"done":false}\n' if self.kind == "chat" else b',"done":false}\n'
        out: list[bytes] = []
        try:
            for data in datas:
                text = self._fast(data)
                if text is not None:
                    if text:
                        self.content.append(text)
                        out.append(head + _encode(text) + tail)
                    continue
                try:
                    event = _decode_any(data)
                except (msgspec.DecodeError, RecursionError):
                    log.warning("unparseable SSE data from upstream: %.200r", data)
                    continue
                if isinstance(event, dict) and (line := self.feed(event)) is not None:
                    out.append(_encode(line) + b"\n")
        finally:
            self._stamp = None
        return b"".join(out)

    def _fast(self, data: bytes) -> str | None:
        """The text of a plain content chunk (its bookkeeping done); None: not one."""
        try:
            chunk = _decode_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return None
        choices = chunk.choices
        if chunk.error is not None or not choices:
            return None
        choice = choices[0]
        delta = choice.delta
        if delta is not None:
            if delta.reasoning_content or delta.reasoning:
                return None
            text = delta.content or ""
        else:
            text = choice.text or ""
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.timings is not None:
            self.timings = chunk.timings
        if choice.finish_reason is not None:
            self.finish_reason = choice.finish_reason
        return text

    def feed(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        if "error" in event:
            raise upstream_error(event)
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
        choices = event.get("choices")
        if isinstance(choices, list):
            if not choices or not isinstance(choices[0], dict):
                return None
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = _text(delta.get("content"))
                thought = _text(delta.get("reasoning_content") or delta.get("reasoning"))
                self._tool_fragments(delta.get("tool_calls"))
            else:
                text, thought = _text(choice.get("text")), ""
            lp = choice.get("logprobs")
            tokens = lp.get("content") if isinstance(lp, dict) else None
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        else:  # native /infill event
            text, thought, tokens = _text(event.get("content")), "", None
            if event.get("stop"):
                self.stop_type = _text(event.get("stop_type")) or None
                self.finish_reason = "length" if self.stop_type == "limit" else "stop"
        if not self.show_thinking:
            thought = ""
        if not (text or thought or tokens):
            return None
        self.content.append(text)
        if thought:
            self.thinking.append(thought)
        line = self._line(text, thought)
        if isinstance(tokens, list) and tokens:
            self.logprobs.extend(tokens)
            line["logprobs"] = tokens
        return line

    def _tool_fragments(self, fragments: object) -> None:
        if not isinstance(fragments, list):
            return
        for k, frag in enumerate(fragments):
            if not isinstance(frag, dict):
                continue
            index = frag.get("index", k)
            call = self.calls.setdefault(index if isinstance(index, int) else k, _ToolCall())
            call.id += _text(frag.get("id"))
            fn = frag.get("function")
            if isinstance(fn, dict):
                call.name = call.name or _text(fn.get("name"))
                call.arguments += _text(fn.get("arguments"))

    def _line(self, text: str, thought: str, done: bool = False) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": self._stamp or self.now()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            line["message"] = message
        else:
            line["response"] = text
            if thought:
                line["thinking"] = thought
        line["done"] = done
        return line

    def tool_calls(self) -> list[dict[str, Any]]:
        """The accumulated calls with object arguments, in index order."""
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            try:
                arguments = json.loads(call.arguments) if call.arguments.strip() else {}
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise UpstreamFailed(
                    f"the model produced invalid arguments for tool {call.name!r}: "
                    f"{call.arguments[:200]!r}"
                )
            out.append({
                "id": call.id or f"call_{secrets.token_hex(4)}",
                "function": {"index": index, "name": call.name, "arguments": arguments},
            })
        return out

    def _done(self, line: dict[str, Any], total_ns: int, load_ns: int) -> dict[str, Any]:
        line["done"] = True
        line["done_reason"] = done_reason(self.finish_reason)
        metrics = {"total_duration": max(1, total_ns), "load_duration": load_ns,
                   **durations(self.timings, self.usage)}
        line.update({k: v for k, v in metrics.items() if v})
        return line

    def _check_finished(self) -> None:
        if not self.finished:
            raise UpstreamFailed("llama-server ended the stream before the answer was finished")

    def tail(self, total_ns: int, load_ns: int) -> list[dict[str, Any]]:
        """The closing lines: the tool calls (if any), then the done line."""
        self._check_finished()
        out = []
        calls = self.tool_calls() if self.kind == "chat" else []
        if calls:
            line = self._line("", "")
            line["message"]["tool_calls"] = calls
            out.append(line)
        out.append(self._done(self._line("", ""), total_ns, load_ns))
        return out

    def whole(self, total_ns: int, load_ns: int) -> dict[str, Any]:
        """The one object answering a request with ``stream: false``."""
        self._check_finished()
        line = self._line("".join(self.content), "".join(self.thinking))
        calls = self.tool_calls() if self.kind == "chat" else []
        if calls:
            line["message"]["tool_calls"] = calls
        if self.logprobs:
            line["logprobs"] = self.logprobs
        return self._done(line, total_ns, load_ns)
