"""What translation learns and keeps: families that an undeclared upstream turned out
to lack, learned from its answers, and the conversations of translated Responses.

An upstream whose model sets no ``api`` is assumed to speak what llama-server speaks.
When one answers a family's route with "no such route" (an old vLLM's 404 on
/v1/messages), the family is remembered for that upstream and the call is sent again,
translated to chat; later calls go translated at once. So the probe costs one refused
call per upstream and family, and only where the config did not say.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from proxy.dialects.chat_store import ChatStore

# "No such route" statuses. A 404 that names a model is a missing model, not a route.
MISSING_ROUTE = frozenset({404, 405, 501})


def route_missing(status: int, body: bytes) -> bool:
    return status in MISSING_ROUTE and b"model" not in body.lower()


class Learned:
    """Upstream -> the families it lacks. Bounded, least recently learned dropped
    first: a relaunched instance has a new id, so old entries only age out."""

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._missing: OrderedDict[str, frozenset[str]] = OrderedDict()

    def lacks(self, upstream: str, api: str) -> bool:
        missing = self._missing.get(upstream)
        return missing is not None and api in missing

    def learn(self, upstream: str, api: str) -> None:
        self._missing[upstream] = self._missing.get(upstream, frozenset()) | {api}
        self._missing.move_to_end(upstream)
        while len(self._missing) > self._limit:
            self._missing.popitem(last=False)


@dataclass(slots=True)
class FamilyState:
    """What translation keeps between calls, shared by every port: the families
    learned missing, and the conversations of translated Responses (for
    ``previous_response_id``; the last 256, least recently used dropped first)."""

    learned: Learned = field(default_factory=Learned)
    responses: ChatStore = field(default_factory=lambda: ChatStore(256))
