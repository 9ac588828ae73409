"""Pool policy as a pure state machine: which job goes to which slave, when to
spawn, when to retire, when the app is broken.  No I/O, no trio, time passed in.

The shell (:mod:`engine.pool.process`) reports what happened (a job was submitted, a slave
handshaked or went away, a job was answered, the clock moved) and carries out the
*decisions* returned, each a :data:`Decision`: :class:`Spawn`, :class:`Assign`,
:class:`Retire`, :class:`Fail`, :class:`Cancel` (a closed union, which the shell takes
apart with an exhaustive ``match``: the type checker names a case it misses).  A job is
owned by exactly one place at a time (queue -> slave -> answered), which makes "every
accepted job is answered exactly once" checkable.

Cancellation: a queued job leaves the queue and is answered with JobCancelled
(:class:`Fail`); a job on a slave gets one :class:`Cancel` (the shell answers the
caller and asks the slave to stop) and keeps its slot until the slave is done with
it (:meth:`job_finished`), so a slave never holds more jobs than its capacity.

Prefetch (:mod:`engine.pool.prefetch`): a ready slave may be handed jobs beyond its
concurrency, which it queues and starts as slots free; :class:`PrefetchRule` says when
(by default only behind jobs expected to finish within ~2 ms).  The policy measures
what the rule needs: each answered job's service time, as ``now - max(assigned at,
that slave's previous answer)`` (it cannot have started before either), per event;
cancelled jobs and jobs failed by a slave's death are not samples.  Prefetched jobs
count as waiting: for growth, and against ``queue_limit`` (so prefetch never changes
how many jobs an app accepts).

Growth: spawn while ``waiting > grow_threshold * (slaves starting or ready)`` and
below ``pool_limit``, where waiting = queued + prefetched.  Retirement: a ready slave
idle for ``idle_timeout`` while nothing waits.  Broken state (an Erlang supervisor's
restart intensity): after ``restart_intensity`` slaves in a row die before their
handshake, the app is broken; queued jobs fail with AppBroken, new ones are refused,
and one probe slave is spawned after an exponential backoff (``backoff_base * 2**n``,
capped).  A handshake ends the broken state.

Recycling (gunicorn's ``max_requests``, Celery's ``max_tasks_per_child``): with
``max_jobs``, each slave is given a quota drawn from ``[max_jobs, max_jobs + max_jobs //
10]`` (so slaves started together do not all leave together) and, once it has finished
that many jobs, or once the shell says it grew too large (:meth:`slave_worn`, its RSS),
it is *worn*: it takes no new job, finishes the ones it holds, and is then retired like an
idle slave; no job fails because of it.  A worn slave does not count as capacity, so
waiting jobs grow a replacement (within ``pool_limit``: at the limit the replacement
starts once the worn slave has gone).

Request timeout (``request-timeout``): with ``request_timeout``, a job not answered that
long after its submission is answered with RequestTimeout: a queued one leaves the queue
(:class:`Fail`), one on a slave gets a :class:`Cancel` carrying that error, so its slot is
held until the slave stops the handler (or is killed for not stopping it: the session's
termination-timeout).  Deadlines follow submission order, so the next one due is the
oldest unanswered job's: an ordered map, O(1) per job.
"""
from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, TypeAlias, TypeVar, Union, final

from transport.errors import RemoteError

from engine.errors import AppBroken, JobCancelled, QueueFull, RequestTimeout, ShuttingDown, SlaveDied
from engine.pool.prefetch import PrefetchRule, Setting

STARTING, READY, RETIRING, STOPPING = "starting", "ready", "retiring", "stopping"
WORN = "worn"
# RETIRING: we asked an idle slave to exit.  STOPPING: it is going away for another
# reason (killed as hung, said it is exiting).  WORN: past its job quota or memory
# limit, finishing what it holds before it is retired.  None of them takes jobs.

J = TypeVar("J", bound=Hashable)  # what the shell names its jobs by (the pool: an int)


# -- decisions ---------------------------------------------------------------------------
# Frozen, slotted and final: one small object per decision, as cheap to make as a tuple,
# and final so that a shell's ``type(d) is Assign`` fast path narrows for the type
# checker too (the rest goes through an exhaustive ``match``; see SlavePool._apply).

