"""The pool package's seams, in process (no slaves): a Job talks to its owner only
through :class:`engine.pool.job.JobOwner`; every policy decision is in the
:data:`engine.pool.policy.Decision` union and the process pool carries out each of
them (``make lint`` checks the same statically: the ``match`` in ``SlavePool._apply``
ends in ``assert_never``); both backends report their load the same way."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args, get_origin

import pytest

from engine.errors import JobCancelled, SlaveDied
from engine.manifest import EngineConfig
from engine.pool import policy as P
from engine.pool.base import PoolLoad
from engine.pool.job import Job
from engine.pool.process import SlavePool, _Slave
from engine.pool.threads import ThreadPool
from engine.protocol import node_session as S


class RecordingOwner:
    """A JobOwner that only records what its jobs ask of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def cancel_job(self, job: Job) -> None:
        self.calls.append(("cancel", job.id))
        job._fail(JobCancelled("cancelled"), 0.0)

    def grant_credit(self, job_id: int, chunks: int) -> None:
        self.calls.append(("grant", job_id, chunks))

    def poll_job(self, job: Job) -> bool:
        self.calls.append(("poll", job.id))
        return False


async def test_a_job_asks_its_owner_only_through_the_job_owner_protocol():
    owner = RecordingOwner()
    job = Job(7, "count", None, 0.0, owner)
    for i in range(S.CREDIT_BATCH + 1):
        assert job._chunk(i)
    taken = [await job.__anext__() for _ in range(S.CREDIT_BATCH)]
    assert taken == list(range(S.CREDIT_BATCH))
    assert owner.calls == [("grant", 7, S.CREDIT_BATCH)]  # credit in batches, as consumed
    assert not job.poll() and owner.calls[-1] == ("poll", 7)
    job.cancel()
    assert owner.calls[-1] == ("cancel", 7) and isinstance(job.error, JobCancelled)
    assert job.buffered == 0  # the caller gave up: chunks still buffered are dropped
    job.cancel()
    assert not job.poll()
    assert [c[0] for c in owner.calls] == ["grant", "poll", "cancel"]  # none once answered


# One example of each decision the policy can make.  A new decision type fails
# test_every_decision_is_in_the_union until it is listed here, and then
# test_the_process_pool_carries_out_every_decision until SlavePool._apply handles it.
EXAMPLES = {
    P.Spawn: P.Spawn(2),
    P.Assign: P.Assign(7, 1),
    P.Retire: P.Retire(1),
    P.Fail: P.Fail(7, SlaveDied("gone")),
    P.Cancel: P.Cancel(7, 1),
}


def test_every_decision_is_in_the_union():
    union = {get_origin(t) or t for t in get_args(P.Decision)}
    made_by_the_policy = {obj for obj in vars(P).values()
                          if isinstance(obj, type) and dataclasses.is_dataclass(obj)
                          and obj.__dataclass_params__.frozen and obj.__module__ == P.__name__}
    assert union == made_by_the_policy == set(EXAMPLES)
    for cls in union:  # cheap to make (no __dict__), final for the type checker
        assert "__slots__" in vars(cls) and getattr(cls, "__final__", False), cls


class FakeSession:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def invoke(self, sid, job, event, payload, chunked):
        self.calls.append(("invoke", sid, event, chunked))
        return []

    def terminate(self, now):
        self.calls.append(("terminate",))
        return []

    def cancel(self, sid, now):
        self.calls.append(("cancel", sid))
        return []

    def next_deadline(self):
        return None


class FakeNursery:
    def __init__(self) -> None:
        self.started: list[str] = []

    def start_soon(self, fn, *args, name=None):
        self.started.append(fn.__name__)


def _pool_holding_one_job():
    pool = SlavePool("seams", Path("app.py"), EngineConfig())
    pool._nursery = nursery = FakeNursery()
    session = FakeSession()
    slave = pool._slaves[1] = _Slave(1, process=None, session=session)
    pool._jobs[7] = job = Job(7, "echo", "hi", 0.0, pool)
    return pool, nursery, session, slave, job


@pytest.mark.parametrize("kind", list(EXAMPLES), ids=lambda cls: cls.__name__)
def test_the_process_pool_carries_out_every_decision(kind):
    pool, nursery, session, slave, job = _pool_holding_one_job()
    pool._apply([EXAMPLES[kind]], 1.0)
    if kind is P.Spawn:
        assert nursery.started == ["_supervise"] and 2 in pool._slaves
    elif kind is P.Assign:
        assert session.calls == [("invoke", 7, "echo", False)] and not job.done
    elif kind is P.Retire:
        assert session.calls == [("terminate",)]
    elif kind is P.Fail:
        assert isinstance(job.error, SlaveDied) and pool.failed == 1 and 7 not in pool._jobs
    elif kind is P.Cancel:
        assert isinstance(job.error, JobCancelled) and pool.cancelled == 1
        assert session.calls == [("cancel", 7)]  # and the slave is told to stop it
    else:  # pragma: no cover
        pytest.fail(f"no expectation for {kind.__name__}: add one")


def test_a_decision_the_pool_does_not_know_is_an_error_not_ignored():
    pool, *_ = _pool_holding_one_job()
    with pytest.raises(AssertionError):
        pool._apply([("Spawn", 2)], 1.0)


def test_both_backends_report_their_load_the_same_way(tmp_path):
    config = EngineConfig(pool_limit=2, queue_limit=5)
    assert SlavePool("a", tmp_path / "app.py", config).load() == PoolLoad("running", 0, 0, 0)
    threads = ThreadPool("a", tmp_path / "app.py", config)
    assert threads.load() == PoolLoad("running", 0, 0, 0)
    threads.broken_reason = "cannot import"
    assert threads.load().state == "broken" and threads.info()["state"] == "broken"
