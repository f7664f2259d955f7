"""LM Studio KV config stacks → llama-server request fields.

A stack is ``{"layers": [{"layerName", "config": {"fields": [{"key", "value"}]}}]}``;
later layers override earlier ones (lmstudio-js ``collapseKVStack``). "Checkbox"
values are ``{"checked": bool, "value": X}``: unchecked means "leave the default".
Keys Corral cannot honour (load settings, drafts, presets) are skipped, as both
SDKs skip unknown keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.dialects.lmstudio_sdk.codec import SdkError

# The layer Python's ``complete()`` adds: its presence makes a predict a raw completion.
COMPLETE_LAYER = "completeModeFormatting"

Fields = dict[str, Any]


def fields_of(config: object) -> Fields:
    """A KVConfig as {key: value}; malformed entries are skipped."""
    out: Fields = {}
    if isinstance(config, Mapping):
        for f in config.get("fields") or ():
            if isinstance(f, Mapping) and isinstance(f.get("key"), str):
                out[f["key"]] = f.get("value")
    return out


def collapse(stack: object) -> tuple[Fields, bool]:
    """The effective fields of a stack, and whether it asks for a raw completion."""
    out: Fields = {}
    raw = False
    layers = stack.get("layers") if isinstance(stack, Mapping) else None
    for layer in layers or ():
        if not isinstance(layer, Mapping):
            continue
        raw |= layer.get("layerName") == COMPLETE_LAYER
        out.update(fields_of(layer.get("config")))
    return out, raw


def kv(fields: Mapping[str, Any]) -> dict[str, Any]:
    """{key: value} back into a KVConfig."""
    return {"fields": [{"key": k, "value": v} for k, v in fields.items()]}


def _checkbox(value: object) -> tuple[bool, object]:
    """(set?, value) of a checkbox or a plain value."""
    if isinstance(value, Mapping) and "checked" in value:
        return bool(value.get("checked")), value.get("value")
    return value is not None, value


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SdkError(f"config key '{key}' must be a number, not {value!r}")
    return value


def _structured(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SdkError(f"config key '{key}' must be an object")
    kind = value.get("type")
    if kind == "json":
        schema = value.get("jsonSchema")
        if not isinstance(schema, Mapping):
            return {"response_format": {"type": "json_object"}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "response", "strict": True,
                                                    "schema": dict(schema)}}}
    if kind == "gbnf":
        return {"grammar": str(value.get("gbnfGrammar") or "")}
    if kind in (None, "none"):
        return {}
    raise SdkError(f"structured output type {kind!r} is not supported")


def _tools(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping) or value.get("type") != "toolArray":
        return {}
    tools = [t for t in value.get("tools") or () if isinstance(t, Mapping)]
    if not tools:
        return {}
    out: dict[str, Any] = {"tools": [dict(t) for t in tools]}
    if value.get("force"):
        out["tool_choice"] = "required"
    return out


def _scalar(name: str, kind: Callable[[float], float] = float, checkbox: bool = False
            ) -> Callable[[str, object], dict[str, Any]]:
    def convert(key: str, value: object) -> dict[str, Any]:
        on, inner = _checkbox(value) if checkbox else (value is not None, value)
        return {name: kind(_number(key, inner))} if on else {}

    return convert


def _max_tokens(key: str, value: object) -> dict[str, Any]:
    on, inner = _checkbox(value)
    if not on or inner is None:
        return {}
    n = _number(key, inner)
    return {"max_tokens": int(n)} if n >= 0 else {}


def _stop(key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SdkError(f"config key '{key}' must be a list of strings")
    return {"stop": list(value)} if value else {}


_P = "llm.prediction."
# SDK key -> how it becomes llama-server fields (OpenAI chat body names).
_MAPPING: dict[str, Callable[[str, object], dict[str, Any]]] = {
    _P + "maxPredictedTokens": _max_tokens,
    _P + "temperature": _scalar("temperature"),
    _P + "topKSampling": _scalar("top_k", int),
    _P + "topPSampling": _scalar("top_p", checkbox=True),
    _P + "minPSampling": _scalar("min_p", checkbox=True),
    _P + "repeatPenalty": _scalar("repeat_penalty", checkbox=True),
    _P + "llama.presencePenalty": _scalar("presence_penalty", checkbox=True),
    _P + "stopStrings": _stop,
    _P + "structured": _structured,
    _P + "tools": _tools,
}


def sampling(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The llama-server body fields of the collapsed prediction config."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        convert = _MAPPING.get(key)
        if convert is not None:
            out.update(convert(key, value))
    return out
