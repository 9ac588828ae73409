"""``SlavePool``: the trio shell that runs one app's slaves.

It drives two pure cores: :class:`engine.pool.policy.PoolPolicy` (queue, which job to
which slave, spawn/retire, broken state) and one :class:`engine.protocol.SlaveSession`
per slave (handshake, heartbeats, replies, deadlines), and carries out what they
decide with :class:`engine.pool.slave.SlaveProcess`.  Decisions are applied
synchronously where the event happens (``submit``, a frame arriving), so a job
reaches an idle slave without a scheduler hop; one timer task handles deadlines.

Contract (docs/architecture.md)::

    pool = SlavePool(app_name, entry, config)
    await nursery.start(pool.run)
    job = pool.submit(event, payload)     # QueueFull / ShuttingDown / AppBroken at once
    value = await job.result()            # or: async for chunk in job
    job.cancel()                          # caller gives up: queued -> dropped, running -> CANCEL
    await pool.drain(timeout)
    pool.info(); pool.crashlog()

Faults (docs/architecture.md): each slave lives in a task of its own,
:meth:`SlavePool._supervise`, which is that slave's boundary.  Whatever fails there (the
process, its link, garbage on it, acting on what it sent) is that slave's failure: its
jobs are answered with ``SlaveDied``, it is reaped and the policy replaces it (with
backoff when slaves keep dying before their handshake); the fault is counted in
``info()["faults"]``.  A message too large for the link fails only its job.  Only a
cancellation (the pool stopping) ends the pool.

A streamed reply is flow-controlled: the slave runs at most ``STREAM_WINDOW``
chunks ahead of what the job's consumer has taken (``async for`` or ``result()``),
which the pool reports back to the slave with CREDIT envelopes.  A chunked request
(``submit(event, payload, chunks)``) runs the same window the other way: a task per such
job forwards its chunks as the slave's CREDITs allow.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from collections import deque
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterable, Callable, assert_never, cast

import psutil
import trio

from transport.codec import Envelope, Kind
from transport.errors import BadMessage, CodecError, RemoteError
from transport.inbound import SendWindow

from engine import languages
from engine.languages.python import PythonPlugin
from engine.pool import policy as P
from engine.pool.base import Pool, PoolLoad
from engine.protocol import node_session as S
from engine.errors import AppBroken, JobCancelled, ShuttingDown
from engine.faults import FaultLog, describe
from engine.pool.job import Job
from engine.manifest import EngineConfig
from engine.pool.slave import SlaveProcess
from engine.pool.zygote_client import Zygote, running_zygote

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1024  # jobs over which p50/p99 are computed
RSS_CHECK = 1.0        # seconds between checks of engine.max-rss-per-slave


def latency_ms(latencies: deque[float]) -> dict[str, float | None]:
    """p50 and p99 of the recent jobs' latencies (seconds in, milliseconds out)."""
    lat = sorted(latencies)

    def q(f: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(f * len(lat)))] * 1000, 3) if lat else None

    return {"p50": q(0.5), "p99": q(0.99)}


@dataclass(slots=True)
class _Slave:
    id: int
    process: SlaveProcess
    # From the moment its process runs (the policy decides nothing about a slave before
    # its handshake, so every decision naming a slave finds its session there).
    session: S.SlaveSession | None = None
    on_frame: Callable[[list[Envelope]], None] | None = None  # what its pump does with a frame


