"""One call's MCP tool calls as data, and the loops that wait for a client's approval."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Any

# Loops waiting for approval, at most: the oldest is forgotten first.
MAX_PENDING = 256


@dataclass(slots=True)
class McpCall:
    id: str
    server: str
    name: str
    arguments: str
    output: str | None = None
    error: str | None = None
    seconds: float = 0.0
    # The error is the tool's own (isError), not a failure to get an answer.
    tool_failed: bool = False
    # Waiting for the client's approval (the call was not run).
    pending: bool = False

    def args(self) -> dict[str, Any]:
        try:
            value = json.loads(self.arguments or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(slots=True)
class Pending:
    """A loop stopped for approval: its messages up to the model's tool calls."""

    model: str
    chat: dict[str, Any]
    messages: list[dict[str, Any]]
    calls: list[McpCall]


class Approvals:
    """Loops stopped for approval, by the id of each approval request they sent."""

    def __init__(self, size: int = MAX_PENDING) -> None:
        self._size = size
        self._by_id: collections.OrderedDict[str, Pending] = collections.OrderedDict()

    def put(self, pending: Pending, ids: list[str]) -> None:
        for ident in ids:
            self._by_id[ident] = pending
        while len(self._by_id) > self._size:
            self._by_id.popitem(last=False)

    def take(self, ident: str) -> Pending | None:
        pending = self._by_id.pop(ident, None)
        if pending is not None:
            for other in [k for k, v in self._by_id.items() if v is pending]:
                del self._by_id[other]
        return pending
