"""``Job``: one accepted job as its caller sees it (the pool answers it exactly once).

``await job.result()`` gives the single value, or the list of chunks of a streamed
reply; ``async for chunk in job`` takes chunks as they arrive.  Taking chunks grants
the slave credit to send more (see the stream window in docs/protocol.md).
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from transport.errors import RemoteError

from . import protocol as S

if TYPE_CHECKING:
    from .pool import SlavePool


class Job:
    __slots__ = ("id", "event", "payload", "streaming", "submitted_at", "finished_at",
                 "_items", "_value", "_value_taken", "_error", "_done", "_changed",
                 "_pool", "_taken", "_collected")

    def __init__(self, id: int, event: str, payload: Any, submitted_at: float,
                 pool: "SlavePool | None" = None):
        self.id = id
        self.event = event
        self.payload = payload
        self.streaming: bool | None = None   # known after the first reply
        self.submitted_at = submitted_at
        self.finished_at: float | None = None
        self._items: deque = deque()
        self._value: Any = None
        self._value_taken = False
        self._error: RemoteError | None = None
        self._done = False
        self._changed = trio.Event()
        self._pool = pool
        self._taken = 0                  # chunks consumed and not yet granted back as credit
        self._collected: list | None = None  # result()'s list of a streamed reply

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<Job {self.id} {self.event!r} {state}>"

    @property
    def done(self) -> bool:
        return self._done

    @property
    def buffered(self) -> int:
        """Chunks received and not yet consumed (bounded by the stream window)."""
        return len(self._items)

    # -- the caller's side -----------------------------------------------------------
    async def result(self) -> Any:
        """The single value, or the list of chunks if the handler streamed (chunks
        already taken by ``async for`` are not in it).  Collecting consumes, so the
        slave keeps streaming while this waits."""
        if self._collected is None:
            self._collected = []
        while True:
            while self._items:
                self._collected.append(self._take())
            if self._done:
                break
            await self._changed.wait()
        if self._error is not None:
            raise self._error
        return list(self._collected) if self.streaming else self._value

    def cancel(self) -> None:
        """Give up on the job.  Queued: it is dropped.  Running: the slave is told to
        stop it (an async handler stops at its next await; a sync handler runs to its
        end, a sync generator to its next item) and the slot is free once the slave
        acknowledges.  Anyone awaiting the job gets :class:`JobCancelled` at once.
        No effect on a job already answered."""
        if not self._done and self._pool is not None:
            self._pool._cancel(self)
            if self._done:
                self._items.clear()  # the caller gave up: chunks still buffered are moot

    def __aiter__(self) -> "Job":
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._items:
                return self._take()  # consumed chunks are not kept
            if self._done:
                if self._error is not None:
                    raise self._error
                if self.streaming is False and not self._value_taken:
                    self._value_taken = True
                    return self._value
                raise StopAsyncIteration
            await self._changed.wait()

    def _take(self) -> Any:
        item = self._items.popleft()
        self._taken += 1
        if self._taken >= S.CREDIT_BATCH and not self._done and self._pool is not None:
            self._pool._grant(self.id, self._taken)
            self._taken = 0
        return item

    # -- the pool's side: each returns False if the job was already answered ----------
    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _chunk(self, value: Any) -> bool:
        if self._done:
            return False
        self.streaming = True
        self._items.append(value)
        self._wake()
        return True

    def _finish(self, value: Any, streamed: bool, now: float) -> bool:
        if self._done:
            return False
        if not streamed:
            self.streaming = False
            self._value = value
        else:
            self.streaming = True
        self._done = True
        self.finished_at = now
        self._wake()
        return True

    def _fail(self, error: RemoteError, now: float) -> bool:
        if self._done:
            return False
        self._error = error
        self._done = True
        self.finished_at = now
        self._wake()
        return True
