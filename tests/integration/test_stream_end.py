"""A client that hangs up on reading a Responses stream's last event got the whole
answer: Codex closes its connection on `response.completed`, while llama-server, which
sends no `[DONE]` after it, has not yet ended the stream. Counted 200, not 499."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.calls.streaming import _ends
from tests.conftest import make_config
from tests.integration.test_metrics import scrape, value

RESPONSES = "/v1/responses"


def test_the_last_event_of_each_family_ends_a_read() -> None:
    completed = b'event: response.completed\ndata: {"type":"response.completed","x":{}}\n\n'
    assert _ends(b"data: [DONE]\n\n")
    assert _ends(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    assert _ends(completed)
    assert _ends(b'event: response.output_text.delta\ndata: {"delta":"a"}\n\n' + completed)
    assert _ends(completed.replace(b"completed", b"incomplete"))
    assert _ends(completed.replace(b"completed", b"failed"))
    assert not _ends(b'event: response.output_text.delta\ndata: {"delta":"a"}\n\n')
    assert not _ends(completed[:-1])  # the event is not over yet
    # A delta whose text names the event is not the event.
    assert not _ends(b'data: {"delta":"event: response.completed\\n"}\n\n')


async def hang_up_after(client: TestClient, body: bytes, marker: bytes) -> None:
    """Send a call, read until ``marker`` and the end of its event, then close."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (RESPONSES.encode(), len(body), body))
    seen = b""
    async with asyncio.timeout(10):
        while (at := seen.find(marker)) < 0 or b"\n\n" not in seen[at:]:
            data = await reader.read(65536)
            assert data, seen
            seen += data
    writer.close()


async def test_a_client_that_hangs_up_on_response_completed_is_not_counted_as_gone(
    corral_ports: Any, tmp_path: Path
) -> None:
    # The fake waits FAKE_TOKEN_DELAY after each event, the last one too.
    ports = await corral_ports(make_config(
        tmp_path, [{"name": "m", "env": {"FAKE_TOKEN_DELAY": "0.3"}}]))
    body = json.dumps({"model": "m", "input": "Say hello.", "stream": True, "store": False,
                       "max_output_tokens": 2}).encode()
    await hang_up_after(ports.openai, body, b"event: response.completed")
    # Mid-stream: the client went away, 499.
    await hang_up_after(ports.openai, body, b"event: response.output_text.delta")

    async def counted() -> tuple[float, float]:
        s = await scrape(ports.openai)
        return (value(s, "corral_requests_total", endpoint=RESPONSES, status="200"),
                value(s, "corral_requests_total", endpoint=RESPONSES, status="499"))

    # A call is recorded once its handler has ended: up to the fake's delay after.
    for _ in range(100):
        if sum(got := await counted()) >= 2:
            break
        await asyncio.sleep(0.05)
    assert got == (1, 1)