@final
@dataclass(frozen=True, slots=True)
class Spawn:
    """Start a slave process named ``slave``; it reports back through slave_ready or
    slave_gone."""
    slave: int


@final
@dataclass(frozen=True, slots=True)
class Assign(Generic[J]):
    """Hand ``job`` to ``slave`` (which has a free slot, or may prefetch it)."""
    job: J
    slave: int


@final
@dataclass(frozen=True, slots=True)
class Retire:
    """Ask the idle ``slave`` to exit."""
    slave: int


@final
@dataclass(frozen=True, slots=True)
class Fail(Generic[J]):
    """Answer ``job``'s caller with ``error``; the policy has forgotten the job."""
    job: J
    error: RemoteError


@final
@dataclass(frozen=True, slots=True)
class Cancel(Generic[J]):
    """Answer ``job``'s caller with ``error`` (None: JobCancelled, its caller gave up)
    and ask ``slave`` to stop it; the slot is freed by job_finished once the slave
    acknowledges."""
    job: J
    slave: int
    error: RemoteError | None = None


# Everything the policy can ask of its shell; a shell handles each (``match`` with
# ``assert_never`` in its default case, so the type checker finds a missing one).
Decision: TypeAlias = Union[Spawn, Assign[J], Retire, Fail[J], Cancel[J]]


@dataclass
class SlaveView(Generic[J]):
    state: str
    spawned_at: float
    concurrency: int = 1             # jobs it runs at once (the handshake's); more are prefetched
    jobs: set[J] = field(default_factory=set)
    idle_since: float = 0.0
    last_done_at: float = float("-inf")  # when it last answered a job (service-time samples)
    held: dict[str, int] = field(default_factory=dict)  # event -> how many of its jobs it holds
    done: int = 0                    # jobs it finished
    quota: int = 0                   # jobs after which it is worn (0: no limit)


