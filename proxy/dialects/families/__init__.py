"""Translation between API families, for an upstream that lacks the client's family.

One pure module per pair of families, each translating towards chat completions (the
family every OpenAI-compatible server speaks) and back: the request, the whole answer,
and a stream of chat chunks as a state machine that yields the client family's events.
``bridge`` is the only module here that knows aiohttp: it decides per leased upstream
whether to pass the call through (the upstream speaks the family) or translate it.
"""

from __future__ import annotations

from typing import Any

# One event of a translated stream: its SSE ``event:`` name (None: none) and its data.
Event = tuple[str | None, dict[str, Any]]
