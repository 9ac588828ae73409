"""PoolPolicy as a hypothesis state machine, plus a few pinned scenarios."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.errors import AppBroken, JobCancelled, QueueFull, RequestTimeout, ShuttingDown
from engine.pool.policy import READY, RETIRING, STARTING, Assign, Cancel, Fail, PoolPolicy, Retire, Spawn
from engine.pool.prefetch import AUTO_PREFETCH_MAX, PREFETCH_BUDGET


class PolicyMachine(RuleBasedStateMachine):
    """Plays the pool shell: carries out decisions and reports slave events."""

    @initialize(pool_limit=st.integers(1, 4), queue_limit=st.integers(0, 5),
                grow=st.integers(0, 3), concurrency=st.integers(1, 3),
                prefetch=st.sampled_from([0, 0, 1, 3, "auto", "auto"]),
                max_jobs=st.sampled_from([0, 0, 1, 3]), seed=st.integers(0, 3),
                request_timeout=st.sampled_from([None, None, 2.0, 5.0]))
    def setup(self, pool_limit, queue_limit, grow, concurrency, prefetch, max_jobs, seed,
              request_timeout):
        self.p = PoolPolicy(pool_limit=pool_limit, queue_limit=queue_limit, grow_threshold=grow,
                            idle_timeout=5.0, concurrency=concurrency, restart_intensity=2,
                            backoff_base=1.0, backoff_cap=8.0, prefetch=prefetch,
                            max_jobs=max_jobs, request_timeout=request_timeout,
                            rng=random.Random(seed))
        self.submitted_at: dict[int, float] = {}
        self.now = 0.0
        self.next_job = 1
        self.accepted: list[int] = []
        self.answered: Counter = Counter()
        self.assigned: list[int] = []          # in the order Assign decisions came
        self.on_slave: dict[int, set] = {}     # slave -> jobs it runs (model of sessions)
        self.order_on_slave: dict[int, list] = {}  # slave -> its jobs in assignment order
        self.handshaked: set[int] = set()
        self.retiring: set[int] = set()
        self.cancel_answered: set[int] = set()  # running jobs whose caller got JobCancelled

    def apply(self, decisions):
        for d in decisions:
            if isinstance(d, Spawn):
                assert d.slave not in self.on_slave
                self.on_slave[d.slave] = set()
                self.order_on_slave[d.slave] = []
                if self.p.broken_reason is not None:  # a probe: only one at a time
                    others = [s for s, v in self.p.slaves.items()
                              if v.state == STARTING and s != d.slave]
                    assert not others, others
            elif isinstance(d, Assign):
                assert d.slave in self.handshaked and d.slave not in self.retiring
                held, concurrency = len(self.on_slave[d.slave]), self.p.slaves[d.slave].concurrency
                assert held < concurrency + self.p.max_prefetch, (held, self.p.max_prefetch)
                if held >= concurrency:  # prefetched: only when no slave has a free slot
                    for other, jobs in self.on_slave.items():
                        view = self.p.slaves[other]
                        if view.state in (READY, RETIRING) and other not in self.retiring:
                            assert len(jobs) >= view.concurrency, (other, jobs)
                    if self.p.prefetch == "auto":  # only behind jobs known to be quick
                        estimates = [self.p.rule.estimate(self.event_of(j))
                                     for j in self.on_slave[d.slave]]
                        assert None not in estimates, estimates
                        assert sum(estimates) <= PREFETCH_BUDGET * concurrency + 1e-12
                self.on_slave[d.slave].add(d.job)
                self.order_on_slave[d.slave].append(d.job)
                self.assigned.append(d.job)
            elif isinstance(d, Retire):
                assert not self.on_slave[d.slave]
                self.retiring.add(d.slave)
            elif isinstance(d, Fail):
                self.answered[d.job] += 1
            elif isinstance(d, Cancel):
                assert d.job in self.on_slave[d.slave], d  # only a job that slave holds
                if d.error is not None:                    # only its request-timeout
                    assert isinstance(d.error, RequestTimeout)
                    assert self.now - self.submitted_at[d.job] >= self.p.request_timeout
                assert d.job not in self.cancel_answered   # one Cancel per job
                self.cancel_answered.add(d.job)
                self.answered[d.job] += 1                  # the shell answers the caller now

    def slave_done_with(self, job):
        """The slave answered (or the session failed) ``job``; its caller hears of it
        unless it was answered at cancel time."""
        if job not in self.cancel_answered:
            self.answered[job] += 1

    @rule(n=st.integers(1, 4))
    def submit(self, n):
        """``n`` jobs arrive at the same instant (bursts are what fill slaves up)."""
        for _ in range(n):
            self.submit_one()

    def submit_one(self):
        job = self.next_job
        self.next_job += 1
        waiting_before = len(self.p.queue) + self.p._prefetched()
        try:
            self.submitted_at[job] = self.now
            self.apply(self.p.submit(job, self.now, self.event_of(job)))
            self.accepted.append(job)
        except QueueFull:  # queued and prefetched jobs count against queue_limit
            assert waiting_before >= self.p.queue_limit
        except ShuttingDown:
            assert self.p.draining
        except AppBroken:
            assert self.p.broken_reason is not None

    # Rules that need something to act on say so in a precondition, so that steps are
    # not wasted and runs reach slaves holding prefetched jobs.
    @precondition(lambda self: any(v.state == STARTING for v in self.p.slaves.values()))
    @rule(data=st.data())
    def handshake(self, data):
        starting = sorted(s for s, v in self.p.slaves.items() if v.state == STARTING)
        slave = data.draw(st.sampled_from(starting))
        # the handshake may lower the concurrency, so slaves of one pool can differ
        concurrency = data.draw(st.integers(1, self.p.concurrency))
        self.handshaked.add(slave)
        self.apply(self.p.slave_ready(slave, concurrency, self.now))

    @precondition(lambda self: any(v.state == READY for v in self.p.slaves.values()))
    @rule(data=st.data())
    def too_large(self, data):
        """The shell measured a slave over max-rss-per-slave: it is worn."""
        ready = sorted(s for s, v in self.p.slaves.items() if v.state == READY)
        self.apply(self.p.slave_worn(data.draw(st.sampled_from(ready)), self.now))

    @staticmethod
    def event_of(job):
        """Jobs of three events, so estimates differ between them (and "c" is often
        still unknown)."""
        return "abc"[job % 3]

    def finish(self, job, answered=True):
        """``job`` leaves its slave: answered by it, or failed because it died."""
        for slave, jobs in self.on_slave.items():
            if job in jobs:
                jobs.discard(job)
                self.order_on_slave[slave].remove(job)
        self.slave_done_with(job)
        before = dict(self.p.rule.service)
        sampled = answered and job not in self.p.cancelled
        self.apply(self.p.job_finished(job, self.now, answered=answered))
        if not sampled:  # cancelled jobs and slave deaths say nothing about job duration
            assert self.p.rule.service == before

    @precondition(lambda self: any(self.on_slave.values()))
    @rule(data=st.data())
    def finish_job(self, data):
        running = sorted(j for jobs in self.on_slave.values() for j in jobs)
        self.finish(data.draw(st.sampled_from(running)))

    @precondition(lambda self: any(self.on_slave.values()))
    @rule(data=st.data(), service=st.sampled_from([0.0001, 0.0005, 0.003, 0.05]))
    def finish_after(self, data, service):
        """A slave answers its oldest job ``service`` seconds from now, so the service
        time estimates (and with them what auto prefetches) move both ways."""
        busy = sorted(s for s, jobs in self.order_on_slave.items() if jobs)
        slave = data.draw(st.sampled_from(busy))
        self.now += service
        self.finish(self.order_on_slave[slave][0])

    @precondition(lambda self: self.on_slave)
    @rule(data=st.data())
    def slave_dies(self, data):
        slave = data.draw(st.sampled_from(sorted(self.on_slave)))
        self.apply(self.p.slave_stopping(slave, self.now))
        for job in sorted(self.on_slave[slave]):  # the session fails what it held
            self.finish(job, answered=False)
        del self.on_slave[slave]
        del self.order_on_slave[slave]
        self.apply(self.p.slave_gone(slave, self.now, handshaked=slave in self.handshaked,
                                     reason="test"))
        self.retiring.discard(slave)

    @precondition(lambda self: self.accepted)
    @rule(data=st.data())
    def cancel(self, data):
        """A caller gives up on any job it submitted: queued, running or answered."""
        job = data.draw(st.sampled_from(self.accepted))
        was_queued = job in self.p.queue
        out = self.p.cancel(job, self.now)
        if was_queued:
            assert isinstance(out[0], Fail) and isinstance(out[0].error, JobCancelled)
            assert job not in self.p.queue
        self.apply(out)

    @rule(dt=st.sampled_from([0.1, 1.0, 3.0, 6.0]))
    def advance(self, dt):
        self.now += dt
        self.apply(self.p.tick(self.now))
        if self.p.request_timeout is not None:  # every job past its timeout is answered
            late = [j for j in self.accepted if not self.answered[j]
                    and self.now - self.submitted_at[j] >= self.p.request_timeout]
            assert not late, late

    # Drain only once some jobs came in: an early drain refuses every later submit and
    # would end most runs before slaves hold (prefetched) jobs.
    @precondition(lambda self: not self.p.draining and len(self.accepted) >= 6)
    @rule()
    def drain(self):
        self.apply(self.p.drain(self.now))

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def bounded(self):
        assert len(self.p.slaves) <= self.p.pool_limit
        assert len(self.p.queue) <= self.p.queue_limit
        assert set(self.p.slaves) == set(self.on_slave)

    @invariant()
    def a_slave_never_holds_more_than_concurrency_plus_max_depth(self):
        max_depth = AUTO_PREFETCH_MAX if self.p.prefetch == "auto" else self.p.prefetch
        assert self.p.max_prefetch == max_depth
        for slave, jobs in self.on_slave.items():
            assert len(jobs) <= self.p.concurrency + max_depth, (slave, jobs)
            assert self.p.slaves[slave].jobs == jobs

    @invariant()
    def each_slaves_books_add_up(self):
        p = self.p
        assert set(p.assigned) == set(p.owner)
        assert set(p.events) == set(p.owner) | set(p.queue)
        for view in p.slaves.values():
            assert view.held == dict(Counter(self.event_of(j) for j in view.jobs))

    @invariant()
    def every_job_in_exactly_one_place(self):
        assert all(n == 1 for n in self.answered.values()), self.answered
        for job in self.accepted:
            running = job in self.p.owner and job not in self.cancel_answered
            places = (job in self.p.queue) + running + (self.answered[job] == 1)
            assert places == 1, job
        # a cancelled job keeps its slave's slot until the slave is done with it
        assert self.p.cancelled == self.cancel_answered & set(self.p.owner)

    @invariant()
    def request_deadlines_are_kept_for_unanswered_jobs_only(self):
        p = self.p
        if p.request_timeout is None:
            assert not p.due
            return
        assert set(p.due) == set(p.events) - p.cancelled
        times = list(p.due.values())
        assert times == sorted(times)   # the next one due is the first

    @invariant()
    def fifo(self):
        assert self.assigned == sorted(self.assigned)
        if self.p.queue and self.assigned:  # nothing assigned ever overtook a waiting job
            assert self.p.queue[0] > max(self.assigned)
        assert list(self.p.queue) == sorted(self.p.queue)

    @invariant()
    def no_idle_slave_while_jobs_wait(self):
        if self.p.queue:
            for v in self.p.slaves.values():
                queued = len(v.jobs) - v.concurrency
                assert not (v.state == READY and (queued < 0 or self.p.rule.allows(
                    queued, v.held, v.concurrency)))

    @invariant()
    def grows_while_there_is_demand(self):
        p = self.p
        if p.queue and p.broken_reason is None and self.now >= p.next_spawn_at:
            live = sum(1 for v in p.slaves.values() if v.state in (STARTING, READY))
            assert len(p.slaves) == p.pool_limit or len(p.queue) <= p.grow_threshold * live
        if p.prefetch and p.broken_reason is None and self.now >= p.next_spawn_at:
            # jobs prefetched by a slave (beyond what it runs) are demand like queued ones
            live = sum(1 for v in p.slaves.values() if v.state in (STARTING, READY))
            held_over = sum(max(0, len(v.jobs) - v.concurrency)
                            for v in p.slaves.values() if v.state == READY)
            waiting = len(p.queue) + held_over
            assert len(p.slaves) == p.pool_limit or waiting <= p.grow_threshold * live

    @invariant()
    def broken_means_nothing_waits(self):
        if self.p.broken_reason is not None:
            assert not self.p.queue


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)


def test_broken_after_restart_intensity_with_exponential_capped_backoff():
    p = PoolPolicy(pool_limit=2, queue_limit=5, restart_intensity=3, backoff_base=1.0,
                   backoff_cap=4.0)
    assert p.submit("a", 0.0) == [Spawn(1)]
    now, spawns = 0.0, []
    for i in range(1, 7):
        (slave,) = p.slaves
        out = p.slave_gone(slave, now, handshaked=False, reason="ImportError: x")
        if i < 3:
            assert out == [Spawn(slave + 1)]  # the job still waits: respawn at once
            continue
        if i == 3:
            assert out[0] == Fail("a", out[0].error) and isinstance(out[0].error, AppBroken)
            with pytest.raises(AppBroken, match="ImportError"):
                p.submit("b", now)
        assert p.state == "broken" and not any(isinstance(d, Spawn) for d in out)
        wait = p.next_deadline() - now
        spawns.append(wait)
        now += wait
        assert p.tick(now - 0.01) == []
        (probe,) = p.tick(now)
        assert isinstance(probe, Spawn)
    assert spawns == [1.0, 2.0, 4.0, 4.0]
    assert p.slave_ready(probe.slave, 1, now) == [] and p.state == "running"
    assert p.submit("c", now) == [Assign("c", probe.slave)]


def test_idle_slaves_retire_after_idle_timeout_only_when_nothing_waits():
    p = PoolPolicy(pool_limit=2, queue_limit=5, idle_timeout=10.0)
    assert p.submit(1, 0.0) == [Spawn(1)]
    assert p.slave_ready(1, 1, 1.0) == [Assign(1, 1)]
    assert p.job_finished(1, 2.0) == []
    assert p.next_deadline() == 12.0
    assert p.tick(11.9) == []
    assert p.tick(12.0) == [Retire(1)]
    assert p.submit(2, 12.5) == [Spawn(2)]  # a retiring slave takes no work
    p.slave_gone(1, 13.0, handshaked=True)
    assert p.info()["retired"] == 1 and p.info()["startup_failures"] == 0


def test_no_slave_retires_while_jobs_prefetched_by_another_wait():
    # Found by the state machine (CI, 2026-11-29): slave 2 came up after slave 1 had
    # prefetched the jobs, sat idle, and was retired while two of them still waited.
    p = PoolPolicy(pool_limit=3, queue_limit=2, grow_threshold=1, idle_timeout=5.0,
                   prefetch=3)
    assert p.submit(1, 0.0) == [Spawn(1)]
    assert p.submit(2, 0.0) == [Spawn(2)]
    assert p.slave_ready(1, 1, 0.0) == [Assign(1, 1), Assign(2, 1)]
    assert p.submit(3, 0.0) == [Assign(3, 1)]
    assert p.slave_ready(2, 1, 0.0) == []                # they stay on slave 1
    assert p.tick(6.0) == []                             # two of them still wait there
    assert p.next_deadline() is None                     # so no retirement is due either
    assert p.job_finished(1, 7.0) == []                  # one still does
    assert p.job_finished(2, 7.5) == [Retire(2)]         # none: slave 2 idle since 0.0


def test_grow_threshold_spawns_per_queued_jobs():
    p = PoolPolicy(pool_limit=10, queue_limit=100, grow_threshold=2)
    spawned = [d for i in range(7) for d in p.submit(i, 0.0) if isinstance(d, Spawn)]
    assert len(spawned) == 4  # 7 queued > 2 * 3 slaves -> a fourth


def test_cancel_queued_running_and_answered_jobs():
    p = PoolPolicy(pool_limit=1, queue_limit=5)
    assert p.submit(1, 0.0) == [Spawn(1)]
    p.submit(2, 0.0)
    p.submit(3, 0.0)
    assert p.slave_ready(1, 1, 0.5) == [Assign(1, 1)]
    [fail] = p.cancel(2, 1.0)                       # queued: leaves the queue, answered
    assert fail.job == 2 and isinstance(fail.error, JobCancelled)
    assert list(p.queue) == [3] and p.cancel(2, 1.0) == []
    assert p.cancel(1, 1.0) == [Cancel(1, 1)]       # running: once
    assert p.cancel(1, 1.1) == [] and p.info()["cancelling"] == 1
    assert p.submit(4, 1.2) == []                   # the slot stays taken until the slave is done
    assert p.job_finished(1, 2.0) == [Assign(3, 1)] and p.info()["cancelling"] == 0
    assert p.cancel(1, 2.0) == []                   # answered: nothing
    assert p.cancel(3, 2.0) == [Cancel(3, 1)]
    assert p.slave_gone(1, 3.0, handshaked=True) == [Spawn(2)]  # no second answer for job 3
    assert p.cancelled == set() and list(p.queue) == [4]


def test_prefetch_hands_a_slave_concurrency_plus_prefetch_jobs_and_they_count_as_demand():
    p = PoolPolicy(pool_limit=2, queue_limit=3, concurrency=1, prefetch=2)
    assert p.submit(1, 0.0) == [Spawn(1)]
    assert p.slave_ready(1, 1, 0.1) == [Assign(1, 1)]
    assert p.submit(2, 0.2) == [Assign(2, 1)]            # prefetched: it waits in slave 1
    assert p.submit(3, 0.3) == [Assign(3, 1), Spawn(2)]  # capacity 1 + 2 reached; 2 waiting > 1
    assert p.submit(4, 0.4) == []                        # queued here: 3 waiting in all
    with pytest.raises(QueueFull):                       # prefetched ones count: limit 3 reached
        p.submit(5, 0.5)
    assert p.slaves[1].jobs == {1, 2, 3} and list(p.queue) == [4]
    assert p.cancel(2, 0.6) == [Cancel(2, 1)]            # a prefetched job is cancelled on its slave
    assert p.job_finished(1, 0.7) == [Assign(4, 1)]
    assert p.job_finished(2, 0.8) == []                  # the slave acknowledged the cancel
    assert p.slave_ready(2, 1, 0.9) == []                # jobs already on slave 1 stay there
    assert p.submit(6, 1.0) == [Assign(6, 2)]            # the least loaded slave first


def test_prefetch_must_not_be_negative():
    with pytest.raises(ValueError):
        PoolPolicy(pool_limit=1, queue_limit=1, prefetch=-1)


def test_prefetch_setting_must_be_auto_or_a_non_negative_int():
    for bad in ("fast", True, 1.5, None):
        with pytest.raises(ValueError):
            PoolPolicy(pool_limit=1, queue_limit=1, prefetch=bad)
    assert PoolPolicy(pool_limit=1, queue_limit=1, prefetch="auto").max_prefetch == AUTO_PREFETCH_MAX


# -- auto prefetch: only behind jobs expected to be done within the budget -----------------

def one_ready_slave(**kw) -> PoolPolicy:
    p = PoolPolicy(pool_limit=1, queue_limit=100, concurrency=1, prefetch="auto", **kw)
    assert p.submit(0, 0.0, "echo") == [Spawn(1)]
    assert p.slave_ready(1, 1, 0.0) == [Assign(0, 1)]
    return p


def test_auto_prefetch_waits_for_an_estimate_then_fills_a_slave_with_quick_jobs():
    p = one_ready_slave()
    assert p.info()["prefetch"] == {"mode": "auto", "max": 16, "service_ms": {}}
    assert p.submit(1, 0.0, "echo") == []                # nothing measured yet: it waits here
    assert p.job_finished(0, 0.0001) == [Assign(1, 1)]    # echo: 0.1 ms
    assert p.info()["prefetch"]["service_ms"] == {"echo": 0.1}
    assert p.submit(2, 0.0001, "echo") == [Assign(2, 1)]  # a busy slave gets a second job
    for job in range(3, 18):
        assert p.submit(job, 0.0001, "echo") == [Assign(job, 1)]
    assert len(p.slaves[1].jobs) == 1 + AUTO_PREFETCH_MAX
    assert p.submit(18, 0.0001, "echo") == []             # 16 beyond concurrency: no more
    info = p.info()
    assert (info["queue"], info["prefetched"], info["running"]) == (17, 16, 1)


def test_nothing_is_queued_behind_a_slow_or_unknown_event():
    p = one_ready_slave()
    p.job_finished(0, 0.0001)                             # echo is quick
    assert p.submit(1, 1.0, "spin") == [Assign(1, 1)]     # never answered yet: unknown
    assert p.submit(2, 1.0, "echo") == []                 # not behind the unknown spin
    assert list(p.queue) == [2]
    p = one_ready_slave()
    p.job_finished(0, 0.0001)
    p.submit(1, 1.0, "report")
    p.job_finished(1, 1.05)                               # report: 50 ms
    assert p.submit(2, 2.0, "report") == [Assign(2, 1)]
    assert p.submit(3, 2.0, "echo") == []                 # behind 50 ms of work: waits here
    assert p.job_finished(2, 2.05) == [Assign(3, 1)]
    assert p.submit(4, 2.05, "echo") == [Assign(4, 1)]    # behind a quick echo: prefetched


def test_a_slave_holding_a_job_that_turned_slow_gets_no_more():
    p = one_ready_slave()
    p.job_finished(0, 0.0001)
    for job in range(1, 6):
        p.submit(job, 0.0001, "echo")
    assert p.slaves[1].jobs == {1, 2, 3, 4, 5}
    assert p.job_finished(1, 0.06) == []       # that echo took 60 ms: 4 echoes now look slow
    assert p.rule.estimate("echo") > 0.002 and p.slaves[1].jobs == {2, 3, 4, 5}
    assert p.submit(6, 0.06, "echo") == []     # held jobs stay; no new ones behind them
    assert list(p.queue) == [6]


def test_service_time_starts_at_assignment_or_at_the_slaves_previous_answer():
    p = one_ready_slave()
    p.job_finished(0, 0.0001)
    assert p.submit(1, 1.0, "echo") == [Assign(1, 1)] and p.submit(2, 1.0, "echo") == [Assign(2, 1)]
    p.job_finished(1, 1.0001)
    p.job_finished(2, 1.0002)    # it waited behind job 1: it ran 0.1 ms, not 0.2 ms
    assert p.rule.estimate("echo") == pytest.approx(0.0001)


def test_cancelled_jobs_and_slave_deaths_are_not_service_time_samples():
    p = one_ready_slave()
    assert p.cancel(0, 1.0) == [Cancel(0, 1)]
    p.job_finished(0, 1.0)                         # the slave acknowledged the cancel
    p.submit(1, 1.0, "echo")
    p.job_finished(1, 9.0, answered=False)         # failed by the session: the slave died
    assert p.rule.service == {}
    p.submit(2, 9.0, "echo")
    p.job_finished(2, 9.0001)
    assert p.rule.estimate("echo") == pytest.approx(0.0001)


def test_an_idle_slave_gets_a_job_before_a_busy_one_gets_a_prefetched_one():
    p = PoolPolicy(pool_limit=2, queue_limit=100, concurrency=2, prefetch="auto")
    p.submit(0, 0.0)
    p.slave_ready(1, 1, 0.0)                        # slave 1 runs one job at a time
    p.job_finished(0, 0.0001)                       # quick jobs
    assert p.submit(1, 1.0) == [Assign(1, 1)]
    assert p.submit(2, 1.0) == [Assign(2, 1)]             # prefetched (no other slave yet)
    assert p.submit(3, 1.0) == [Assign(3, 1), Spawn(2)]   # 2 prefetched count as waiting
    assert p.slave_ready(2, 2, 1.0) == []                 # held jobs stay on slave 1
    assert p.submit(4, 1.1) == [Assign(4, 2)]             # the idle slave, not a busy one
    assert p.submit(5, 1.1) == [Assign(5, 2)]             # slave 2's second slot is free
    assert p.submit(6, 1.1) == [Assign(6, 2)]             # both busy: least prefetched first
    assert p.submit(7, 1.1) == [Assign(7, 2)]
    assert p.slaves[1].jobs == {1, 2, 3} and p.slaves[2].jobs == {4, 5, 6, 7}


def test_prefetched_jobs_count_against_the_queue_limit():
    p = PoolPolicy(pool_limit=1, queue_limit=2, concurrency=1, prefetch="auto")
    p.submit(0, 0.0)
    p.slave_ready(1, 1, 0.0)
    p.job_finished(0, 0.0001)
    assert p.submit(1, 1.0) == [Assign(1, 1)]             # runs
    assert p.submit(2, 1.0) == [Assign(2, 1)]             # prefetched: waiting 1
    assert p.submit(3, 1.0) == [Assign(3, 1)]             # prefetched: waiting 2
    with pytest.raises(QueueFull):                        # as many accepted as without prefetch
        p.submit(4, 1.0)


def test_a_fixed_prefetch_ignores_the_measured_service_time():
    p = PoolPolicy(pool_limit=1, queue_limit=100, concurrency=1, prefetch=2)
    p.submit(0, 0.0)
    p.slave_ready(1, 1, 0.0)
    p.job_finished(0, 5.0)                          # a slow job: auto would stop prefetching
    assert [p.submit(job, 5.0) for job in (1, 2, 3, 4)] == [
        [Assign(1, 1)], [Assign(2, 1)], [Assign(3, 1)], []]
    assert p.info()["prefetch"] == {"mode": "fixed", "max": 2, "service_ms": {"": 5000.0}}
    p = PoolPolicy(pool_limit=1, queue_limit=100, concurrency=1, prefetch=0)
    p.submit(0, 0.0)
    p.slave_ready(1, 1, 0.0)
    p.job_finished(0, 0.0001)                       # a short job: still no prefetch
    assert p.submit(1, 0.0001) == [Assign(1, 1)] and p.submit(2, 0.0001) == []


def test_a_free_slot_beats_a_prefetch_when_slaves_differ_in_concurrency():
    p = PoolPolicy(pool_limit=2, queue_limit=100, grow_threshold=0, concurrency=2, prefetch="auto")
    assert p.submit(0, 0.0) == [Spawn(1), Spawn(2)]
    assert p.slave_ready(1, 1, 0.0) == [Assign(0, 1)]   # its handshake lowered it to 1
    assert p.slave_ready(2, 2, 0.0) == []
    p.job_finished(0, 0.0001)                           # quick; slave 1 was busy last
    assert p.submit(1, 1.0) == [Assign(1, 2)]           # two free slots beat one
    assert p.submit(2, 1.0) == [Assign(2, 1)]           # one each: the most recently busy
    assert p.submit(3, 1.0) == [Assign(3, 2)]           # slave 2's free slot, not a prefetch on 1
    assert p.submit(4, 1.0) == [Assign(4, 1)]           # both full: now prefetch, evenly


def test_a_slave_past_its_job_quota_finishes_what_it_holds_then_is_replaced():
    """#17 recycling: no job fails, none waits for more than the replacement's start."""
    p = PoolPolicy(pool_limit=1, queue_limit=10, concurrency=1, max_jobs=2, rng=random.Random(0))
    assert p.submit(1, 0.0) == [Spawn(1)]
    assert p.slave_ready(1, 1, 0.0) == [Assign(1, 1)]
    assert p.submit(2, 0.0) == [] and p.submit(3, 0.0) == []
    assert p.job_finished(1, 0.1) == [Assign(2, 1)]
    assert p.job_finished(2, 0.2) == [Retire(1)]            # worn: its quota (2) is done
    assert p.slave_gone(1, 0.3, handshaked=True) == [Spawn(2)]
    assert p.slave_ready(2, 1, 0.4) == [Assign(3, 2)]
    assert p.info()["recycled"] == 1 and p.retired == 1