class PoolPolicy(Generic[J]):
    def __init__(self, *, pool_limit: int, queue_limit: int, grow_threshold: int = 1,
                 idle_timeout: float = 600.0, concurrency: int = 1, restart_intensity: int = 3,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 prefetch: Setting = 0, max_jobs: int = 0,
                 request_timeout: float | None = None,
                 rng: random.Random | None = None) -> None:
        if pool_limit < 1 or queue_limit < 0 or grow_threshold < 0 or concurrency < 1 \
                or max_jobs < 0 or (request_timeout is not None and not request_timeout > 0):
            raise ValueError("pool_limit>=1, queue_limit>=0, grow_threshold>=0, concurrency>=1, "
                             "max_jobs>=0, request_timeout>0 or None")
        self.request_timeout = request_timeout
        # unanswered jobs -> when their request-timeout is due, oldest first (only with one)
        self.due: OrderedDict[J, float] = OrderedDict()
        self.timed_out = 0                     # jobs answered with RequestTimeout
        self.max_jobs = max_jobs
        self._rng = rng or random.Random()
        self.pool_limit = pool_limit
        self.queue_limit = queue_limit
        self.grow_threshold = grow_threshold
        self.idle_timeout = idle_timeout
        self.concurrency = concurrency
        self.rule = PrefetchRule(prefetch)     # raises ValueError for a bad setting
        self.prefetch = prefetch               # the setting: "auto" or a fixed number
        self.max_prefetch = self.rule.limit    # no slave ever holds more beyond concurrency
        self.restart_intensity = restart_intensity
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap

        self.queue: deque[J] = deque()
        self.slaves: dict[int, SlaveView[J]] = {}
        self.owner: dict[J, int] = {}          # assigned job -> slave
        self.events: dict[J, str] = {}         # accepted job -> its event
        self.assigned: dict[J, float] = {}     # assigned job -> when
        self.cancelled: set[J] = set()         # assigned jobs whose caller gave up
        self._next_slave = 1
        self.draining = False
        self.closed = False                    # the pool is stopping: decide nothing more
        self.broken_reason: str | None = None
        self.startup_failures = 0              # consecutive deaths before handshake
        self.next_spawn_at = 0.0               # backoff: no spawn before this time
        self.spawned = 0
        self.retired = 0
        self.recycled = 0                      # slaves worn out (quota or memory)

    # -- queries -------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.draining or self.closed:
            return "draining"
        return "broken" if self.broken_reason is not None else "running"

    @property
    def pending(self) -> int:
        """Jobs accepted and not yet answered (queued + on slaves)."""
        return len(self.queue) + len(self.owner)

    def next_deadline(self) -> float | None:
        times: list[float] = []
        if self.broken_reason is not None and not self._starting():
            times.append(self.next_spawn_at)
        if self._nothing_waits():  # else no retirement is due, however idle a slave
            times += [s.idle_since + self.idle_timeout
                      for s in self.slaves.values() if s.state == READY and not s.jobs]
        if self.due:
            times.append(next(iter(self.due.values())))
        return min(times) if times else None

    def info(self) -> dict[str, Any]:
        counts = {STARTING: 0, READY: 0, WORN: 0, RETIRING: 0, STOPPING: 0}
        for s in self.slaves.values():
            counts[s.state] += 1
        prefetched = self._prefetched()
        return {
            "state": self.state, "reason": self.broken_reason,
            "queue": len(self.queue) + prefetched, "prefetched": prefetched,
            "running": len(self.owner) - prefetched, "cancelling": len(self.cancelled),
            "slaves": len(self.slaves), **counts,
            "spawned": self.spawned, "retired": self.retired, "recycled": self.recycled,
            "timed_out": self.timed_out,
            "startup_failures": self.startup_failures, "prefetch": self.rule.info(),
        }

    # -- events --------------------------------------------------------------------
    def submit(self, job: J, now: float, event: str = "") -> list[Decision[J]]:
        """Accept a job or raise (QueueFull / ShuttingDown / AppBroken) without side effects."""
        if self.draining or self.closed:
            raise ShuttingDown("the app is draining and accepts no new jobs")
        if self.broken_reason is not None:
            raise AppBroken(f"{self.broken_reason}; next restart in "
                            f"{max(0.0, self.next_spawn_at - now):.1f}s")
        waiting = len(self.queue)
        if waiting < self.queue_limit and self.max_prefetch:
            waiting += self._prefetched()
        if waiting >= self.queue_limit and not self._free_slot():
            raise QueueFull(f"queue-limit {self.queue_limit} reached")
        self.queue.append(job)
        self.events[job] = event
        if self.request_timeout is not None:
            self.due[job] = now + self.request_timeout
        return self._step(now)

    def slave_ready(self, slave: int, concurrency: int, now: float) -> list[Decision[J]]:
        view = self.slaves[slave]
        if view.state == STARTING:
            view.state = READY
            view.concurrency = max(1, concurrency)
            view.idle_since = now
        self.startup_failures = 0
        self.broken_reason = None
        self.next_spawn_at = 0.0
        return self._step(now)

    def cancel(self, job: J, now: float) -> list[Decision[J]]:
        """The caller gave up on ``job``.  Queued: it leaves the queue, answered with
        JobCancelled.  On a slave: one Cancel decision.  Unknown or already
        cancelled/answered: nothing."""
        if job in self.owner:
            if job in self.cancelled:
                return []
            self.cancelled.add(job)
            self.due.pop(job, None)
            return [Cancel(job, self.owner[job])]
        try:
            self.queue.remove(job)  # O(queue), bounded by queue_limit
        except ValueError:
            return []
        del self.events[job]
        self.due.pop(job, None)
        return [Fail(job, JobCancelled("cancelled by its caller while queued")), *self._step(now)]

    def job_finished(self, job: J, now: float, *, answered: bool = True) -> list[Decision[J]]:
        """The job is done: answered by its slave (result, end of stream or error), or,
        with ``answered`` False, failed by the session because its slave died or was
        killed (which says nothing about how long jobs take)."""
        was_cancelled = job in self.cancelled
        self.cancelled.discard(job)
        if self.due:
            self.due.pop(job, None)
        slave = self.owner.pop(job, None)
        if slave is not None:
            view = self.slaves[slave]
            view.jobs.discard(job)
            assigned_at = self.assigned.pop(job)
            event = self.events.pop(job)
            n = view.held.pop(event) - 1
            if n:
                view.held[event] = n
            if answered and not was_cancelled:
                # It started no earlier than its assignment nor, on a busy slave, than
                # the slave's previous answer.
                self.rule.sample(event, now - max(assigned_at, view.last_done_at))
                view.last_done_at = now
            if not view.jobs:
                view.idle_since = now
            view.done += 1
            if view.quota and view.done >= view.quota:
                self._wear(view)
            return self._retire_if_worn(slave, view) + self._step(now)
        return self._step(now)

    def slave_worn(self, slave: int, now: float) -> list[Decision[J]]:
        """The slave should be replaced (the shell measured it over its memory limit):
        it finishes what it holds and is retired."""
        view = self.slaves.get(slave)
        if view is None:
            return self._step(now)
        self._wear(view)
        return self._retire_if_worn(slave, view) + self._step(now)

    def _wear(self, view: SlaveView[J]) -> None:
        if view.state == READY:
            view.state = WORN
            self.recycled += 1

    def _retire_if_worn(self, slave: int, view: SlaveView[J]) -> list[Decision[J]]:
        """A worn slave leaves once it has finished what it held (its place is then free
        for a fresh one, grown by _step if jobs wait)."""
        if view.state == WORN and not view.jobs and not self.closed:
            view.state = RETIRING
            return [Retire(slave)]
        return []

    def slave_gone(self, slave: int, now: float, *, handshaked: bool,
                   reason: str = "") -> list[Decision[J]]:
        """The slave's process was reaped. Jobs it still held fail (the shell normally
        failed them already through the session; this keeps the policy honest)."""
        view = self.slaves.pop(slave)
        out: list[Decision[J]] = []
        for job in sorted(view.jobs, key=repr):
            del self.owner[job]
            del self.assigned[job]
            del self.events[job]
            self.due.pop(job, None)
            if job in self.cancelled:  # its caller was answered already
                self.cancelled.discard(job)
                continue
            out.append(Fail(job, SlaveDied(f"slave went away: {reason}")))
        if view.state == RETIRING:
            self.retired += 1
        elif not handshaked:
            out += self._startup_failed(reason or "slave died before its handshake", now)
        return out + self._step(now)

    def slave_stopping(self, slave: int, now: float) -> list[Decision[J]]:
        """The slave will take no more jobs (being killed, or exiting on its own);
        it still counts against pool_limit until it is gone."""
        view = self.slaves.get(slave)
        if view is not None and view.state in (STARTING, READY, WORN):
            view.state = STOPPING
        return self._step(now)

    def tick(self, now: float) -> list[Decision[J]]:
        return self._step(now)

    def warm(self, now: float) -> list[Decision[J]]:
        """Start a slave though no job waits (a redeploy proves the new code runs before
        it takes requests); nothing if one is starting or ready already, or the pool
        cannot grow now."""
        if self.closed or self.broken_reason is not None or self._live() \
                or len(self.slaves) >= self.pool_limit or now < self.next_spawn_at:
            return []
        return [self._spawn(now)]

    def retire_all(self, now: float) -> list[Decision[J]]:
        """Retire every idle slave (shutdown path)."""
        out: list[Decision[J]] = []
        for sid, s in self.slaves.items():
            if s.state == READY and not s.jobs:
                s.state = RETIRING
                out.append(Retire(sid))
        return out

    def drain(self, now: float) -> list[Decision[J]]:
        self.draining = True
        return self._step(now)

    def close(self) -> None:
        """The pool is being torn down: no more spawns or assignments."""
        self.closed = True

    def fail_queued(self, error_type: type[RemoteError], message: str) -> list[Decision[J]]:
        out: list[Decision[J]] = [Fail(job, error_type(message)) for job in self.queue]
        for job in self.queue:
            del self.events[job]
            self.due.pop(job, None)
        self.queue.clear()
        return out

    # -- the one place decisions are made --------------------------------------------
    def _step(self, now: float) -> list[Decision[J]]:
        out: list[Decision[J]] = []
        if self.closed:
            return out
        # 0. answer the jobs whose request-timeout is due
        if self.due and next(iter(self.due.values())) <= now:
            self._expire(now, out)
        # 1. hand queued jobs to slaves with room, oldest job first (FIFO)
        while self.queue:
            slave = self._free_slave()
            if slave is None:
                break
            job = self.queue.popleft()
            view = self.slaves[slave]
            view.jobs.add(job)
            self.owner[job] = slave
            event = self.events[job]
            view.held[event] = view.held.get(event, 0) + 1
            self.assigned[job] = now
            out.append(Assign(job, slave))
        # 2. grow
        if self.broken_reason is not None:
            if now >= self.next_spawn_at and not self._starting() and len(self.slaves) < self.pool_limit:
                out.append(self._spawn(now))  # the probe
        elif now >= self.next_spawn_at and len(self.slaves) < self.pool_limit:
            waiting = len(self.queue) + (self._prefetched() if self.max_prefetch else 0)
            while (len(self.slaves) < self.pool_limit
                   and waiting > self.grow_threshold * self._live()):
                out.append(self._spawn(now))
        # 3. retire idle slaves, but only when nothing waits
        if self._nothing_waits():
            for sid, s in self.slaves.items():
                if s.state == READY and not s.jobs and now - s.idle_since >= self.idle_timeout:
                    s.state = RETIRING
                    out.append(Retire(sid))
        return out

    def _expire(self, now: float, out: list[Decision[J]]) -> None:
        """RequestTimeout for every job due by ``now``: queued ones leave the queue, those
        on a slave are cancelled there with that error (their slots wait for the slave)."""
        limit = self.request_timeout
        while self.due:
            job, at = next(iter(self.due.items()))
            if at > now:
                break
            del self.due[job]
            self.timed_out += 1
            slave = self.owner.get(job)
            if slave is None:
                self.queue.remove(job)  # O(queue), bounded by queue_limit; only on expiry
                del self.events[job]
                out.append(Fail(job, RequestTimeout(
                    f"not answered within request-timeout {limit:g}s (still queued)")))
            else:
                self.cancelled.add(job)
                out.append(Cancel(job, slave, RequestTimeout(
                    f"not answered within request-timeout {limit:g}s (its handler was "
                    f"asked to stop)")))

    def _free_slave(self) -> int | None:
        """The ready slave to give the next job: least loaded first, where load is jobs
        held minus concurrency, so a free slot anywhere wins over queueing behind a busy
        slave, which only happens where the prefetch rule allows; ties go to the most
        recently busy one, so the others stay idle and can be retired.  Runs per submit
        and per assignment: no allocation."""
        allows = self.rule.allows
        best: int | None = None
        best_load, best_since = 0, 0.0
        for sid, s in self.slaves.items():
            if s.state != READY:
                continue
            load = len(s.jobs) - s.concurrency
            if load >= 0 and not allows(load, s.held, s.concurrency):
                continue
            if best is None or load < best_load or (load == best_load and s.idle_since > best_since):
                best, best_load, best_since = sid, load, s.idle_since
        return best

    def _free_slot(self) -> bool:
        return any(s.state == READY and len(s.jobs) < s.concurrency for s in self.slaves.values())

    def _nothing_waits(self) -> bool:
        """No job queued, nor prefetched by a busy slave: retiring an idle slave while
        one is would be spawning again right after (prefetched jobs are demand)."""
        return not self.queue and not (self.max_prefetch and self._prefetched())

    def _prefetched(self) -> int:
        """Jobs held by slaves beyond what they run at once (waiting in a slave)."""
        extra = 0
        for s in self.slaves.values():
            over = len(s.jobs) - s.concurrency
            if over > 0 and s.state == READY:
                extra += over
        return extra

    def _starting(self) -> int:
        return sum(1 for s in self.slaves.values() if s.state == STARTING)

    def _live(self) -> int:
        return sum(1 for s in self.slaves.values() if s.state in (STARTING, READY))

    def _spawn(self, now: float) -> Spawn:
        sid = self._next_slave
        self._next_slave += 1
        quota = self.max_jobs + self._rng.randint(0, self.max_jobs // 10) if self.max_jobs else 0
        self.slaves[sid] = SlaveView(STARTING, now, concurrency=self.concurrency, idle_since=now,
                                     quota=quota)
        self.spawned += 1
        return Spawn(sid)

    def _startup_failed(self, reason: str, now: float) -> list[Decision[J]]:
        self.startup_failures += 1
        if self.startup_failures < self.restart_intensity:
            return []
        over = self.startup_failures - self.restart_intensity
        backoff = min(self.backoff_cap, self.backoff_base * 2 ** min(over, 32))
        self.next_spawn_at = now + backoff
        self.broken_reason = (f"{self.startup_failures} slaves in a row died before their "
                              f"handshake; last: {reason}")
        return self.fail_queued(AppBroken, self.broken_reason)
