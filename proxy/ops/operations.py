"""Operations: a load (or a runtime model's download and load) that the admin API
starts and answers at once; the caller follows it by id (docs/admin-api.md).

An operation is ``queued`` until a launch of its model runs (``loading``, with the
estimate of scheduler/scheduling/loadcost.py) or its file downloads (``downloading``,
with bytes), then ``ready``, ``failed`` (with the reason) or ``cancelled``. Each runs
as a task the registry holds; every task is cancelled and awaited when the app stops.
The registry keeps the last ``KEEP`` operations.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from scheduler.aio import cancel_and_wait
from scheduler.config import secrets as config_secrets
from scheduler.errors import CorralError, LoadCancelled
from scheduler.scheduling import loadcost
from scheduler.scheduling.scheduler import Scheduler

# Finished operations kept for GET (the running ones are always kept).
KEEP = 200
FINAL = frozenset({"ready", "failed", "cancelled"})


class Operation:
    """One load, followed by id. Written by its own task only (and by cancel)."""

    def __init__(self, op_id: str, model: str, kind: str) -> None:
        self.id = op_id
        self.model = model
        self.kind = kind
        self.state = "queued"
        self.error: str | None = None
        self.instance: str | None = None
        # A download's bytes (``downloading``).
        self.completed = 0
        self.total = 0
        self.created = time.time()
        self.finished: float | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.state in FINAL

    def view(self, scheduler: Scheduler, known: tuple[str, ...] = ()) -> dict[str, Any]:
        state = self.state
        out: dict[str, Any] = {"id": self.id, "model": self.model, "kind": self.kind}
        if state == "queued":
            expected, elapsed = scheduler.load_estimate(self.model)
            if elapsed is not None:
                state = "loading"
                out["estimate"] = {
                    "elapsed_seconds": round(elapsed, 3),
                    "expected_seconds": None if expected is None else round(expected, 3),
                    "remaining_seconds": round(loadcost.remaining(expected, elapsed), 3),
                    "progress": loadcost.progress(expected, elapsed)}
        if state == "downloading":
            out["bytes"] = {"completed": self.completed, "total": self.total}
        out.update(state=state, instance=self.instance, created=round(self.created, 3),
                   finished=None if self.finished is None else round(self.finished, 3),
                   # A launch error may quote the child's log, and that its env.
                   error=config_secrets.scrub_data(self.error, known) if self.error else None)
        return out


Work = Callable[[Operation], Awaitable[None]]


class Operations:
    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}
        self._seq = itertools.count(1)

    def start(self, model: str, kind: str, work: Work) -> Operation:
        op = Operation(f"op-{next(self._seq)}-{secrets.token_hex(3)}", model, kind)
        self._ops[op.id] = op
        op.task = asyncio.create_task(self._run(op, work), name=f"operation {op.id}")
        self._trim()
        return op

    async def _run(self, op: Operation, work: Work) -> None:
        try:
            await work(op)
            op.state = "ready"
        except asyncio.CancelledError:
            op.state = "cancelled"
            # Ends here: a cancelled operation is an outcome, not an error to re-raise
            # (close() awaits it like any other).
        except LoadCancelled:
            op.state = "cancelled"
        except CorralError as e:
            op.state, op.error = "failed", e.message
        finally:
            op.finished = time.time()

    def _trim(self) -> None:
        done = [o for o in self._ops.values() if o.done]
        for old in done[:max(0, len(done) - KEEP)]:
            del self._ops[old.id]

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def all(self) -> list[Operation]:
        return list(self._ops.values())

    def of_model(self, model: str) -> list[Operation]:
        return [o for o in self._ops.values() if o.model == model]

    def forget(self, model: str) -> None:
        """Drop the finished operations of ``model`` (a terminated uid is gone)."""
        for op in self.of_model(model):
            if op.done:
                del self._ops[op.id]

    async def cancel(self, op: Operation) -> None:
        """Stop a running operation (its task; the launch it started is the caller's
        to cancel, scheduler.cancel_launch)."""
        if op.task is not None and not op.task.done():
            await cancel_and_wait(op.task)

    async def close(self) -> None:
        for op in list(self._ops.values()):
            await self.cancel(op)


def load_work(scheduler: Scheduler, name: str) -> Work:
    """An operation's work: lease the model until an instance is ready."""
    async def work(op: Operation) -> None:
        up = await scheduler.load(name)
        op.instance = up.instance_id
    return work
