"""Small asyncio helpers shared by the scheduler and the proxy."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel a background task and wait until it has ended, its CancelledError
    swallowed (the task's end is what the caller waits for)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