class SlavePool:
    """The process backend of :class:`engine.pool.base.Pool` (and so a
    :class:`~engine.pool.job.JobOwner`)."""

    def __init__(self, app_name: str, entry: Path, config: EngineConfig, *,
                 restart_intensity: int = 3, backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 python: str = sys.executable, language: str = "python",
                 args: tuple[str, ...] = (), base_dir: Path | None = None) -> None:
        """``language``: the plugin that starts its slaves (engine/languages/); ``args``
        and ``base_dir``: the manifest's arguments after the entry, and its folder."""
        self.app_name = app_name
        self.entry = Path(entry)
        self.config = config
        self.python = python
        self.plugin = PythonPlugin(python) if language == "python" else languages.get(language)
        self.args = args
        self.base_dir = base_dir
        # a Python zygote forks slaves of a language that allows it, over a socket
        self._forks = (config.spawn == "zygote" and self.plugin.forkable
                       and (config.transport or self.plugin.transports[0]) == languages.SOCKET)
        self.policy: P.PoolPolicy[int] = P.PoolPolicy(
            pool_limit=config.pool_limit, queue_limit=config.queue_limit,
            grow_threshold=config.grow_threshold, idle_timeout=config.idle_timeout,
            concurrency=config.concurrency, restart_intensity=restart_intensity,
            backoff_base=backoff_base, backoff_cap=backoff_cap,
            prefetch=config.prefetch, max_jobs=config.max_jobs_per_slave,
            request_timeout=config.request_timeout)
        self._jobs: dict[int, Job] = {}          # accepted jobs the policy still tracks
        self._slaves: dict[int, _Slave] = {}
        self._next_job = 1
        self._nursery: trio.Nursery | None = None
        self._death_fd: int | None = None        # read end of the node-death pipe, for slaves
        self._zygote: Zygote | None = None        # forks slaves fast (engine.spawn "zygote")
        self._shared_zygote: Zygote | None = None # the node's, if it gave one
        self._timer_wakeup = trio.Event()
        self._timer_at = math.inf
        self._quiet = trio.Event()                # set when no accepted job is pending
        self._crashlog: deque[str] = deque(maxlen=max(1, config.crashlog_limit))
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._input_windows: dict[int, SendWindow] = {}  # chunked jobs: chunks the slave takes
        self.faults = FaultLog()                  # failures of its parts (slaves, links)
        self.done = 0
        self.failed = 0
        self.cancelled = 0
        self.crashes = 0
        self._warming: trio.Event | None = None   # warm_up() waits: a handshake or a failed start
        self._failed_start: str | None = None     # why the last slave died before its handshake

    # -- lifetime --------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise slaves until cancelled; started() once submit() may be called."""
        death_r, death_w = os.pipe()   # slaves see EOF on death_r when this process dies
        self._death_fd = death_r
        try:
            async with AsyncExitStack() as stack:
                if self._forks:
                    shared = self._shared_zygote
                    if shared is not None and shared.python == self.python:
                        self._zygote = shared
                    else:  # its own, which outlives the slaves (the nursery below)
                        self._zygote = await stack.enter_async_context(running_zygote(self.python))
                    self._zygote.want()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.config.max_rss_per_slave:
                        nursery.start_soon(self._watch_rss)
                    task_status.started()
                    try:
                        await self._timer_loop()
                    finally:
                        self.policy.close()
        finally:
            self._nursery = None
            now = trio.current_time()
            for job in list(self._jobs.values()):
                self._answer_fail(job.id, ShuttingDown("the app's slave pool stopped"), now)
            os.close(death_r)
            os.close(death_w)

    def use_zygote(self, zygote: Zygote) -> None:
        """Fork slaves through this zygote (the node's, shared by its pools) rather
        than one of the pool's own; call before :meth:`run`."""
        self._shared_zygote = zygote

    def submit(self, event: str, payload: Any = None,
               chunks: AsyncIterable[Any] | None = None) -> Job:
        """``chunks``: a chunked request's chunks (an async iterable, e.g. an rpc
        request's InputStream), forwarded to the slave as its handler takes them."""
        if self._nursery is None or self._nursery.cancel_scope.cancel_called:
            raise ShuttingDown(f"the slave pool of {self.app_name!r} is not running")
        now = trio.current_time()
        job_id = self._next_job
        decisions = self.policy.submit(job_id, now, event)  # raises QueueFull / ShuttingDown / AppBroken
        self._next_job += 1
        job = self._jobs[job_id] = Job(job_id, event, payload, now, self, chunks)
        self._apply(decisions, now)
        timeout = self.config.request_timeout
        if timeout is not None and now + timeout < self._timer_at:
            self._wake_timer(now + timeout)  # the first job waiting on its request-timeout
        return job

    def poll_job(self, job: Job) -> bool:
        """Act on what the slave running ``job`` has sent already, without waiting;
        True if anything came.  Only for a lone job: then that slave's next frame is
        its answer, and nothing else in the pool is kept waiting (transport/_spin.py)."""
        if len(self._jobs) != 1 or job.id not in self._jobs:
            return False
        slave = self._slaves.get(self.policy.owner.get(job.id, -1))
        if slave is None or slave.on_frame is None or slave.process is None:
            return False
        envelopes = slave.process.poll()
        if envelopes:
            slave.on_frame(envelopes)
        return bool(envelopes)

    async def warm_up(self) -> None:
        """A slave handshaked (one is started if none is live), or AppBroken with why
        the one started died first: it could not import the app, or missed its
        startup-timeout (the session kills it then, so this always ends)."""
        while True:
            if self.policy.info()[P.READY]:
                return
            if self.policy.broken_reason is not None:
                raise AppBroken(self.policy.broken_reason)
            self._warming = warming = trio.Event()
            self._failed_start = None
            now = trio.current_time()
            self._apply(self.policy.warm(now), now)
            await warming.wait()
            if self._failed_start is not None:
                raise AppBroken(f"its first slave did not start: {self._failed_start}")

    async def drain(self, timeout: float) -> None:
        """Refuse new jobs, let queued and running ones finish for up to ``timeout``
        seconds, then fail what is left with ShuttingDown and retire the slaves."""
        now = trio.current_time()
        self._apply(self.policy.drain(now), now)
        with trio.move_on_after(timeout):
            while self._jobs or self.policy.owner:  # owner: cancelled jobs not yet acknowledged
                self._quiet = trio.Event()
                await self._quiet.wait()
        now = trio.current_time()
        self._apply(self.policy.fail_queued(ShuttingDown, "drain timeout: the job never started"), now)
        for slave in list(self._slaves.values()):
            if slave.session is not None and slave.session.jobs:
                self._act(slave, slave.session.kill(f"still busy after the {timeout:g}s drain",
                                                    ShuttingDown), now)
        self._apply(self.policy.retire_all(now), now)

    # -- views ---------------------------------------------------------------------
    def load(self) -> PoolLoad:
        p = self.policy
        return PoolLoad(p.state, len(p.queue), len(p.owner), len(p.slaves))

    def info(self) -> dict[str, Any]:
        p = self.policy.info()
        slaves = []
        for s in self._slaves.values():
            sess = s.session
            slaves.append({"id": s.id, "pid": s.process.pid,
                           "state": sess.state.value if sess else "spawning",
                           "jobs": len(sess.jobs) if sess else 0})
        return {"app": self.app_name, "state": p["state"], "reason": p["reason"], "slaves": slaves,
                "queue": p["queue"], "prefetched": p["prefetched"], "running": p["running"],
                "cancelling": p["cancelling"],
                "done": self.done,
                "failed": self.failed, "cancelled": self.cancelled, "spawned": p["spawned"],
                "retired": p["retired"], "recycled": p["recycled"], "timed_out": p["timed_out"],
                "crashes": self.crashes, "latency_ms": latency_ms(self._latencies),
                "faults": dict(self.faults.counts), "recent_faults": self.faults.recent(),
                "prefetch": p["prefetch"],
                "zygote": self._zygote.pid if self._zygote and self._zygote.ready else None}

    def crashlog(self) -> list[str]:
        return list(self._crashlog)

    # -- carrying out decisions ----------------------------------------------------------
    def _apply(self, decisions: list[P.Decision[int]], now: float) -> None:
        # Only assignments (the common case: a job reaching a slave) cannot bring a
        # policy deadline nearer: a slave that had room took the job, and no slave is
        # idle while jobs wait.  Anything else re-reads the policy's next deadline.
        rearm = False
        for d in decisions:
            # Per job: a type identity test, cheaper than the match's isinstance (the
            # decision types are final, so the checker narrows the match below too).
            if type(d) is P.Assign:
                slave, job = self._slaves[d.slave], self._jobs[d.job]
                session = slave.session
                assert session is not None, "only a slave that handshaked is given jobs"
                chunks = job.input
                try:
                    self._act(slave, session.invoke(job.id, job.id, job.event, job.payload,
                                                    chunks is not None), now)
                except BadMessage as exc:  # its INVOKE cannot go (over the link's limit)
                    self.faults.record(f"slave {slave.process.pid}", "too-large", str(exc))
                    self._act(slave, session.withdraw(job.id, exc), now)
                    continue
                if chunks is not None:
                    self._running().start_soon(self._send_input, slave, job, chunks)
                continue
            rearm = True
            match d:
                case P.Spawn():
                    slave = self._slaves[d.slave] = _Slave(d.slave, SlaveProcess(
                        app=self.app_name, entry=self.entry, config=self.config,
                        death_fd=self._death_fd, python=self.python, zygote=self._zygote,
                        plugin=self.plugin, args=self.args, base_dir=self.base_dir))
                    self._running().start_soon(self._supervise, slave,
                                               name=f"slave-{self.app_name}-{d.slave}")
                case P.Retire():
                    slave = self._slaves[d.slave]
                    session = slave.session
                    assert session is not None, "only a slave that handshaked is retired"
                    self._act(slave, session.terminate(now), now)
                    self._wake_timer(session.next_deadline())
                case P.Fail():
                    self._answer_fail(d.job, d.error, now)
                case P.Cancel():
                    self._answer_fail(d.job, d.error or JobCancelled(
                        "cancelled by its caller while running"), now)
                    slave = self._slaves[d.slave]
                    session = slave.session
                    assert session is not None, "a slave holding a job has handshaked"
                    self._act(slave, session.cancel(d.job, now), now)
                    self._wake_timer(session.next_deadline())  # the acknowledgement deadline
                case _:
                    assert_never(d)
        if rearm:
            self._wake_timer(self.policy.next_deadline())

    def _running(self) -> trio.Nursery:
        """The pool's nursery, for the tasks a decision starts (decisions come only
        while :meth:`run` runs: the policy is closed before its nursery ends)."""
        nursery = self._nursery
        assert nursery is not None, "a decision that starts a task while the pool is not running"
        return nursery

    def _act(self, slave: _Slave, actions: list[Any], now: float) -> None:
        """Carry out what a slave's session asks for (its ``S.Action`` list).  Per
        message: one ``type()`` and identity tests, the commonest first.  Typed ``Any``:
        a session names jobs as ``Hashable`` where this pool's are ints (the job ids it
        hands to ``invoke``), which the checker cannot see."""
        for a in actions:
            kind = type(a)
            if kind is S.Send:
                slave.process.send(*a.envelope)
            elif kind is S.Chunk:
                job = self._jobs.get(a.job)
                if job is not None:
                    job._chunk(a.value)
            elif kind is S.Finished or kind is S.Failed:
                job = self._jobs.pop(a.job, None)
                if job is None:
                    pass  # already answered (cancelled, or the pool is stopping)
                elif kind is S.Finished:
                    if job._finish(a.value, a.streamed, now):
                        self.done += 1
                        self._latencies.append(now - job.submitted_at)
                elif job._fail(a.error, now):
                    self.failed += 1
                if not self._jobs:
                    self._quiet.set()
                # only a slave's own answer says how long a job took
                answered = kind is S.Finished or a.from_slave
                self._apply(self.policy.job_finished(a.job, now, answered=answered), now)
                # Maybe that slave went idle: its retirement deadline is now + idle-timeout
                # (no other deadline moves when a job ends); skip the full scan when the
                # timer is due before that anyway.
                if now + self.policy.idle_timeout < self._timer_at:
                    self._wake_timer(self.policy.next_deadline())
            elif kind is S.InputCredit:
                window = self._input_windows.get(a.job)
                if window is not None:
                    window.credit(a.chunks)
            elif isinstance(a, S.Ready):
                if self._warming is not None:
                    self._warming.set()
                self._apply(self.policy.slave_ready(slave.id, a.concurrency, now), now)
                assert slave.session is not None, "its session said it is ready"
                self._wake_timer(slave.session.next_deadline())
            elif isinstance(a, S.Kill):
                log.warning("%s: killing slave %s: %s", self.app_name, slave.process.pid, a.reason)
                slave.process.kill()
                self._apply(self.policy.slave_stopping(slave.id, now), now)
            elif isinstance(a, S.Stopping):
                self._apply(self.policy.slave_stopping(slave.id, now), now)

    # -- what a Job asks of its pool (JobOwner) -------------------------------------------
    def cancel_job(self, job: Job) -> None:
        if self._jobs.get(job.id) is job:
            now = trio.current_time()
            self._apply(self.policy.cancel(job.id, now), now)

    def grant_credit(self, job_id: int, chunks: int) -> None:
        slave = self._slaves.get(self.policy.owner.get(job_id, -1))
        if slave is not None and slave.session is not None:
            self._act(slave, slave.session.grant(job_id, chunks), trio.current_time())

    def _answer_fail(self, job_id: int, error: RemoteError, now: float) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None and job._fail(error, now):
            if isinstance(error, JobCancelled):
                self.cancelled += 1
            else:
                self.failed += 1
        if not self._jobs:
            self._quiet.set()

    # -- tasks -------------------------------------------------------------------------
    async def _send_input(self, slave: _Slave, job: Job, chunks: AsyncIterable[Any]) -> None:
        """Forward a chunked job's chunks to its slave, never more than the slave's
        window ahead of its handler; stops when the job is answered (or its slave gone).
        A failure here is this job's: it is answered with the error and cancelled on
        its slave."""
        window = self._input_windows[job.id] = SendWindow()
        try:
            with trio.CancelScope() as scope:
                job.add_done_callback(lambda _: scope.cancel())
                try:
                    async for item in chunks:
                        await window.wait()
                        window.left -= 1
                        slave.process.send(Kind.CHUNK, job.id, item)
                    slave.process.send(Kind.CHOKE, job.id, None)
                except BadMessage as exc:  # a chunk over the link's limit, or malformed
                    self.faults.record(f"slave {slave.process.pid}", "too-large", str(exc))
                    self._fail_running(job, exc)
                except RemoteError:  # the caller's chunks broke off (it left, or overran)
                    job.cancel()
                except Exception as exc:
                    log.exception("%s: forwarding the chunks of job %s failed", self.app_name, job.id)
                    self.faults.record(f"slave {slave.process.pid}", "input",
                                       f"{type(exc).__name__}: {exc}")
                    self._fail_running(job, BadMessage(
                        f"the request's chunks could not be forwarded: {type(exc).__name__}: {exc}"))
        finally:
            self._input_windows.pop(job.id, None)

    def _fail_running(self, job: Job, error: RemoteError) -> None:
        """Answer a job on a slave with ``error`` now, and have the slave stop it (its
        slot frees when the slave acknowledges, as for any cancelled job)."""
        now = trio.current_time()
        if self._jobs.get(job.id) is job:
            self._answer_fail(job.id, error, now)
            self._apply(self.policy.cancel(job.id, now), now)


    async def _supervise(self, slave: _Slave) -> None:
        """One slave's whole life: spawn, talk, reap, report.  This task is the slave's
        boundary: whatever fails in it is this slave's failure, never the pool's; only
        a cancellation (the pool stopping) goes through."""
        try:
            await self._slave_life(slave)
        except* Exception as group:
            # It escaped the slave's own handling below (a bug): still this slave's only.
            log.error("%s: the supervisor of slave %s failed", self.app_name, slave.process.pid,
                      exc_info=group)
            self.faults.record(f"slave {slave.process.pid}", "supervisor", describe(group))
            self._gone_anyway(slave, f"its supervisor failed: {describe(group)}")

    def _gone_anyway(self, slave: _Slave, reason: str) -> None:
        """After a supervisor failure: make sure the slave is dead and forgotten, and
        its jobs answered, whatever was done before the failure."""
        slave.process.kill()
        now = trio.current_time()
        sess = slave.session
        if sess is not None:
            for action in sess.kill(reason):
                if isinstance(action, S.Failed):
                    self._answer_fail(cast(int, action.job), action.error, now)
        self._slaves.pop(slave.id, None)
        if slave.id in self.policy.slaves and not self.policy.closed:
            handshaked = sess.handshaked if sess is not None else False
            self._apply(self.policy.slave_gone(slave.id, now, handshaked=handshaked, reason=reason),
                        now)

    def _slave_failed(self, slave: _Slave, kind: str, reason: str) -> None:
        """Something this slave sent, or acting on it, failed: kill it, its jobs failing
        with ``reason`` (it is reaped and replaced as any dead slave is)."""
        self.faults.record(f"slave {slave.process.pid}", kind, reason)
        sess = slave.session
        if sess is None:
            slave.process.kill()
        else:
            self._act(slave, sess.kill(reason), trio.current_time())

    async def _slave_life(self, slave: _Slave) -> None:
        cfg = self.config
        proc = slave.process
        spawn_error = None
        try:
            async with proc.open():
                now = trio.current_time()
                assert proc.pid is not None, "open() has started the process"
                slave.session = sess = S.SlaveSession(
                    pid=proc.pid, now=now, startup_timeout=cfg.startup_timeout,
                    heartbeat_timeout=cfg.heartbeat_timeout,
                    termination_timeout=cfg.termination_timeout, concurrency=cfg.concurrency,
                    prefetch=self.policy.max_prefetch)  # a bound: the policy decides
                self._wake_timer(sess.next_deadline())
                receive, act, clock = sess.receive, self._act, trio.current_time

                def on_frame(frame: list[Envelope]) -> None:
                    # The jobs this frame frees the slave for leave as one frame.
                    now = clock()
                    proc.hold()
                    try:
                        for env in frame:
                            act(slave, receive(env, now), now)
                    finally:
                        proc.release()

                slave.on_frame = on_frame
                try:
                    await proc.pump(on_frame)
                except CodecError as exc:  # framing lost: nothing more it sends can be read
                    log.warning("%s: slave %s sent garbage on its link: %s", self.app_name,
                                proc.pid, exc)
                    self._slave_failed(slave, "link-garbage", f"sent garbage on its link ({exc})")
                except Exception as exc:  # acting on what it sent failed (a bug)
                    log.exception("%s: handling what slave %s sent failed", self.app_name, proc.pid)
                    self._slave_failed(slave, "slave-frame", f"what it sent could not be handled "
                                                             f"({type(exc).__name__}: {exc})")
                except trio.Cancelled:
                    # Tell the callers now, not after the graceful stop below.
                    # (no Kill: the graceful TERMINATE/SIGTERM/SIGKILL stop follows)
                    now = trio.current_time()
                    self.policy.close()  # the pool is being torn down: no spawns, no assigns
                    kill = sess.kill("the app's slave pool stopped", ShuttingDown)
                    self._act(slave, [a for a in kill if not isinstance(a, S.Kill)], now)
                    raise
        except OSError as exc:  # could not listen or exec: counts as a failed start
            spawn_error = f"cannot start slave: {exc}"
            log.error("%s: %s", self.app_name, spawn_error)
        finally:
            self._reaped(slave, spawn_error)

    def _reaped(self, slave: _Slave, spawn_error: str | None) -> None:
        now = trio.current_time()
        proc, sess = slave.process, slave.session
        handshaked = sess.handshaked if sess else False
        reason = spawn_error or S.describe_exit(proc.returncode)
        if proc.fault is not None and sess is not None:
            kind, why = proc.fault
            self.faults.record(f"slave {proc.pid}", kind, why)
            self._act(slave, sess.kill(why), now)  # its jobs fail with why it was killed
        if sess is not None:
            # First: no job may be handed to the dead slave.  (One that never handshaked
            # holds none; stopping it first would spawn its replacement before its
            # failed start is counted, past the broken state's backoff.)
            if not self.policy.closed and handshaked:
                self._apply(self.policy.slave_stopping(slave.id, now), now)
            self._act(slave, sess.exited(proc.returncode), now)
            if sess.startup_error is not None:
                reason = f"{sess.startup_error} (slave {proc.pid} {reason})"
            elif sess.kill_reason:
                reason = f"slave {proc.pid} killed: {sess.kill_reason}"
            else:
                reason = f"slave {proc.pid} {reason}"
        if proc.pid is not None and (proc.returncode != 0 or (sess is not None and sess.kill_reason)):
            self.crashes += 1
            self.faults.record(f"slave {proc.pid}", "slave-died", reason)
            self._crashlog.extend(f"[{proc.pid}] {line}" for line in proc.output)
            self._crashlog.append(f"[{proc.pid}] -- {reason}")
        del self._slaves[slave.id]
        if not handshaked and self._warming is not None:
            self._failed_start = reason
            self._warming.set()
        if self._nursery is not None and not self._nursery.cancel_scope.cancel_called:
            self._apply(self.policy.slave_gone(slave.id, now, handshaked=handshaked, reason=reason), now)
            # A failed start sets the next probe's backoff deadline even when nothing
            # is decided now (no decision, so _apply did not re-arm the timer).
            self._wake_timer(self.policy.next_deadline())

    async def _timer_loop(self) -> None:
        """Deadlines: startup, heartbeat, termination (sessions); idle, backoff (policy)."""
        while True:
            now = trio.current_time()
            for slave in list(self._slaves.values()):
                if slave.session is not None:
                    self._act(slave, slave.session.tick(now), now)
            self._apply(self.policy.tick(now), now)
            times = [self.policy.next_deadline()]
            times += [s.session.next_deadline() for s in self._slaves.values() if s.session]
            self._timer_at = min((t for t in times if t is not None), default=math.inf)
            self._timer_wakeup = trio.Event()
            with trio.move_on_at(self._timer_at):
                await self._timer_wakeup.wait()

    async def _watch_rss(self) -> None:
        """engine.max-rss-per-slave: every RSS_CHECK seconds, a slave over it is worn
        (finishes its jobs, then is replaced: engine/pool/policy.py)."""
        limit = self.config.max_rss_per_slave * 1024 * 1024
        while True:
            await trio.sleep(RSS_CHECK)
            now = trio.current_time()
            for slave in list(self._slaves.values()):
                pid = slave.process.pid
                if pid is None or slave.session is None:
                    continue
                try:
                    rss = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    continue            # gone meanwhile: its reaper reports it
                if rss > limit:
                    log.info("%s: slave %d uses %.0f MB (max-rss-per-slave %g): replacing it "
                             "once its jobs are done", self.app_name, pid, rss / 2**20,
                             self.config.max_rss_per_slave)
                    self._apply(self.policy.slave_worn(slave.id, now), now)

    def _wake_timer(self, deadline: float | None) -> None:
        if deadline is not None and deadline < self._timer_at:
            self._timer_at = deadline
            self._timer_wakeup.set()


if TYPE_CHECKING:  # `make lint` holds the backend to the seam it is used through
    _is_a_pool: type[Pool] = SlavePool
