"""The LM Studio SDK frame codec, prediction-config mapping, history mapping and
auth check, table-driven."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.dialects.lmstudio_sdk import codec, config, history
from proxy.dialects.lmstudio_sdk.codec import SdkError
from proxy.dialects.lmstudio_sdk.socket import authenticate

# --- codec ------------------------------------------------------------------------------

DECODED = [
    ({"type": "rpcCall", "endpoint": "listLoaded", "callId": 1},
     codec.RpcCall(1, "listLoaded", None)),
    ({"type": "rpcCall", "endpoint": "tokenize", "callId": 0, "parameter": {"a": 1}},
     codec.RpcCall(0, "tokenize", {"a": 1})),
    ({"type": "channelCreate", "endpoint": "predict", "channelId": 2, "creationParameter": []},
     codec.ChannelCreate(2, "predict", [])),
    ({"type": "channelSend", "channelId": 2, "message": {"type": "cancel"}},
     codec.ChannelSend(2, {"type": "cancel"})),
    ({"type": "keepAlive"}, codec.KeepAlive()),
    ({"type": "signalSubscribe", "endpoint": "x", "subscribeId": 4, "creationParameter": 1},
     codec.Subscribe(4, "x", False)),
    ({"type": "writableSignalSubscribe", "endpoint": "x", "subscribeId": 5},
     codec.Subscribe(5, "x", True)),
    ({"type": "communicationWarning", "warning": "w"}, codec.Ignored("communicationWarning", "w")),
    ({"type": "channelAck", "channelId": 1, "ackId": 1}, codec.Ignored("channelAck")),
]


@pytest.mark.parametrize(("frame", "want"), DECODED)
def test_decode(frame: dict[str, Any], want: codec.Frame) -> None:
    assert codec.decode(json.dumps(frame)) == want


BAD = [
    # text, answer type, id of the answer
    ("{nope", "communicationWarning", None),
    ("[1]", "communicationWarning", None),
    ('{"type":"rpcCall","endpoint":"x"}', "communicationWarning", None),
    ('{"type":"rpcCall","callId":true,"endpoint":"x"}', "communicationWarning", None),
    ('{"type":"rpcCall","callId":3}', "rpcError", 3),
    ('{"type":"channelCreate","channelId":4}', "channelError", 4),
    ('{"type":"whatever","callId":7}', "rpcError", 7),
    ('{"type":"whatever"}', "communicationWarning", None),
]


@pytest.mark.parametrize(("text", "kind", "ident"), BAD)
def test_bad_frames_get_an_answer_never_a_traceback(text: str, kind: str,
                                                   ident: int | None) -> None:
    with pytest.raises(codec.FrameError) as err:
        codec.decode(text)
    answer = codec.answer_to_bad_frame(err.value)
    assert answer["type"] == kind
    assert answer.get("callId", answer.get("channelId")) == ident
    json.dumps(answer)


def test_encoders() -> None:
    assert codec.rpc_result(1, codec.VOID) == {"type": "rpcResult", "callId": 1}
    assert codec.rpc_result(1, None) == {"type": "rpcResult", "callId": 1, "result": None}
    assert codec.channel_close(3) == {"type": "channelClose", "channelId": 3}
    err = SdkError("gone", "generic.noModelMatchingQuery", query={}, totalLoadedModels=0)
    assert codec.channel_error(3, err.serialized()) == {
        "type": "channelError", "channelId": 3,
        "error": {"title": "gone", "rootTitle": "gone",
                  "displayData": {"code": "generic.noModelMatchingQuery", "query": {},
                                  "totalLoadedModels": 0}}}
    assert codec.dumps({"a": "é"}) == '{"a":"é"}'


# --- prediction config ----------------------------------------------------------------------

P = "llm.prediction."


def stack(*layers: dict[str, Any], names: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"layers": [
        {"layerName": names[i] if i < len(names) else "apiOverride",
         "config": {"fields": [{"key": k, "value": v} for k, v in layer.items()]}}
        for i, layer in enumerate(layers)]}


SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
MAPPED = [
    ({P + "maxPredictedTokens": {"checked": True, "value": 6}}, {"max_tokens": 6}),
    ({P + "maxPredictedTokens": {"checked": False, "value": 6}}, {}),
    ({P + "temperature": 0.2}, {"temperature": 0.2}),
    ({P + "topKSampling": 40}, {"top_k": 40}),
    ({P + "topPSampling": {"checked": True, "value": 0.9}}, {"top_p": 0.9}),
    ({P + "topPSampling": {"checked": False, "value": 0.9}}, {}),
    ({P + "minPSampling": {"checked": True, "value": 0.05}}, {"min_p": 0.05}),
    ({P + "repeatPenalty": {"checked": True, "value": 1.1}}, {"repeat_penalty": 1.1}),
    ({P + "llama.presencePenalty": {"checked": True, "value": 0.5}}, {"presence_penalty": 0.5}),
    ({P + "stopStrings": ["a", "b"]}, {"stop": ["a", "b"]}),
    ({P + "stopStrings": []}, {}),
    ({P + "structured": {"type": "json", "jsonSchema": SCHEMA}},
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "response", "strict": True, "schema": SCHEMA}}}),
    ({P + "structured": {"type": "gbnf", "gbnfGrammar": "root ::= \"a\""}},
     {"grammar": "root ::= \"a\""}),
    ({P + "structured": {"type": "none"}}, {}),
    ({P + "tools": {"type": "toolArray", "tools": [TOOL]}}, {"tools": [TOOL]}),
    ({P + "tools": {"type": "toolArray", "tools": [TOOL], "force": True}},
     {"tools": [TOOL], "tool_choice": "required"}),
    ({P + "tools": {"type": "none"}}, {}),
    ({"llm.load.contextLength": 4096, P + "promptTemplate": {}, "unknown.key": 1}, {}),
]


@pytest.mark.parametrize(("fields", "body"), MAPPED)
def test_prediction_config_to_llama_server_body(fields: dict[str, Any],
                                                body: dict[str, Any]) -> None:
    collapsed, raw = config.collapse(stack(fields))
    assert (config.sampling(collapsed), raw) == (body, False)


@pytest.mark.parametrize("fields", [
    {P + "temperature": "hot"}, {P + "stopStrings": "x"}, {P + "structured": {"type": "xml"}},
    {P + "topKSampling": True},
])
def test_bad_config_values_are_sdk_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(SdkError):
        config.sampling(config.collapse(stack(fields))[0])


def test_later_layers_override_and_complete_mode() -> None:
    s = stack({P + "temperature": 0.1, P + "topKSampling": 3}, {P + "temperature": 0.9},
              names=("apiOverride", config.COMPLETE_LAYER))
    fields, raw = config.collapse(s)
    assert raw and config.sampling(fields) == {"temperature": 0.9, "top_k": 3}
    assert config.collapse({"layers": "nope"}) == ({}, False)
    assert config.kv({"a": 1}) == {"fields": [{"key": "a", "value": 1}]}


# --- history --------------------------------------------------------------------------------


def text(t: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": t}]


HISTORIES = [
    ([{"role": "system", "content": text("terse")}, {"role": "user", "content": text("hi")}],
     [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]),
    ([{"role": "assistant", "content": [
        {"type": "text", "text": ""},
        {"type": "toolCallRequest", "toolCallRequest": {
            "type": "function", "id": "c1", "name": "add", "arguments": {"a": 2}}}]},
      {"role": "tool", "content": [{"type": "toolCallResult", "content": "5",
                                    "toolCallId": "c1"}]}],
     [{"role": "assistant", "content": "", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
      {"role": "tool", "content": "5", "tool_call_id": "c1"}]),
]


@pytest.mark.parametrize(("msgs", "want"), HISTORIES)
def test_history_to_messages(msgs: list[Any], want: list[Any]) -> None:
    assert history.messages({"messages": msgs}) == want


def test_history_errors_and_raw_prompt() -> None:
    with pytest.raises(SdkError):
        history.messages({"messages": [{"role": "user", "content": [
            {"type": "file", "name": "a.png", "identifier": "x"}]}]})
    with pytest.raises(SdkError):
        history.messages([])
    assert history.raw_prompt({"messages": [{"role": "user", "content": text("once ")},
                                            {"role": "user", "content": text("upon")}]}) \
        == "once upon"


# --- auth -----------------------------------------------------------------------------------

KEY = "sk-lm-Abcd1234:abcdefghij0123456789"
AUTH = [
    ({"authVersion": 1, "clientIdentifier": "x", "clientPasskey": "y"}, (), True),
    ({"authVersion": 2, "clientIdentifier": "x", "clientPasskey": "y"}, (), False),
    ({"authVersion": 1, "clientIdentifier": 1, "clientPasskey": "y"}, (), False),
    ("nope", (), False),
    ({"authVersion": 1, "clientIdentifier": "Abcd1234",
      "clientPasskey": "abcdefghij0123456789"}, (KEY,), True),
    ({"authVersion": 1, "clientIdentifier": "guest:Abcd1234",
      "clientPasskey": "abcdefghij0123456789"}, (KEY, "other"), True),
    ({"authVersion": 1, "clientIdentifier": "Abcd1234", "clientPasskey": "wrong"}, (KEY,), False),
    ({"authVersion": 1, "clientIdentifier": "x", "clientPasskey": "y"}, ("plain",), False),
]


@pytest.mark.parametrize(("packet", "keys", "ok"), AUTH)
def test_authenticate(packet: object, keys: tuple[str, ...], ok: bool) -> None:
    assert (authenticate(packet, keys) is None) == ok
