"""PoolPolicy as a hypothesis state machine, plus a few pinned scenarios."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.errors import AppBroken, JobCancelled, QueueFull, ShuttingDown
from engine.policy import READY, STARTING, Assign, Cancel, Fail, PoolPolicy, Retire, Spawn


class PolicyMachine(RuleBasedStateMachine):
    """Plays the pool shell: carries out decisions and reports slave events."""

    @initialize(pool_limit=st.integers(1, 4), queue_limit=st.integers(0, 5),
                grow=st.integers(0, 3), concurrency=st.integers(1, 3),
                prefetch=st.sampled_from([0, 0, 1, 3]))
    def setup(self, pool_limit, queue_limit, grow, concurrency, prefetch):
        self.p = PoolPolicy(pool_limit=pool_limit, queue_limit=queue_limit, grow_threshold=grow,
                            idle_timeout=5.0, concurrency=concurrency, restart_intensity=2,
                            backoff_base=1.0, backoff_cap=8.0, prefetch=prefetch)
        self.now = 0.0
        self.next_job = 1
        self.accepted: list[int] = []
        self.answered: Counter = Counter()
        self.assigned: list[int] = []          # in the order Assign decisions came
        self.on_slave: dict[int, set] = {}     # slave -> jobs it runs (model of sessions)
        self.handshaked: set[int] = set()
        self.retiring: set[int] = set()
        self.cancel_answered: set[int] = set()  # running jobs whose caller got JobCancelled

    def apply(self, decisions):
        for d in decisions:
            if isinstance(d, Spawn):
                assert d.slave not in self.on_slave
                self.on_slave[d.slave] = set()
                if self.p.broken_reason is not None:  # a probe: only one at a time
                    others = [s for s, v in self.p.slaves.items()
                              if v.state == STARTING and s != d.slave]
                    assert not others, others
            elif isinstance(d, Assign):
                assert d.slave in self.handshaked and d.slave not in self.retiring
                self.on_slave[d.slave].add(d.job)
                self.assigned.append(d.job)
            elif isinstance(d, Retire):
                assert not self.on_slave[d.slave]
                self.retiring.add(d.slave)
            elif isinstance(d, Fail):
                self.answered[d.job] += 1
            elif isinstance(d, Cancel):
                assert d.job in self.on_slave[d.slave], d  # only a job that slave holds
                assert d.job not in self.cancel_answered   # one Cancel per job
                self.cancel_answered.add(d.job)
                self.answered[d.job] += 1                  # the shell answers the caller now

    def slave_done_with(self, job):
        """The slave answered (or the session failed) ``job``; its caller hears of it
        unless it was answered at cancel time."""
        if job not in self.cancel_answered:
            self.answered[job] += 1

    @rule()
    def submit(self):
        job = self.next_job
        self.next_job += 1
        queued_before = len(self.p.queue)
        try:
            self.apply(self.p.submit(job, self.now))
            self.accepted.append(job)
        except QueueFull:
            assert queued_before >= self.p.queue_limit
        except ShuttingDown:
            assert self.p.draining
        except AppBroken:
            assert self.p.broken_reason is not None

    @rule(data=st.data())
    def handshake(self, data):
        starting = sorted(s for s, v in self.p.slaves.items() if v.state == STARTING)
        if starting:
            slave = data.draw(st.sampled_from(starting))
            self.handshaked.add(slave)
            self.apply(self.p.slave_ready(slave, self.p.concurrency, self.now))

    @rule(data=st.data())
    def finish_job(self, data):
        running = sorted(j for jobs in self.on_slave.values() for j in jobs)
        if running:
            job = data.draw(st.sampled_from(running))
            for jobs in self.on_slave.values():
                jobs.discard(job)
            self.slave_done_with(job)
            self.apply(self.p.job_finished(job, self.now))

    @rule(data=st.data())
    def slave_dies(self, data):
        if self.on_slave:
            slave = data.draw(st.sampled_from(sorted(self.on_slave)))
            self.apply(self.p.slave_stopping(slave, self.now))
            for job in sorted(self.on_slave[slave]):  # the session fails what it held
                self.slave_done_with(job)
                self.apply(self.p.job_finished(job, self.now))
            del self.on_slave[slave]
            self.apply(self.p.slave_gone(slave, self.now, handshaked=slave in self.handshaked,
                                         reason="test"))
            self.retiring.discard(slave)

    @rule(data=st.data())
    def cancel(self, data):
        """A caller gives up on any job it submitted: queued, running or answered."""
        if self.accepted:
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

    @precondition(lambda self: not self.p.draining)
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
    def a_slave_never_holds_more_than_concurrency_plus_prefetch(self):
        for slave, jobs in self.on_slave.items():
            assert len(jobs) <= self.p.concurrency + self.p.prefetch, (slave, jobs)
            assert self.p.slaves[slave].jobs == jobs

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
    def fifo(self):
        assert self.assigned == sorted(self.assigned)
        if self.p.queue and self.assigned:  # nothing assigned ever overtook a waiting job
            assert self.p.queue[0] > max(self.assigned)
        assert list(self.p.queue) == sorted(self.p.queue)

    @invariant()
    def no_idle_slave_while_jobs_wait(self):
        if self.p.queue:
            for v in self.p.slaves.values():
                assert not (v.state == READY and len(v.jobs) < v.capacity)

    @invariant()
    def grows_while_there_is_demand(self):
        p = self.p
        if p.queue and p.broken_reason is None and self.now >= p.next_spawn_at:
            live = sum(1 for v in p.slaves.values() if v.state in (STARTING, READY))
            assert len(p.slaves) == p.pool_limit or len(p.queue) <= p.grow_threshold * live
        if p.prefetch and p.broken_reason is None and self.now >= p.next_spawn_at:
            # jobs prefetched by a slave (beyond what it runs) are demand like queued ones
            live = sum(1 for v in p.slaves.values() if v.state in (STARTING, READY))
            held_over = sum(max(0, len(v.jobs) - p.concurrency)
                            for v in p.slaves.values() if v.state == READY)
            waiting = len(p.queue) + held_over
            assert len(p.slaves) == p.pool_limit or waiting <= p.grow_threshold * live

    @invariant()
    def broken_means_nothing_waits(self):
        if self.p.broken_reason is not None:
            assert not self.p.queue


TestPolicyMachine = PolicyMachine.TestCase
TestPolicyMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


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
    p = PoolPolicy(pool_limit=2, queue_limit=1, concurrency=1, prefetch=2)
    assert p.submit(1, 0.0) == [Spawn(1)]
    assert p.slave_ready(1, 1, 0.1) == [Assign(1, 1)]
    assert p.submit(2, 0.2) == [Assign(2, 1)]            # prefetched: it waits in slave 1
    assert p.submit(3, 0.3) == [Assign(3, 1), Spawn(2)]  # capacity 1 + 2 reached; 2 waiting > 1
    assert p.submit(4, 0.4) == []                        # queued here (queue-limit 1)
    with pytest.raises(QueueFull):
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
