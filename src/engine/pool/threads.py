"""``backend: "thread"``: an app's handlers run inside the node process, with no slave
processes (Cocaine's thread slaves).

The same contract as :class:`engine.pool.SlavePool` (``run``, ``submit -> Job``,
``drain``, ``info``, ``crashlog``), so the app, its drivers and the node cannot tell
them apart.  ``pool-limit x concurrency`` jobs run at once: an ``async def`` handler or
async generator as a task of the node's own trio loop; a plain function (and each step
of a sync generator) on a worker thread until its event's calls have proved quick
(under ``INLINE_BELOW`` on average), then inline on the loop, since a thread hop costs
more than such a call.  Up to ``queue-limit`` more wait; past that, ``QueueFull``.  A
request costs no process hop; the price is isolation:

- the app shares the node's process: no resource limits, no per-app output capture (a
  failing handler's traceback goes to the crashlog instead), and a crash of the
  interpreter takes the node with it;
- a thread cannot be killed: a job not answered within ``request-timeout`` (from its
  submission) fails with ``RequestTimeout`` and frees its slot, but a sync call (or
  generator step) on a thread runs on until it returns; without a request-timeout a
  job may run for ever (``heartbeat-timeout`` means nothing here: there is no process
  whose life to watch);
- an ``async def`` handler that computes without awaiting, or a quick plain handler
  that suddenly is not, holds up the whole node while it runs.

So it is for small, trusted, I/O-bound or latency-bound apps; the process backend
stays the default.

Faults (docs/architecture.md): each job runs in a task of its own, which is its
boundary: whatever fails there (the handler, or this pool's handling of it) answers
that job with a typed error and is counted in ``info()["faults"]`` when it is not the
handler's own error; the pool lives on.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterable, Callable

import trio

from transport.errors import BadMessage, RemoteError, UnknownEvent, body_to_error, error_to_body

from engine import api
from engine.errors import AppBroken, JobCancelled, QueueFull, RequestTimeout, ShuttingDown
from engine.faults import FaultLog
from engine.pool.base import Pool, PoolLoad
from engine.pool.job import Job
from engine.manifest import EngineConfig
from engine.pool.process import LATENCY_WINDOW, latency_ms
from engine.pool.prefetch import ServiceTimes
from engine.protocol.messages import STREAM_WINDOW
from engine.worker.runtime import ASYNC, ASYNC_GEN, chunks_refused, handler_kind

if TYPE_CHECKING:
    from engine.pool.zygote_client import Zygote

log = logging.getLogger(__name__)

_import_lock = threading.Lock()  # api.HANDLERS is one registry: one app imports at a time
_DONE = object()
# A plain handler whose calls have averaged less than this runs inline on the node's loop.
INLINE_BELOW = 0.0005


class _Inline(threading.local):
    active = False  # a handler is running inline on the node's loop now (per thread)


inline = _Inline()  # engine.client.calls reads inline.active (False on any other thread)


def load_isolated(entry: Path, app_name: str) -> dict[str, Callable[..., Any]]:
    """Import an app module into this process and return its handlers, without mixing
    them with another app's (``@on`` fills the one module-level registry)."""
    entry = Path(entry).resolve()
    with _import_lock:
        saved = dict(api.HANDLERS)
        api.HANDLERS.clear()
        try:
            if str(entry.parent) not in sys.path:
                sys.path.insert(0, str(entry.parent))  # the app may import its siblings
            name = f"engine_thread_app_{app_name}"
            spec = importlib.util.spec_from_file_location(name, entry)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {entry}: not a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return dict(api.HANDLERS)
        finally:
            api.HANDLERS.clear()
            api.HANDLERS.update(saved)


def _as_remote(exc: BaseException) -> RemoteError:
    """The error a slave would have sent for this exception."""
    return exc if isinstance(exc, RemoteError) else body_to_error(error_to_body(exc))


