"""Issue 25's smaller defects, one unit each: what a caller is told about upstream
failures, and the SDK auth packet's parser."""

from __future__ import annotations

import json

import pytest

from proxy.dialects.lmstudio_sdk import codec
from proxy.edge.errors import openai_body, public_message, render
from scheduler.errors import BadRequest, RemotesDown, UpstreamFailed


@pytest.mark.parametrize("message", [
    "model 'm': upstream m@http://10.0.0.5:8080/v1 failed: Cannot connect to host "
    "10.0.0.5:8080 ssl:default [Connect call failed ('10.0.0.5', 8080)]",
    "model 'm': upstream m@https://gpu-box.lan:11434 failed: Server disconnected",
    "upstream instance m@http://[::1]:9000/v1 failed mid-stream: reset",
])
def test_upstream_failures_name_no_address(message: str) -> None:
    shown = public_message(UpstreamFailed(message))
    for address in ("10.0.0.5", "8080", "gpu-box.lan", "11434", "::1", "9000"):
        assert address not in shown, shown
    assert shown.startswith(("model 'm'", "upstream instance m@"))
    assert address not in json.dumps(openai_body(UpstreamFailed(message)))
    down = RemotesDown(message, retry_after=3)
    assert b"10.0.0.5:8080" not in render(down, "ollama").body  # type: ignore[operator]


def test_a_bad_request_is_shown_as_it_is() -> None:
    # Only upstream failures are scrubbed: a caller's own input comes back whole.
    err = BadRequest("'model' must be a string, not http://x:1")
    assert public_message(err) == err.message


@pytest.mark.parametrize("text", [
    "[" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "not json", "", "\udcff",
])
def test_the_sdk_parser_refuses_what_it_cannot_read(text: str) -> None:
    assert codec.parse(text) is None


def test_the_sdk_parser_reads_an_auth_packet() -> None:
    packet = {"authVersion": 1, "clientIdentifier": "guest:x", "clientPasskey": "y"}
    assert codec.parse(json.dumps(packet)) == packet
