"""``Job``: one accepted job as its caller sees it (the pool answers it exactly once).

``await job.result()`` gives the single value, or the list of chunks of a streamed
reply; ``async for chunk in job`` takes chunks as they arrive.  Taking chunks grants
the slave credit to send more (see the stream window in docs/protocol.md).
``job.add_done_callback(fn)`` runs ``fn(job)`` once the job is answered, and
``job.add_reply_callback(fn)`` once its first reply is there (a chunk, or the answer), for
code that wants the outcome without a task waiting on it (the native-server driver
answers its clients that way).

A job is owned by the pool that accepted it (either backend): what it asks of that
pool is :class:`JobOwner`, defined here beside the one class that calls it, so this
module imports no pool.

Hot path: a job is created and answered tens of thousands of times a second, so
waiters park directly on the job (one reschedule to wake them) instead of on a
``trio.Event`` that would be allocated per job and again per wake-up.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, AsyncIterable, Callable, Protocol

import trio

from transport.errors import RemoteError

from engine.protocol.messages import CREDIT_BATCH

log = logging.getLogger(__name__)

_park = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
_current_task = trio.lowlevel.current_task
_ABORTED = trio.lowlevel.Abort.SUCCEEDED


class JobOwner(Protocol):
    """What a :class:`Job` asks of the pool that accepted it (both backends are one;
    :class:`engine.pool.base.Pool` extends this).  Each is called only while the job
    is not answered yet."""

    def cancel_job(self, job: Job) -> None:
        """The caller gave up (:meth:`Job.cancel`): answer the job with JobCancelled
        and stop its work (or drop it from the queue)."""

    def grant_credit(self, job_id: int, chunks: int) -> None:
        """The consumer of a streamed reply took ``chunks`` more: the handler may run
        that much further ahead (the stream window, docs/protocol.md)."""

    def poll_job(self, job: Job) -> bool:
        """Act now on whatever part of the job's answer has arrived already, without
        waiting; True if anything did (transport/_spin.py polls a lone call)."""


JobCallback = Callable[["Job"], object]


class Job:
    __slots__ = ("id", "event", "payload", "input", "streaming", "submitted_at", "finished_at",
                 "_items", "_value", "_value_taken", "_error", "_done", "_waiters",
                 "_callbacks", "_on_reply", "_pool", "_taken", "_collected")

    def __init__(self, id: int, event: str, payload: Any, submitted_at: float,
                 pool: JobOwner | None = None, input: AsyncIterable[Any] | None = None) -> None:
        self.id = id
        self.event = event
        self.payload = payload
        self.input = input                   # a chunked request's chunks (async iterable)
        self.streaming: bool | None = None   # known after the first reply
        self.submitted_at = submitted_at
        self.finished_at: float | None = None
        self._items: deque[Any] | None = None  # chunks not yet consumed (made on the first one)
        self._value: Any = None
        self._value_taken = False
        self._error: RemoteError | None = None
        self._done = False
        self._waiters: list[trio.lowlevel.Task] | None = None  # tasks parked in _wait()
        self._callbacks: list[JobCallback] | None = None  # add_done_callback()
        self._on_reply: list[JobCallback] | None = None   # add_reply_callback(), until replied
        self._pool = pool
        self._taken = 0                      # chunks consumed and not yet granted back as credit
        self._collected: list[Any] | None = None  # result()'s list of a streamed reply

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<Job {self.id} {self.event!r} {state}>"

    @property
    def done(self) -> bool:
        return self._done

    @property
    def error(self) -> RemoteError | None:
        """Why the job failed, once it has (None while pending or if it succeeded)."""
        return self._error

    def result_nowait(self) -> Any:
        """The single value of a job answered without streaming; raises its error.
        For a streamed reply use ``async for`` (its chunks are not kept here)."""
        if not self._done:
            raise RuntimeError(f"{self!r} is not answered yet")
        if self._error is not None:
            raise self._error
        if self.streaming:
            raise RuntimeError(f"{self!r} streamed its reply: iterate it instead")
        return self._value

    @property
    def buffered(self) -> int:
        """Chunks received and not yet consumed (bounded by the stream window)."""
        return len(self._items) if self._items else 0

    # -- the caller's side -----------------------------------------------------------
    async def result(self) -> Any:
        """The single value, or the list of chunks if the handler streamed (chunks
        already taken by ``async for`` are not in it).  Collecting consumes, so the
        slave keeps streaming while this waits."""
        while True:
            if self._items:
                # Kept on the job: a result() cancelled half-way loses none of them.
                if self._collected is None:
                    self._collected = []
                while self._items:
                    self._collected.append(self._take())
            if self._done:
                break
            await self._wait()
        if self._error is not None:
            raise self._error
        if self.streaming:
            return list(self._collected) if self._collected else []
        return self._value

    def cancel(self) -> None:
        """Give up on the job.  Queued: it is dropped.  Running (or prefetched by a
        slave): the slave is told to stop it (an async handler stops at its next
        await; a sync handler runs to its end, a sync generator to its next item) and
        the slot is free once the slave acknowledges.  Anyone awaiting the job gets
        :class:`JobCancelled` at once.  No effect on a job already answered."""
        if not self._done and self._pool is not None:
            self._pool.cancel_job(self)
            if self._done and self._items:
                self._items.clear()  # the caller gave up: chunks still buffered are moot

    def poll(self) -> bool:
        """Act on the answer if its slave has sent it already (see JobOwner.poll_job)."""
        return not self._done and self._pool is not None and self._pool.poll_job(self)

    def add_done_callback(self, fn: JobCallback) -> None:
        """Call ``fn(job)`` once the job is answered (at once if it already is).  It
        runs synchronously inside the pool's bookkeeping: it must be quick and must not
        block; an exception it raises is logged, not propagated."""
        if self._done:
            _call_back(fn, self)
        elif self._callbacks is None:
            self._callbacks = [fn]
        else:
            self._callbacks.append(fn)

    def add_reply_callback(self, fn: JobCallback) -> None:
        """Call ``fn(job)`` once, when the first reply arrives: the first chunk of a
        streamed reply (``job.streaming`` is then True) or the answer, whichever comes
        first (at once if one has).  Same rules as :meth:`add_done_callback`."""
        if self._done or self.streaming:
            _call_back(fn, self)
        elif self._on_reply is None:
            self._on_reply = [fn]
        else:
            self._on_reply.append(fn)

    def __aiter__(self) -> Job:
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
            await self._wait()

    def _take(self) -> Any:
        """The next buffered chunk (the caller checked there is one)."""
        assert self._items is not None
        item = self._items.popleft()
        self._taken += 1
        if self._taken >= CREDIT_BATCH and not self._done and self._pool is not None:
            self._pool.grant_credit(self.id, self._taken)
            self._taken = 0
        return item

    async def _wait(self) -> None:
        """Park until the next chunk or the answer (or cancellation)."""
        task = _current_task()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(task)

        def abort(_raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            # Not woken yet, so still in this list (_wake empties the list it wakes).
            waiters.remove(task)
            return _ABORTED

        await _park(abort)

    # -- the pool's side: each returns False if the job was already answered ----------
    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for task in waiters:
                _reschedule(task)

    def _chunk(self, value: Any) -> bool:
        if self._done:
            return False
        self.streaming = True
        if self._items is None:
            self._items = deque()
        self._items.append(value)
        self._wake()
        if self._on_reply:
            self._replied()
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
        self._answered()
        return True

    def _fail(self, error: RemoteError, now: float) -> bool:
        if self._done:
            return False
        self._error = error
        self._done = True
        self.finished_at = now
        self._answered()
        return True

    def _replied(self) -> None:
        callbacks, self._on_reply = self._on_reply, None
        for fn in callbacks or ():
            _call_back(fn, self)

    def _answered(self) -> None:
        self._wake()
        if self._on_reply:
            self._replied()
        callbacks = self._callbacks
        if callbacks:
            self._callbacks = None
            for fn in callbacks:
                _call_back(fn, self)


def _call_back(fn: JobCallback, job: Job) -> None:
    try:
        fn(job)
    except Exception:  # a callback's bug must not break the pool's bookkeeping
        log.exception("done callback %r of %r failed", fn, job)
