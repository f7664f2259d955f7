"""The ``predict`` and ``completeRawText`` channels and the small text RPCs
(tokenize, countTokens, applyPromptTemplate, embedString).

A prediction leases its model (loading it if needed), streams llama-server's
OpenAI chat (or completion) SSE and turns each delta into a ``fragment`` packet and
tool-call deltas into ``toolCallGeneration*`` packets; llama-server's ``timings`` on
the last chunk become the ``success`` stats. A ``cancel`` cancels the reading task,
which closes the upstream response (llama-server frees the slot) and still ends
with ``success`` and ``stopReason: "userStopped"``, as LM Studio does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.dialects import stream_translate, translate
from proxy.dialects.lmstudio_sdk import config, history
from proxy.dialects.lmstudio_sdk.channel import Channel, Ctx
from proxy.dialects.lmstudio_sdk.codec import SdkError
from proxy.dialects.lmstudio_sdk.models import context_length, facts_of, info_of, param, specified
from proxy.dialects.lmstudio_sdk.upstream import call_json, stream_events
from proxy.keys import SCHEDULER


def _pp(progress: float, prompt: int = 0) -> dict[str, Any]:
    done = prompt if progress >= 1 else 0
    return {"type": "promptProcessingProgress", "progress": progress,
            "details": {"cachedTokenCount": 0, "totalPromptTokenCount": prompt,
                        "processedPromptTokenCount": done,
                        "unprocessedPromptTokenCount": prompt - done}}


def fragment(text: str, reasoning: bool = False) -> dict[str, Any]:
    return {"type": "fragment", "fragment": {
        "content": text, "tokensCount": 1, "containsDrafted": False,
        "reasoningType": "reasoning" if reasoning else "none", "isStructural": False}}


@dataclass
class _ToolCall:
    id: str | None = None
    name: str = ""
    arguments: str = ""


@dataclass
class Prediction:
    """What has come back so far; read again after a cancel."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    tokens: int = 0
    finish: str | None = None
    timings: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    calls: dict[int, _ToolCall] = field(default_factory=dict)

    def stats(self, stop_reason: str | None = None) -> dict[str, Any]:
        t, u = self.timings or {}, self.usage or {}
        predicted = int(t.get("predicted_n", u.get("completion_tokens", self.tokens)) or 0)
        prompt = int((t.get("prompt_n", 0) or 0) + (t.get("cache_n", 0) or 0)
                     or u.get("prompt_tokens", 0) or 0)
        total = time.perf_counter() - self.started
        ttft = (self.first_token or time.perf_counter()) - self.started
        out: dict[str, Any] = {
            "stopReason": stop_reason or stream_translate.lmstudio_stop_reason(self.finish),
            "totalTimeSec": total,
            "timeToFirstTokenSec": float(t["prompt_ms"]) / 1000.0 if "prompt_ms" in t else ttft,
            "promptTokensCount": prompt,
            "predictedTokensCount": predicted,
            "totalTokensCount": prompt + predicted,
        }
        if "predicted_per_second" in t:
            out["tokensPerSecond"] = float(t["predicted_per_second"])
        return out