def test_a_worn_slave_is_not_capacity_so_waiting_jobs_grow_a_replacement_at_once():
    p = PoolPolicy(pool_limit=2, queue_limit=10, concurrency=1, rng=random.Random(0))
    assert p.submit(1, 0.0) == [Spawn(1)]
    assert p.slave_ready(1, 1, 0.0) == [Assign(1, 1)]
    assert p.slave_worn(1, 0.1) == []                          # (still running job 1)
    assert p.submit(2, 0.2) == [Spawn(2)]                      # not queued behind it
    assert p.job_finished(1, 0.3) == [Retire(1)]
    assert p.info()["worn"] == 0 and p.info()["retiring"] == 1


def test_quotas_have_up_to_ten_percent_jitter_so_slaves_do_not_leave_together():
    p = PoolPolicy(pool_limit=20, queue_limit=100, grow_threshold=0, max_jobs=100,
                   rng=random.Random(1))
    for job in range(20):
        p.submit(job, 0.0)
    quotas = {v.quota for v in p.slaves.values()}
    assert len(p.slaves) == 20 and min(quotas) >= 100 and max(quotas) <= 110 and len(quotas) > 3


def test_request_timeout_answers_queued_and_running_jobs_once_and_keeps_the_slot():
    p = PoolPolicy(pool_limit=1, queue_limit=5, request_timeout=2.0)
    [spawn] = p.submit(1, 0.0)
    assert isinstance(spawn, Spawn)
    [assign] = p.slave_ready(spawn.slave, 1, 0.5)
    assert assign == Assign(1, spawn.slave)
    assert p.submit(2, 1.0) == []                  # queued behind job 1
    assert p.next_deadline() == 2.0                # job 1's request-timeout is due first
    assert p.tick(1.9) == []
    [cancel] = p.tick(2.0)
    assert isinstance(cancel, Cancel) and cancel.job == 1
    assert isinstance(cancel.error, RequestTimeout) and "request-timeout 2s" in str(cancel.error)
    assert p.next_deadline() == 3.0
    assert p.cancel(1, 2.5) == []                  # its caller gave up too late: nothing more
    [fail] = p.tick(3.0)                           # job 2 never left the queue
    assert isinstance(fail, Fail) and fail.job == 2 and isinstance(fail.error, RequestTimeout)
    assert "still queued" in str(fail.error) and not p.queue
    assert p.info()["timed_out"] == 2
    assert p.owner == {1: spawn.slave}             # the slot waits for the slave to stop job 1
    assert p.submit(3, 3.1) == []
    assert p.job_finished(1, 3.2) == [Assign(3, spawn.slave)]


def test_a_request_timeout_must_be_positive():
    with pytest.raises(ValueError):
        PoolPolicy(pool_limit=1, queue_limit=1, request_timeout=0)