class ThreadPool:
    """The thread backend of :class:`engine.pool.base.Pool` (and so a
    :class:`~engine.pool.job.JobOwner`)."""

    def __init__(self, app_name: str, entry: Path, config: EngineConfig) -> None:
        self.app_name = app_name
        self.entry = Path(entry)
        self.config = config
        self._slots = max(1, config.pool_limit * config.concurrency)  # jobs running at once
        # Threads for to_thread: the job slots bound them (trio's default limiter, 40
        # for the whole process, would make apps wait on each other), plus the threads
        # of hung calls, which hold a token until they return.
        self._threads = trio.CapacityLimiter(math.inf)
        self._handlers: dict[str, tuple[Callable[..., Any], str]] = {}
        self._jobs: dict[int, Job] = {}              # accepted and not answered
        self._queue: deque[Job] = deque()            # waiting for a slot, oldest first
        self._queued = trio.Event()                  # set when the queue was empty and is not
        self._running = 0
        self._scopes: dict[int, trio.CancelScope] = {}
        self._credit: dict[int, trio.Event] = {}     # streaming jobs waiting for a consumer
        self._times = ServiceTimes()                 # how long each event's sync calls take
        self._next_job = 1
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._quiet = trio.Event()
        self.broken_reason: str | None = None
        self._crashlog: deque[str] = deque(maxlen=max(1, config.crashlog_limit))
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.faults = FaultLog()
        self.done = self.failed = self.cancelled = self.crashes = self.timed_out = 0

    # -- lifetime ----------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            handlers = await trio.to_thread.run_sync(load_isolated, self.entry, self.app_name)
            self._handlers = {name: (fn, handler_kind(fn)) for name, fn in handlers.items()}
        except BaseException as exc:  # noqa: BLE001  SystemExit in app code too
            if isinstance(exc, (trio.Cancelled, KeyboardInterrupt)):
                raise
            # Like a slave that cannot import its app: the app is broken, not the node.
            self.broken_reason = f"cannot import {self.entry}: {type(exc).__name__}: {exc}"
            self._keep(traceback.format_exc())
            log.error("%s: %s", self.app_name, self.broken_reason)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.config.request_timeout is not None:
                    nursery.start_soon(self._expire_queued, self.config.request_timeout)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for job in list(self._jobs.values()):
                self._settle_failure(job, ShuttingDown("the app's thread pool stopped"))

    def use_zygote(self, zygote: Zygote) -> None:
        """Nothing to fork: handlers run in the node's own process."""

    def submit(self, event: str, payload: Any = None,
               chunks: AsyncIterable[Any] | None = None) -> Job:
        if self._nursery is None or self._draining or self._nursery.cancel_scope.cancel_called:
            raise ShuttingDown(f"the thread pool of {self.app_name!r} is not running")
        if self.broken_reason is not None:
            raise AppBroken(self.broken_reason)
        free = self._running < self._slots
        if not free and len(self._queue) >= self.config.queue_limit:
            raise QueueFull(f"queue-limit {self.config.queue_limit} reached")
        job = Job(self._next_job, event, payload, trio.current_time(), self, chunks)
        self._next_job += 1
        self._jobs[job.id] = job
        if free:
            self._start(job)
        else:
            self._queue.append(job)
            self._queued.set()
        return job

    def _start(self, job: Job) -> None:
        nursery = self._nursery
        assert nursery is not None, "jobs start only while the pool runs"
        self._running += 1
        nursery.start_soon(self._run, job)

    def _start_queued(self) -> None:
        while self._queue and self._running < self._slots and self._nursery is not None:
            job = self._queue.popleft()
            if not job.done:
                self._start(job)

    async def warm_up(self) -> None:
        """The handlers were imported when :meth:`run` started, or AppBroken says why not."""
        if self.broken_reason is not None:
            raise AppBroken(self.broken_reason)

    async def _expire_queued(self, limit: float) -> None:
        """request-timeout for jobs still waiting for a slot: the oldest is due first."""
        while True:
            while self._queue and self._queue[0].done:
                self._queue.popleft()   # cancelled while queued
            if not self._queue:
                self._queued = trio.Event()
                await self._queued.wait()
                continue
            job = self._queue[0]
            await trio.sleep_until(job.submitted_at + limit)
            if self._queue and self._queue[0] is job:
                self._queue.popleft()
                self.timed_out += 1
                self._settle_failure(job, RequestTimeout(
                    f"not answered within request-timeout {limit:g}s (still queued)"))

    async def drain(self, timeout: float) -> None:
        self._draining = True
        with trio.move_on_after(timeout):
            while self._jobs:
                self._quiet = trio.Event()
                await self._quiet.wait()
        self._queue.clear()
        for job in list(self._jobs.values()):
            scope = self._scopes.get(job.id)
            if scope is not None:
                scope.cancel()
            self._settle_failure(job, ShuttingDown(f"still running after the {timeout:g}s drain"))

    # -- views -------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return "draining" if self._draining else "broken" if self.broken_reason else "running"

    def load(self) -> PoolLoad:
        return PoolLoad(self.state, len(self._queue), self._running, 0)

    def info(self) -> dict[str, Any]:
        state = self.state
        return {"app": self.app_name, "backend": "thread", "state": state,
                "reason": self.broken_reason, "slaves": [],
                "queue": len(self._queue), "prefetched": 0,
                "running": self._running, "cancelling": 0,
                "done": self.done, "failed": self.failed, "cancelled": self.cancelled,
                "spawned": 0, "retired": 0, "crashes": self.crashes,
                "timed_out": self.timed_out,
                "faults": dict(self.faults.counts), "recent_faults": self.faults.recent(),
                "latency_ms": latency_ms(self._latencies)}

    def crashlog(self) -> list[str]:
        return list(self._crashlog)

    # -- one job -----------------------------------------------------------------------
    async def _run(self, job: Job) -> None:
        """One job's task: its boundary.  Nothing but a cancellation leaves it."""
        try:
            with trio.CancelScope() as scope:
                self._scopes[job.id] = scope
                try:
                    if not job.done:  # else cancelled before this task started: run nothing
                        await self._serve_within(job)
                except Exception as exc:  # the handler's failure is the caller's answer
                    self._keep(f"{job.event}: " + "".join(
                        traceback.format_exception_only(type(exc), exc)).strip())
                    self._settle_failure(job, _as_remote(exc))
        finally:
            self._running -= 1
            self._scopes.pop(job.id, None)
            self._credit.pop(job.id, None)
        try:
            # Here unless the whole pool is being torn down (then run() answers what is
            # left): the job ended, or its own scope was cancelled.
            if not job.done:
                self._settle_failure(job, JobCancelled("cancelled by its caller"))
            self._start_queued()
        except Exception as exc:  # a fault of this pool's own (a bug): still this job's only
            log.exception("%s: ending job %s failed", self.app_name, job.id)
            self.faults.record(f"job {job.id}", "job-task", f"{type(exc).__name__}: {exc}")

    async def _serve_within(self, job: Job) -> None:
        """:meth:`_serve`, bounded by the request-timeout (counted from submission)."""
        limit = self.config.request_timeout
        if limit is None:
            await self._serve(job)
            return
        with trio.move_on_at(job.submitted_at + limit) as timer:
            await self._serve(job)
        if timer.cancelled_caught and not job.done:
            self.timed_out += 1
            self.faults.record(f"job {job.id}", "request-timeout",
                               f"{job.event} not answered within request-timeout {limit:g}s")
            raise RequestTimeout(f"not answered within request-timeout {limit:g}s (a call "
                                 f"on a thread is left to finish)")

    async def _serve(self, job: Job) -> None:
        entry = self._handlers.get(job.event)
        if entry is None:
            raise UnknownEvent(f"no handler for event {job.event!r}; the app handles "
                               f"{sorted(self._handlers)}")
        fn, kind = entry
        args: tuple[Any, ...] = (job.payload,)
        if job.input is not None:  # a chunked request: the handler reads its chunks itself
            refused = chunks_refused(fn, kind)
            if refused:
                raise BadMessage(refused)
            args = (job.payload, job.input)
        if kind is ASYNC:
            self._settle(job, await fn(*args))
        elif kind is ASYNC_GEN:
            agen = fn(*args)
            try:
                async for item in agen:
                    await self._chunk(job, item)
            finally:
                await agen.aclose()
            self._settle(job, None, streamed=True)
        else:
            out = await self._sync_call(job, fn, job.payload)
            if inspect.isgenerator(out):
                try:
                    while (item := await self._sync_call(job, next, out, _DONE)) is not _DONE:
                        await self._chunk(job, item)
                        await trio.lowlevel.checkpoint()  # inline steps: let the node breathe
                finally:
                    out.close()
                self._settle(job, None, streamed=True)
            elif inspect.isawaitable(out):
                self._settle(job, await out)
            else:
                self._settle(job, out)

    async def _sync_call(self, job: Job, fn: Callable[..., Any], *args: Any) -> Any:
        """A plain function call (or generator step): inline on the node's loop once
        this event's calls have proved quick, else on a worker thread.  A thread hop
        costs 50-100 µs here, more than most small handlers take."""
        estimate = self._times.estimate(job.event)
        quick = estimate is not None and estimate < INLINE_BELOW
        t0 = time.perf_counter()
        try:
            if quick:
                inline.active = True  # engine.client.calls refuses to block the loop from here
                try:
                    return fn(*args)
                finally:
                    inline.active = False
            return await self._in_thread(job, fn, *args)
        finally:
            self._times.sample(job.event, time.perf_counter() - t0)

    async def _in_thread(self, job: Job, fn: Callable[..., Any], *args: Any) -> Any:
        """One sync call on a worker thread.  Cancelled (its caller gave up, the
        request-timeout), the job goes on without it: the thread is left to finish on its
        own (threads cannot be stopped)."""
        return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True,
                                             limiter=self._threads)

    async def _chunk(self, job: Job, item: Any) -> None:
        """Hand one chunk to the job; wait while its consumer is a window behind."""
        job._chunk(item)
        while job.buffered >= STREAM_WINDOW and not job.done:
            event = self._credit[job.id] = trio.Event()
            await event.wait()

    # -- answering ---------------------------------------------------------------------
    def _settle(self, job: Job, value: Any, streamed: bool = False) -> None:
        now = trio.current_time()
        if job._finish(value, streamed, now):
            self.done += 1
            self._latencies.append(now - job.submitted_at)
        self._forget(job)

    def _settle_failure(self, job: Job, error: RemoteError) -> None:
        if job._fail(error, trio.current_time()):
            if isinstance(error, JobCancelled):
                self.cancelled += 1
            else:
                self.failed += 1
        self._forget(job)

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if not self._jobs:
            self._quiet.set()

    # -- what a Job asks of its pool (JobOwner) -------------------------------------------
    def poll_job(self, job: Job) -> bool:
        """Nothing to poll: a thread hands its answer to the trio loop itself."""
        return False

    def cancel_job(self, job: Job) -> None:
        """Job.cancel(): answered at once; its task stops at its next checkpoint (a sync
        call already on a thread runs on, its result dropped)."""
        if job.id in self._jobs:
            self._settle_failure(job, JobCancelled("cancelled by its caller"))
        try:
            self._queue.remove(job)  # still waiting for a slot: it leaves the queue now
        except ValueError:
            pass
        scope = self._scopes.get(job.id)
        if scope is not None:
            scope.cancel()

    def grant_credit(self, job_id: int, chunks: int) -> None:
        event = self._credit.pop(job_id, None)
        if event is not None:
            event.set()

    def _keep(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self._crashlog.append(f"[thread] {line}")


if TYPE_CHECKING:  # `make lint` holds the backend to the seam it is used through
    _is_a_pool: type[Pool] = ThreadPool