async def _deltas(chan: Channel, pred: Prediction, event: dict[str, Any], chat: bool) -> None:
    choices = event.get("choices")
    if isinstance(event.get("timings"), dict):
        pred.timings = event["timings"]
    if isinstance(event.get("usage"), dict):
        pred.usage = event["usage"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return
    choice = choices[0]
    pred.finish = choice.get("finish_reason") or pred.finish
    delta = choice.get("delta") if chat else {"content": choice.get("text")}
    if not isinstance(delta, dict):
        return
    for key, reasoning in (("reasoning_content", True), ("content", False)):
        text = delta.get(key)
        if isinstance(text, str) and text:
            if pred.first_token is None:
                pred.first_token = time.perf_counter()
                await chan.send(_pp(1.0))
            pred.tokens += 1
            await chan.send(fragment(text, reasoning))
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        index = call.get("index", 0)
        fn = call.get("function") or {}
        tc = pred.calls.get(index)
        if tc is None:
            tc = pred.calls[index] = _ToolCall(call.get("id"))
            await chan.send({"type": "toolCallGenerationStart",
                             **({"toolCallId": tc.id} if tc.id else {})})
        if fn.get("name"):
            tc.name += fn["name"]
            await chan.send({"type": "toolCallGenerationNameReceived", "name": tc.name})
        if fn.get("arguments"):
            tc.arguments += fn["arguments"]
            await chan.send({"type": "toolCallGenerationArgumentFragmentGenerated",
                             "content": fn["arguments"]})


async def _tool_ends(chan: Channel, pred: Prediction) -> None:
    for tc in pred.calls.values():
        try:
            args = json.loads(tc.arguments or "{}")
        except ValueError:
            args = None
        if not isinstance(args, dict):
            await chan.send({"type": "toolCallGenerationFailed",
                             "error": {"title": f"tool call arguments are not an object: "
                                                f"{tc.arguments!r}"},
                             "rawContent": tc.arguments})
            continue
        req: dict[str, Any] = {"type": "function", "name": tc.name, "arguments": args}
        if tc.id:
            req["id"] = tc.id
        await chan.send({"type": "toolCallGenerationEnd", "toolCallRequest": req})


async def _predict(ctx: Ctx, chan: Channel, name: str, body: dict[str, Any], chat: bool,
                   fields: dict[str, Any]) -> None:
    pred = Prediction()
    path = "/v1/chat/completions" if chat else "/v1/completions"

    async def on_batch(batch: list[dict[str, Any]]) -> None:
        for event in batch:
            if "error" in event:
                raise translate.upstream_error(event)
            await _deltas(chan, pred, event, chat)

    async def run() -> None:
        await stream_events(ctx.app, name, path, body, on_batch)

    await chan.send(_pp(0.0))
    # Heartbeats cover the lease (a cold load) and the prompt evaluation.
    async with chan.heartbeat(lambda _: _pp(0.0 if pred.first_token is None else 1.0)):
        _, cancelled = await chan.unless_cancelled(run())
    if not cancelled:
        await _tool_ends(chan, pred)
    cfg = ctx.app[SCHEDULER].resolve(name)
    await chan.send({
        "type": "success",
        "stats": pred.stats("userStopped" if cancelled else None),
        "modelInfo": await info_of(ctx, name),
        "loadModelConfig": {"fields": [{"key": "llm.load.contextLength",
                                        "value": context_length(ctx.app[SCHEDULER], cfg,
                                                               await facts_of(ctx, cfg))}]},
        "predictionConfig": config.kv(fields),
    })


def _body(fields: dict[str, Any]) -> dict[str, Any]:
    return {**config.sampling(fields), "stream": True,
            "stream_options": {"include_usage": True}}


async def predict(ctx: Ctx, chan: Channel, value: object) -> None:
    p = param(value)
    name = specified(ctx, p.get("modelSpecifier"))
    fields, raw = config.collapse(p.get("predictionConfigStack"))
    body = _body(fields)
    if raw:
        body.pop("tools", None)
        body.pop("tool_choice", None)
        body["prompt"] = history.raw_prompt(p.get("history"))
    else:
        body["messages"] = history.messages(p.get("history"))
    body["model"] = name
    await _predict(ctx, chan, name, body, not raw, fields)


async def complete_raw_text(ctx: Ctx, chan: Channel, value: object) -> None:
    p = param(value)
    name = specified(ctx, p.get("modelSpecifier"))
    fields, _ = config.collapse(p.get("predictionConfigStack"))
    prompt = p.get("rawPrompt")
    if not isinstance(prompt, str):
        raise SdkError("completeRawText needs a rawPrompt string")
    body = {**_body(fields), "prompt": prompt, "model": name}
    body.pop("tools", None)
    await _predict(ctx, chan, name, body, False, fields)


# --- RPCs -------------------------------------------------------------------------------


def _input(p: Mapping[str, Any]) -> str:
    text = p.get("inputString")
    if not isinstance(text, str):
        raise SdkError("inputString must be a string")
    return text


async def tokenize(ctx: Ctx, value: object) -> dict[str, Any]:
    p = param(value)
    name = specified(ctx, p.get("specifier"))
    body = await call_json(ctx.app, name, "/tokenize", {"content": _input(p)})
    return {"tokens": [t for t in body.get("tokens", []) if isinstance(t, int)]}


async def count_tokens(ctx: Ctx, value: object) -> dict[str, Any]:
    return {"tokenCount": len((await tokenize(ctx, value))["tokens"])}


async def apply_prompt_template(ctx: Ctx, value: object) -> dict[str, Any]:
    p = param(value)
    name = specified(ctx, p.get("specifier"))
    body = await call_json(ctx.app, name, "/apply-template",
                           {"messages": history.messages(p.get("history"))})
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise SdkError("llama-server returned no prompt from /apply-template")
    return {"formatted": prompt}


async def embed_string(ctx: Ctx, value: object) -> dict[str, Any]:
    p = param(value)
    name = specified(ctx, p.get("modelSpecifier"))
    body = await call_json(ctx.app, name, "/v1/embeddings", {"input": _input(p), "model": name})
    data = body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise SdkError("llama-server returned no embedding")
    return {"embedding": data[0].get("embedding", [])}
