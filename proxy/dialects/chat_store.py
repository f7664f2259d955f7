"""A bounded store of stateful chats (LM Studio's ``previous_response_id``): the
conversation so far per response id, least recently used dropped first."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Any


class ChatStore:
    def __init__(self, limit: int = 512) -> None:
        self._limit = limit
        self._chats: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, Any]] | None:
        chat = self._chats.get(response_id)
        if chat is not None:
            self._chats.move_to_end(response_id)
        return None if chat is None else list(chat)

    def put(self, messages: list[dict[str, Any]], response_id: str | None = None) -> str:
        """Keep ``messages`` under ``response_id`` (a new id when None); the id."""
        response_id = response_id or "resp_" + secrets.token_hex(24)
        self._chats[response_id] = list(messages)
        while len(self._chats) > self._limit:
            self._chats.popitem(last=False)
        return response_id

    def __len__(self) -> int:
        return len(self._chats)
