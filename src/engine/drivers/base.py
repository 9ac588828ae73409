"""The seam between an app and its drivers: the :class:`Driver` base class, what a
driver may ask of its app (:class:`DriverHost`), and what every driver shares
(counters, submitting with or without waiting for room).

Every built-in driver subclasses :class:`Driver` and registers itself with
``@registry.register("type-name", *aliases)``.  The app builds one per manifest entry
as ``cls(spec)``, starts it with ``await nursery.start(driver.run, app)`` and shows
``driver.info()`` in ``info``/``top``; the manifest validates its options at load with
``cls.parse_options(raw, ctx)``.  The base holds what used to be copied into each
driver's ``__init__`` (spec, options, counters) and the common part of ``info()``, so
a driver only writes what is its own.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Iterator, Protocol, TypeVar

import trio
from transport.errors import QueueFull, RemoteError

from engine.errors import AppBroken, DriverError, ShuttingDown
from engine.drivers.options import DriverSpec, OptionContext
from engine.pool.base import JobHandle

OptionsT = TypeVar("OptionsT")


# -- what a driver may ask of its app -------------------------------------------------

class SubmittedJob(JobHandle, Protocol):
    """A job a driver submitted (:class:`engine.pool.job.Job`; ``FakeJob`` in tests):
    what the control endpoint answers from (the native server), and the result."""

    async def result(self) -> Any: ...

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None: ...


class ClusterRouter(Protocol):
    """The part of a node's cluster that server drivers balance requests through
    (:class:`engine.cluster.service.Cluster`)."""

    @property
    def has_peers(self) -> bool: ...

    async def serve(self, app: str, event: str, payload: Any) -> Any: ...


class HostingNode(Protocol):
    """The node an app runs on, as far as drivers see it: its cluster, if any."""

    @property
    def cluster(self) -> ClusterRouter | None: ...


class DriverHost(Protocol):
    """What a driver may use of its app (:class:`engine.app.App`; ``FakeApp`` in tests).

    ``submit`` is synchronous and raises one of :data:`NO_ROOM` when the pool has no
    room; ``publish`` goes to the app's maintenance channel; ``node`` is None for an
    app not hosted by a node (tests) or until the node sets it.
    """

    @property
    def name(self) -> str: ...

    @property
    def node(self) -> HostingNode | None: ...

    def submit(self, event: str, payload: Any, chunks: Any = None) -> SubmittedJob: ...

    def publish(self, topic: str, value: Any) -> None: ...


# -- counters --------------------------------------------------------------------------

@dataclass
class DriverStats:
    """Counters every driver reports through ``info()``."""

    ticks: int = 0          # events seen (timer firings, requests, file changes)
    submitted: int = 0      # jobs handed to the pool
    skipped: int = 0        # events dropped or refused because the pool had no room
    done: int = 0           # jobs answered successfully
    errors: int = 0         # jobs that failed (handler errors, slave deaths...)
    last_error: str | None = None
    held: int = 0           # times the driver had to wait for room in the pool
    started_at: float = field(default_factory=time.time)

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ticks": self.ticks, "submitted": self.submitted, "skipped": self.skipped,
            "done": self.done, "errors": self.errors, "last_error": self.last_error, "held": self.held,
            "in_flight": self.submitted - self.done - self.errors,
        }


# Submission failures that mean "the pool has no room right now", as opposed to
# a job that ran and failed.  Timers count these as skipped ticks.
NO_ROOM = (QueueFull, ShuttingDown, AppBroken)


# -- the base class --------------------------------------------------------------------

class Driver(ABC, Generic[OptionsT]):
    """One event source of one app, built from its manifest entry.

    Subclasses implement :meth:`parse_options` (a static method: the manifest calls it
    at load, before any driver exists), :meth:`run`, and :meth:`details` for their own
    ``info()`` fields.  ``type_name`` is set by :func:`engine.drivers.registry.register`.
    """

    type_name: ClassVar[str]

    def __init__(self, spec: DriverSpec) -> None:
        self.spec = spec
        self.options: OptionsT = spec.options
        self.stats = DriverStats()

    @staticmethod
    @abstractmethod
    def parse_options(raw: Any, ctx: OptionContext) -> Any:
        """Validate the manifest's options (raise ``ctx.error(field, expected, got)``)
        and return them frozen; they come back as ``spec.options``."""

    @abstractmethod
    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled.  Call ``task_status.started()`` once armed or bound
        (the value, if any, is what callers of ``nursery.start`` get: the bound
        address for servers); raise :class:`DriverError` if the driver cannot start."""

    async def drain(self, timeout: float) -> None:
        """The app is stopping: take no new events and let what is in flight finish,
        for up to ``timeout`` seconds (then it is cancelled, as ever).  Most drivers
        have nothing to do (the default): their jobs drain with the pool.  One whose
        clients would otherwise be cut off mid-request says goodbye here (the
        ``mesh-responder``: a ``bye``, so Requesters move on, then its requests end)."""

    def details(self) -> dict[str, Any]:
        """This driver's own ``info()`` fields (endpoint, schedule, ...)."""
        return {}

    def info(self) -> dict[str, Any]:
        """``type`` and ``emit``, the driver's own fields, then the counters."""
        return {"type": self.type_name, "emit": self.spec.emit, **self.details(), **self.stats.as_dict()}

    def submit_or_skip(self, app: DriverHost, payload: Any) -> SubmittedJob | None:
        """Hand one event to the pool; None (and a counted skip) if it has no room.
        For sources that must not wait (timers): a refused event is dropped, counted."""
        try:
            job = app.submit(self.spec.emit, payload)
        except NO_ROOM:
            self.stats.skipped += 1
            return None
        self.stats.submitted += 1
        return job


# -- helpers every driver may use -------------------------------------------------------

def sole_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (or exc itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextmanager
def bare_driver_errors() -> Iterator[None]:
    """Re-raise a DriverError that a nursery wrapped in a group as itself, so the
    app reports "port taken", not an exception group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = sole_leaf(group)
        if isinstance(leaf, DriverError):
            raise leaf from None
        raise


# Backoff while the pool has no room (sinks, monitors): short at first so a brief
# burst costs little latency, capped so a long stall costs little CPU.
HOLD_BACKOFF = (0.002, 0.1)


async def submit_holding(app: DriverHost, event: str, payload: Any, stats: DriverStats) -> SubmittedJob:
    """Submit, waiting (with backoff) while the pool refuses for lack of room.

    For drivers whose source keeps its own backlog (a socket's buffers, the kernel's
    inotify queue): holding here stops them reading, so the backpressure reaches the
    producer instead of the event being dropped.  Only this driver's task waits.
    """
    delay = HOLD_BACKOFF[0]
    while True:
        try:
            job = app.submit(event, payload)
        except NO_ROOM:
            stats.held += 1 if delay == HOLD_BACKOFF[0] else 0
            await trio.sleep(delay)
            delay = min(delay * 2, HOLD_BACKOFF[1])
            continue
        stats.submitted += 1
        return job


async def run_job(job: SubmittedJob, stats: DriverStats) -> Any:
    """Await a submitted job's result, counting it; RemoteErrors are counted and re-raised."""
    try:
        value = await job.result()
    except RemoteError as exc:
        stats.failed(exc)
        raise
    stats.done += 1
    return value


async def run_job_quietly(job: SubmittedJob, stats: DriverStats) -> None:
    """For fire-and-forget events: the failure is counted (and shown in info/top), not raised."""
    try:
        await run_job(job, stats)
    except RemoteError:
        pass
