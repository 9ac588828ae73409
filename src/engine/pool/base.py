"""The seams of the pool package: what an app sees of its pool, whichever backend.

Two backends meet here: :class:`engine.pool.process.SlavePool` (slave processes, the
default) and :class:`engine.pool.threads.ThreadPool` (threads and tasks in the node).
:class:`engine.app.App`, the drivers and the node hold a :class:`Pool` and cannot tell
them apart; a :class:`~engine.pool.job.Job` holds the narrower :class:`JobOwner` (what
it calls on its pool), which is defined beside ``Job`` so that ``job.py`` imports no
pool module, and re-exported here with the rest of the surface.  Who answers a request
from a job (the node's control endpoint, the native-server driver) holds a
:class:`JobHandle`: the caller's side of a ``Job``, which test fakes implement too.

Structural (``typing.Protocol``), not base classes: the backends share no code, and a
test's fake pool is a pool by having these methods.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Callable, NamedTuple, Protocol

import trio

from engine.pool.job import Job, JobOwner

if TYPE_CHECKING:
    from transport.errors import RemoteError

    from engine.pool.zygote_client import Zygote

__all__ = ["Job", "JobHandle", "JobOwner", "Pool", "PoolLoad"]


class JobHandle(Protocol):
    """The caller's side of an accepted job, as code that turns it into a reply uses it
    (:func:`engine.node.control.reply_later` and ``answer``): :class:`Job` is one, and
    so is a test's stand-in.  Typed members rather than probes, since ``reply_later``
    runs once per request."""

    @property
    def done(self) -> bool:
        """Answered (a value, an error, or the end of a stream)."""
        ...

    @property
    def streaming(self) -> bool | None:
        """Whether the reply is a stream of chunks; None until the first reply."""
        ...

    @property
    def error(self) -> RemoteError | None:
        """Why it failed, once it has."""
        ...

    def result_nowait(self) -> Any:
        """The single value of a job answered without streaming (raises its error)."""
        ...

    def add_reply_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(job)`` once the first reply (a chunk, or the answer) is there."""

    def cancel(self) -> None:
        """Give up on it; no effect once it is answered."""

    def poll(self) -> bool:
        """Act now on whatever of its answer has arrived; True if anything had."""
        ...

    def __aiter__(self) -> AsyncIterator[Any]:
        """Its chunks as they arrive (the single value, for a reply that is not a stream)."""
        ...


class PoolLoad(NamedTuple):
    """How busy a pool is now, in numbers (cheap enough to ask per request: the cluster
    balances on it), where :meth:`Pool.info` is the whole picture for people."""

    state: str     # running | broken | draining
    queue: int     # jobs waiting for a slot
    running: int   # jobs on slaves (or threads), prefetched ones included
    slaves: int    # slave processes, starting ones included (0 for threads)


class Pool(JobOwner, Protocol):
    """One app's pool: accepts jobs, runs them, answers each exactly once.

    Contract (docs/architecture.md)::

        await nursery.start(pool.run)
        job = pool.submit(event, payload)   # QueueFull / ShuttingDown / AppBroken at once
        value = await job.result()          # or: async for chunk in job
        await pool.drain(timeout)
    """

    app_name: str
    done: int        # jobs answered with a value (or a finished stream)
    failed: int      # jobs answered with an error
    cancelled: int   # jobs answered with JobCancelled
    crashes: int     # slaves (or threads) lost while holding jobs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the jobs until cancelled; ``started()`` once :meth:`submit` may be called."""

    def use_zygote(self, zygote: Zygote) -> None:
        """Before :meth:`run`: fork slave processes through the node's zygote rather
        than one of the pool's own (a backend without processes ignores it)."""

    def submit(self, event: str, payload: Any = None,
               chunks: AsyncIterable[Any] | None = None) -> Job:
        """Accept one job or raise QueueFull / ShuttingDown / AppBroken at once.
        ``chunks``: a chunked request's chunks, for the handler to read as it goes."""
        ...

    async def warm_up(self) -> None:
        """Once :meth:`run` has started: make sure the app's code runs (a first slave
        started and handshaked, or its handlers imported), else raise AppBroken saying
        why.  A redeploy switches requests to a new pool only after this."""

    async def drain(self, timeout: float) -> None:
        """Refuse new jobs and let the accepted ones finish for up to ``timeout``
        seconds; what is left then fails with ShuttingDown."""

    def load(self) -> PoolLoad:
        """How busy it is now (cheap)."""
        ...

    def info(self) -> dict[str, Any]:
        """State, queue, slaves and counters, for ``info`` and ``top``."""
        ...

    def crashlog(self) -> list[str]:
        """The last lines of output of slaves that failed (or tracebacks of threads)."""
        ...
