"""A stand-in app for testing drivers without slaves.

``FakeApp(handler, queue_limit)`` is a :class:`engine.drivers.base.DriverHost`, the
driver-facing surface of :class:`engine.app.App`: ``name``, ``node`` (None: no node,
so no cluster), ``submit(event, payload) -> job`` (sync; raises ``QueueFull`` past
``queue_limit`` jobs not yet finished), jobs with ``await job.result()``,
``async for chunk in job``, ``cancel()`` and the callback side of
:class:`engine.pool.job.Job` (``add_reply_callback``, ``add_done_callback``, ``error``,
``result_nowait()``), and ``publish(topic, value)``.
``handler(event, payload)`` is an async function (one value) or an async generator
function (a streamed reply); what it raises reaches the driver as a RemoteError.
"""
from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Callable

import trio
from transport.errors import HandlerError, QueueFull, RemoteError

from engine.drivers.base import HostingNode

JobCallback = Callable[["FakeJob"], Any]


async def echo(event: str, payload: Any) -> Any:
    return payload


class FakeJob:
    def __init__(self, app: FakeApp, event: str, payload: Any) -> None:
        self.app, self.event, self.payload = app, event, payload
        self._done = trio.Event()
        self._chunks: list[Any] = []
        self._value: Any = None
        self._error: RemoteError | None = None
        self._new_chunk = trio.Event()
        # Like the pool's Job: whether the reply is a stream of chunks.
        self.streaming = inspect.isasyncgenfunction(app.handler)
        self.cancelled = False
        self._on_reply: list[JobCallback] = []
        self._on_done: list[JobCallback] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> RemoteError | None:
        return self._error

    def result_nowait(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        self.cancelled = True

    def poll(self) -> bool:
        return False  # nothing to act on early: the answer arrives from _run's task

    def add_reply_callback(self, fn: JobCallback) -> None:
        if self._chunks or self.done:
            fn(self)
        else:
            self._on_reply.append(fn)

    def add_done_callback(self, fn: JobCallback) -> None:
        if self.done:
            fn(self)
        else:
            self._on_done.append(fn)

    def _call(self, callbacks: list[JobCallback]) -> None:
        pending = list(callbacks)
        callbacks.clear()
        for fn in pending:
            fn(self)

    async def _run(self) -> None:
        handler = self.app.handler
        try:
            if inspect.isasyncgenfunction(handler):
                async for chunk in handler(self.event, self.payload):
                    self._chunks.append(chunk)
                    self._new_chunk.set()
                    self._new_chunk = trio.Event()
                    self._call(self._on_reply)
                self._value = list(self._chunks)
            else:
                self._value = await handler(self.event, self.payload)
                self._chunks.append(self._value)
        except RemoteError as exc:
            self._error = exc
        except trio.Cancelled:
            raise
        except Exception as exc:
            self._error = HandlerError(str(exc), type=type(exc).__name__)
        finally:
            self.app.in_flight -= 1
            self.app.finished.append(self)
            self._done.set()
            self._new_chunk.set()
            self._call(self._on_reply)
            self._call(self._on_done)

    async def result(self) -> Any:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._follow()

    async def _follow(self) -> AsyncIterator[Any]:
        sent = 0
        while True:
            while sent < len(self._chunks):
                yield self._chunks[sent]
                sent += 1
            if self._done.is_set():
                if self._error is not None:
                    raise self._error
                return
            await self._new_chunk.wait()


class FakeApp:
    def __init__(self, handler: Callable[..., Any] = echo, *, queue_limit: int = 1000,
                 name: str = "fake") -> None:
        self.name = name
        self.node: HostingNode | None = None
        self.handler = handler
        self.queue_limit = queue_limit
        self.in_flight = 0
        self.submitted: list[FakeJob] = []
        self.finished: list[FakeJob] = []
        self.published: list[tuple[str, Any]] = []

    def submit(self, event: str, payload: Any, chunks: Any = None) -> FakeJob:
        if self.in_flight >= self.queue_limit:
            raise QueueFull(f"{self.name}: {self.in_flight} jobs queued")
        self.in_flight += 1
        job = FakeJob(self, event, payload)
        self.submitted.append(job)
        # Like the pool, a job runs whether or not anyone waits for it.
        trio.lowlevel.spawn_system_task(job._run)
        return job

    def publish(self, topic: str, value: Any) -> None:
        self.published.append((topic, value))
