"""What a call carries to one upstream besides its body: the servable's ``Egress``
(scheduler/engines/egress.py) applied to the headers, the path and the body's model.

The body is parsed and written again only for an upstream that names the model
differently (a remote's ``model``, a runtime's ``upstream_model``); everywhere else
it goes byte for byte (contract 9).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.edge import jsonc
from scheduler.engines.egress import Egress


def headers(base: Mapping[str, str], egress: Egress) -> Mapping[str, str]:
    return {**base, **egress.headers} if egress.headers else base


def renamed_body(body: bytes | bytearray | None, egress: Egress) -> bytes | bytearray | None:
    """The body with its ``model`` set to the upstream's name (a JSON object body
    only: a multipart or empty one goes as it came)."""
    if egress.rename is None or not body:
        return body
    payload = jsonc.loads(body)
    if not isinstance(payload, dict) or "model" not in payload:
        return body
    payload["model"] = egress.rename
    return jsonc.dumps(payload)


def renamed_payload(payload: Any, egress: Egress) -> Any:
    if egress.rename is None or not isinstance(payload, dict) or "model" not in payload:
        return payload
    return {**payload, "model": egress.rename}


def in_slot(body: bytes | bytearray | None, slot: int | None) -> bytes | bytearray | None:
    """A JSON object body with ``id_slot`` first: the llama-server slot the scheduler
    chose for it (scheduler/process/slotcache.py). Spliced in, not parsed: the body
    may be megabytes. A later ``id_slot`` of the client's own wins in llama-server."""
    if slot is None or not body:
        return body
    start = len(body) - len(body.lstrip())
    if body[start:start + 1] != b"{":
        return body
    rest = body[start + 1:]
    sep = b"" if rest.lstrip().startswith(b"}") else b","
    return b'{"id_slot":%d%s' % (slot, sep) + rest


def payload_in_slot(payload: Any, slot: int | None) -> Any:
    if slot is None or not isinstance(payload, dict):
        return payload
    return {"id_slot": slot, **payload}
