"""SlavePool end to end: real slave processes on ipc:// under tmp_path."""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import asynccontextmanager, suppress

import psutil
import pytest
import trio

from engine.errors import (AppBroken, JobCancelled, QueueFull, RequestTimeout, ShuttingDown,
                           SlaveDied, UnknownEvent)
from engine.manifest import EngineConfig
from engine.pool import prefetch
from engine.pool.prefetch import AUTO_PREFETCH_MAX
from engine.pool.process import SlavePool
from engine.protocol.node_session import STREAM_WINDOW
from support import wait_until, wait_until_sync
from transport.errors import HandlerError

pytestmark = pytest.mark.e2e

APP = """
import os, sys, time
import trio
from engine import on

# The sleeps below are the handlers' work, on the real clock of a real slave process:
# what overlaps, what a cancel interrupts, what a slow job holds.

@on("echo")
def echo(data):
    return data

@on("count")
def count(data):
    for i in range(data["n"]):
        yield {"i": i}

@on("acount")
async def acount(data):
    for i in range(data["n"]):
        await trio.sleep(0)
        yield i

@on("double")
async def double(data):
    await trio.sleep(0.01)
    return data * 2

@on("boom")
def boom(data):
    raise ValueError(f"bad input {data}")

@on("env")
def env(name):
    return os.environ.get(name)


@on("pid")
def pid(data):
    return os.getpid()

@on("gate")
async def gate(paths):
    started, go, answering = paths
    open(started, "w").close()
    while not os.path.exists(go):  # the test opens the gate
        await trio.sleep(0.001)
    open(answering, "w").close()
    return started

@on("slow")
async def slow(data):
    start = time.time()
    await trio.sleep(data)
    return [start, time.time(), os.getpid()]

@on("spin")
def spin(data):
    while True:
        pass

@on("busy")
def busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:   # a plain handler computing: no await, no heartbeat task
        pass
    return os.getpid()

@on("flood")
def flood(data):
    for i in range(data):
        yield i

@on("aflood")
async def aflood(data):
    i = 0
    while data is None or i < data:
        yield i
        i += 1

@on("stubborn")
async def stubborn(data):
    with trio.CancelScope(shield=True):  # ignores cancellation: the node must kill it
        await trio.sleep(data)
    return "finished"

@on("die")
def die(data):
    print("last words before", data, flush=True)
    if data == "kill":
        os.kill(os.getpid(), 9)
    os._exit(7)
"""


def children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    left = [p for p in children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, f"slaves outlived their pool: {left}"


@asynccontextmanager
async def running_pool(tmp_path, source=APP, pool_kw=None, **cfg):
    entry = tmp_path / "app.py"
    entry.write_text(textwrap.dedent(source))
    cfg.setdefault("heartbeat_timeout", 10.0)
    cfg.setdefault("startup_timeout", 20.0)
    cfg.setdefault("termination_timeout", 2.0)
    pool = SlavePool("test-app", entry, EngineConfig(**cfg), **(pool_kw or {}))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
async def test_echo_streams_errors_and_the_slave_lives_on(tmp_path, spawn):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, spawn=spawn) as pool:
            job = pool.submit("echo", {"a": [1, 2]})
            assert await job.result() == {"a": [1, 2]}
            assert job.streaming is False
            assert [x async for x in pool.submit("echo", "one")] == ["one"]

            job = pool.submit("count", {"n": 3})
            assert await job.result() == [{"i": 0}, {"i": 1}, {"i": 2}]
            assert job.streaming is True
            assert [x async for x in pool.submit("acount", {"n": 4})] == [0, 1, 2, 3]
            assert await pool.submit("acount", {"n": 0}).result() == []
            assert await pool.submit("double", 21).result() == 42

            first_pid = await pool.submit("pid", None).result()
            with pytest.raises(HandlerError) as err:
                await pool.submit("boom", 5).result()
            assert err.value.type == "ValueError" and "bad input 5" in err.value.message
            with pytest.raises(UnknownEvent):
                await pool.submit("no-such-event", None).result()
            assert await pool.submit("pid", None).result() == first_pid  # same slave lives on
            info = pool.info()
            assert info["done"] == 8 and info["failed"] == 2 and info["state"] == "running"
            assert info["latency_ms"]["p50"] is not None


def most_at_once(results: list[list]) -> int:
    """The most ``slow`` jobs running at one moment, from their own [start, end, pid]
    (one clock: the slaves share the machine's).  A slave runs one at a time, so this
    is also the most slaves that were busy at once."""
    edges = sorted([(end, -1) for start, end, _ in results] +
                   [(start, 1) for start, end, _ in results])   # at a tie, an end first
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def test_grows_to_pool_limit_under_burst_and_shrinks_when_idle(tmp_path):
    with trio.fail_after(50):
        async with running_pool(tmp_path, pool_limit=3, idle_timeout=0.5) as pool:
            jobs = [pool.submit("slow", 0.5) for _ in range(12)]
            results = [await j.result() for j in jobs]
            assert most_at_once(results) == 3     # three slaves served the burst together
            assert len({pid for _, _, pid in results}) == 3
            assert pool.info()["spawned"] == 3
            await wait_until(lambda: not pool.info()["slaves"], "every slave has retired", timeout=20)
            assert pool.info()["retired"] == 3 and pool.crashlog() == [], (pool.info(), pool.policy.info(), pool.crashlog())


async def test_queue_full_is_refused_at_once(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, queue_limit=2) as pool:
            a, b = pool.submit("slow", 0.2), pool.submit("slow", 0.2)
            with pytest.raises(QueueFull):
                pool.submit("slow", 0.2)
            assert pool.info()["queue"] == 2
            await a.result()
            await b.result()
            assert pool.info()["done"] == 2


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
async def test_a_slow_sync_job_is_not_a_hung_slave(tmp_path, spawn):
    """A plain handler busy for 2.5 s under a 1 s heartbeat-timeout: its slave keeps
    beating (the watchdog thread, engine/worker/runtime.py), the job is answered, and
    the slave that ran it is still the same process."""
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1, heartbeat_timeout=1.0, spawn=spawn) as pool:
            before = await pool.submit("pid", None).result()
            busy = await pool.submit("busy", 2.5).result()
            assert busy == before                    # same slave: nobody killed it
            assert pool.info()["crashes"] == 0 and pool.info()["failed"] == 0


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
async def test_request_timeout_answers_the_caller_and_replaces_a_slave_that_cannot_stop(
        tmp_path, spawn):
    """``while True: pass`` in a plain handler: the slave still beats (it is alive),
    so it is the request-timeout that answers the caller; the handler cannot be
    stopped, so after termination-timeout the slave is killed and replaced."""
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=2, heartbeat_timeout=1.0,
                                request_timeout=1.5, termination_timeout=0.5,
                                spawn=spawn) as pool:
            await pool.submit("echo", 1).result()
            spun = pool.submit("spin", None)
            others = [pool.submit("echo", i) for i in range(5)]
            t0 = trio.current_time()
            with pytest.raises(RequestTimeout) as err:
                await spun.result()
            assert 1.4 <= trio.current_time() - t0 < 3.0
            assert "request-timeout 1.5s" in str(err.value)
            assert [await j.result() for j in others] == list(range(5))
            await wait_until(lambda: pool.info()["crashes"] == 1, "the spinning slave is killed")
            assert await pool.submit("echo", "after").result() == "after"
            info = pool.info()
            assert info["timed_out"] == 1 and info["failed"] == 1


async def test_request_timeout_stops_an_async_handler_without_killing_its_slave(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, request_timeout=0.5) as pool:
            pid = await pool.submit("pid", None).result()
            with pytest.raises(RequestTimeout):
                await pool.submit("slow", 30).result()
            # the handler stopped at its await: the slot is back, on the same slave
            assert await pool.submit("pid", None).result() == pid
            assert pool.info()["crashes"] == 0


async def test_request_timeout_counts_time_in_the_queue(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, request_timeout=1.0) as pool:
            await pool.submit("echo", 1).result()
            first = pool.submit("slow", 0.7)
            queued = pool.submit("slow", 0.7)    # waits 0.7 s, then would run 0.7 s more
            assert len(await first.result()) == 3
            with pytest.raises(RequestTimeout):
                await queued.result()


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
@pytest.mark.parametrize("how", ["exit", "kill"])
async def test_crashing_slave_is_replaced_without_losing_other_jobs(tmp_path, how, spawn):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=2, spawn=spawn) as pool:
            before = [pool.submit("slow", 0.3) for _ in range(3)]
            crash = pool.submit("die", how)
            after = [pool.submit("slow", 0.1) for _ in range(3)]
            with pytest.raises(SlaveDied) as err:
                await crash.result()
            assert ("SIGKILL" in str(err.value)) if how == "kill" else ("status 7" in str(err.value))
            for j in before + after:
                assert len(await j.result()) == 3
            assert await pool.submit("echo", "ok").result() == "ok"
            log = pool.crashlog()
            assert any(f"last words before {how}" in line for line in log), log
            assert log[-1].startswith("[") and pool.info()["crashes"] == 1


@pytest.mark.parametrize("spawn", ["zygote", "exec"])
async def test_app_that_fails_to_import_is_broken_with_backoff(tmp_path, spawn):
    source = "import no_such_module_for_engine_tests\n"
    with trio.fail_after(40):
        # startup_timeout 60: no slave's startup deadline can stand in for the backoff's
        async with running_pool(tmp_path, source, pool_limit=4, spawn=spawn, startup_timeout=60,
                                pool_kw=dict(restart_intensity=2, backoff_base=0.3)) as pool:
            submitted = trio.current_time()
            job = pool.submit("echo", 1)
            with pytest.raises(AppBroken):
                await job.result()
            info = pool.info()
            assert info["state"] == "broken"
            assert "no_such_module_for_engine_tests" in info["reason"]
            with pytest.raises(AppBroken):
                pool.submit("echo", 2)
            # Broken after 2 failed starts; then a probe slave 0.3 s after, and another
            # 0.6 s after that one failed, one at a time: a few probes, not a fork loop.
            # Timers never fire early, so the two cannot be over sooner than 0.9 s.
            await wait_until(lambda: pool.policy.info()["startup_failures"] >= 4,
                             "two probes after the pool broke have failed too", timeout=15)
            assert trio.current_time() - submitted >= 0.3 + 0.6
            policy = pool.policy.info()
            assert policy["state"] == "broken"
            assert policy["spawned"] == policy["startup_failures"] == 4, policy  # none extra
            assert any("ModuleNotFoundError" in line for line in pool.crashlog())


async def test_slaves_are_forked_by_the_zygote_and_its_death_only_slows_starts(tmp_path):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=3) as pool:
            for job in [pool.submit("slow", 0.3) for _ in range(3)]:
                await job.result()
            slaves = list(pool._slaves.values())
            zygote = pool._zygote
            assert len(slaves) == 3 and all(s.process.forked for s in slaves)
            assert pool.info()["zygote"] == zygote.pid
            forked = {p.pid for p in psutil.Process(zygote.pid).children()}
            assert {s.process.pid for s in slaves} == forked
            # ps and top show what they are, not the template they were forked from
            assert all("engine.worker --app test-app" in " ".join(psutil.Process(pid).cmdline())
                       for pid in forked)
            os.kill(zygote.pid, signal.SIGKILL)
            # Its slaves see it go and exit; the pool starts new ones the plain way.
            await wait_until(lambda: not zygote.ready and not set(pool._slaves) & {s.id for s in slaves},
                             "the zygote and its slaves are gone", timeout=20)
            assert await pool.submit("echo", "after").result() == "after"
            assert [s.process.forked for s in pool._slaves.values()] == [False]
            assert pool.info()["zygote"] is None
            assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                       for pid in forked)


async def test_a_forked_slave_gets_the_nodes_environment_as_it_is_now(tmp_path, monkeypatch):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1, idle_timeout=0.2) as pool:
            assert await pool.submit("env", "ENGINE_TEST_LATE").result() is None
            await wait_until(lambda: not pool._slaves, "the slave has retired", timeout=20)  # the next job forks anew
            monkeypatch.setenv("ENGINE_TEST_LATE", "set after the zygote started")
            assert "ENGINE_TEST_LATE" not in psutil.Process(pool._zygote.pid).environ()
            assert await pool.submit("env", "ENGINE_TEST_LATE").result() == \
                "set after the zygote started"
            assert [s.process.forked for s in pool._slaves.values()] == [True]


async def test_a_stuck_zygote_costs_a_spawn_timeout_not_the_slave(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="engine.pool.slave")
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1, idle_timeout=0.2) as pool:
            assert await pool.submit("echo", 1).result() == 1
            await wait_until(lambda: not pool._slaves, "the slave has retired", timeout=20)  # the next job needs a slave
            zygote_pid = pool._zygote.pid
            os.kill(zygote_pid, signal.SIGSTOP)
            try:
                assert await pool.submit("echo", 2).result() == 2
                # The zygote's answer never came (SPAWN_TIMEOUT), and a plain start served.
                assert "zygote could not fork a slave: no answer; starting the slave the " \
                    "plain way" in caplog.text, caplog.text
                assert [s.process.forked for s in pool._slaves.values()] == [False]
            finally:
                os.kill(zygote_pid, signal.SIGCONT)


async def test_a_stopped_zygote_does_not_hang_the_pools_shutdown(tmp_path):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1, termination_timeout=0.5) as pool:
            assert await pool.submit("echo", 1).result() == 1
            (slave,) = pool._slaves.values()
            assert slave.process.forked
            zygote_pid, slave_pid = pool._zygote.pid, slave.process.pid
            os.kill(zygote_pid, signal.SIGSTOP)  # it can neither signal nor reap now
        # (running_pool cancelled the pool: we are here, so its shutdown was bounded)
    try:
        assert not psutil.pid_exists(slave_pid) or \
            psutil.Process(slave_pid).status() == psutil.STATUS_ZOMBIE
    finally:
        try:
            os.kill(zygote_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


async def test_cancelling_the_pool_leaves_no_child_processes(tmp_path):
    with trio.fail_after(40):
        pids = []
        async with running_pool(tmp_path, pool_limit=3) as pool:
            jobs = [pool.submit("slow", 0.3) for _ in range(6)]
            pids = {(await j.result())[2] for j in jobs}
            pending = pool.submit("slow", 30)
            await wait_until(lambda: pool.info()["running"] == 1, "the last job runs on a slave")
        assert pids
        with pytest.raises(ShuttingDown):
            await pending.result()
        assert not [p for p in pids if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not children()


async def test_concurrency_runs_async_handlers_overlapped(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, concurrency=4) as pool:
            results = [await j.result() for j in [pool.submit("slow", 0.5) for _ in range(4)]]
            assert len({pid for *_, pid in results}) == 1
            starts, ends = [r[0] for r in results], [r[1] for r in results]
            assert max(starts) < min(ends)  # all four were running at once


async def test_prefetched_jobs_wait_on_the_slave_and_run_one_after_another(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, concurrency=1, prefetch=2) as pool:
            pid = await pool.submit("pid", None).result()  # the slave is up
            jobs = [pool.submit("slow", 0.3) for _ in range(3)]
            assert slave_jobs(pool) == [3]       # all handed over at once: 1 running + 2 prefetched
            info = pool.info()                   # the prefetched ones still count as waiting
            assert (info["running"], info["queue"], info["prefetched"]) == (1, 2, 2)
            results = [await j.result() for j in jobs]
            assert {p for *_, p in results} == {pid}
            for (_, end, _), (start, _, _) in zip(results, results[1:]):
                assert start >= end                # concurrency 1: one at a time, in order
            # sync handlers (run inline by the slave) and errors keep their order and answers
            mixed = [pool.submit("echo", 1), pool.submit("boom", 2), pool.submit("echo", 3)]
            assert await mixed[0].result() == 1
            with pytest.raises(HandlerError, match="bad input 2"):
                await mixed[1].result()
            assert await mixed[2].result() == 3
            assert pool.info()["crashes"] == 0


async def test_cancelling_a_prefetched_job_answers_it_and_frees_its_slot_at_once(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, concurrency=1, prefetch=1) as pool:
            await pool.submit("pid", None).result()
            running = pool.submit("slow", 3)
            prefetched = pool.submit("echo", "never")
            assert slave_jobs(pool) == [2]
            prefetched.cancel()
            with pytest.raises(JobCancelled, match="running"):
                await prefetched.result()
            # the slave drops it from its queue and acknowledges without waiting for `slow`
            await wait_until(lambda: slave_jobs(pool) == [1], "the slave drops the prefetched job")
            assert not running.done   # the acknowledgement did not wait for `slow`
            assert len(await running.result()) == 3
            assert await pool.submit("echo", "after").result() == "after"
            info = pool.info()
            assert info["cancelled"] == 1 and info["failed"] == 0 and info["crashes"] == 0


async def test_done_callbacks_run_once_when_a_job_is_answered(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            seen = []
            job = pool.submit("echo", "x")
            job.add_done_callback(seen.append)
            job.add_done_callback(lambda j: 1 / 0)  # logged, does not break the pool
            assert await job.result() == "x" and seen == [job]
            job.add_done_callback(seen.append)      # already answered: called at once
            assert seen == [job, job]
            failed = pool.submit("boom", 1)
            failed.add_done_callback(seen.append)
            with pytest.raises(HandlerError):
                await failed.result()
            assert seen[-1] is failed and failed.done


async def test_drain_finishes_work_then_refuses(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            quick = [pool.submit("slow", 0.1) for _ in range(3)]
            await pool.drain(20)
            assert all(j.done for j in quick) and pool.info()["done"] == 3
            with pytest.raises(ShuttingDown):
                pool.submit("echo", 1)

    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            stuck = pool.submit("slow", 30)
            queued = pool.submit("slow", 30)
            await wait_until(lambda: (pool.info()["running"], pool.info()["queue"]) == (1, 1),
                             "one job runs, the other waits")
            await pool.drain(0.5)
            for j in (stuck, queued):
                with pytest.raises(ShuttingDown):
                    await j.result()


NODE = """
import sys, trio
from pathlib import Path
from engine.manifest import EngineConfig
from engine.pool import SlavePool

async def main():
    pool = SlavePool("orphans", Path(sys.argv[1]), EngineConfig(pool_limit=2))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        jobs = [pool.submit("slow", 0.2) for _ in range(4)]
        print(sorted({(await j.result())[2] for j in jobs}), flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


async def test_slaves_exit_when_the_node_is_sigkilled(tmp_path):
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    node = subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path / "app.py")],
                            stdout=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(node.stdout.readline, abandon_on_cancel=True)
        pids = eval(line)
        assert pids and all(psutil.pid_exists(p) for p in pids)
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait()
        node.stdout.close()

    def alive() -> list[int]:
        return [p for p in pids if psutil.pid_exists(p)]

    try:
        await wait_until(lambda: not alive(), "the orphaned slaves exit", timeout=10, interval=0.05)
    finally:
        for p in alive():
            with suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


# -- cancellation and flow control ------------------------------------------------------

def slave_jobs(pool) -> list[int]:
    return [s["jobs"] for s in pool.info()["slaves"]]


async def test_cancel_queued_and_running_jobs_answers_at_once_and_frees_the_slave(tmp_path):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            pid = await pool.submit("pid", None).result()
            running = pool.submit("slow", 30)
            queued = pool.submit("echo", "never")
            await wait_until(lambda: slave_jobs(pool) == [1], "the slow job runs", timeout=20)
            queued.cancel()
            with pytest.raises(JobCancelled, match="queued"):
                await queued.result()
            assert pool.info()["queue"] == 0
            running.cancel()
            running.cancel()  # idempotent
            with pytest.raises(JobCancelled, match="running"):
                await running.result()
            # The async handler stopped at its await: the slave is free long before the
            # 30 s sleep would end, and was not killed (bench/timing.py: how soon).
            await wait_until(lambda: slave_jobs(pool) == [0], "the slave is free", timeout=10)
            assert await pool.submit("pid", None).result() == pid  # same slave, not a new one
            info = pool.info()
            assert info["cancelled"] == 2 and info["failed"] == 0 and info["crashes"] == 0
            assert not pool.policy.owner and not pool.policy.cancelled and not pool._jobs
            running.cancel()  # answered: no effect
            assert pool.info()["cancelled"] == 2


@pytest.mark.parametrize("event", ["flood", "aflood"])
async def test_cancelling_an_endless_stream_stops_the_generator(tmp_path, event):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            job = pool.submit(event, 10**9 if event == "flood" else None)
            got = []
            with pytest.raises(JobCancelled):
                async for chunk in job:
                    got.append(chunk)
                    if len(got) == 3:
                        job.cancel()
            assert got == [0, 1, 2]
            await wait_until(lambda: slave_jobs(pool) == [0], "the slave is free", timeout=10)
            assert await pool.submit("echo", "next").result() == "next"
            assert pool.info()["crashes"] == 0


async def test_a_handler_that_ignores_cancel_is_killed_after_termination_timeout(tmp_path):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=1, termination_timeout=1.0) as pool:
            job = pool.submit("stubborn", 30)
            await wait_until(lambda: slave_jobs(pool) == [1], "the stubborn job runs", timeout=20)
            job.cancel()
            with pytest.raises(JobCancelled):
                await job.result()
            await wait_until(lambda: pool.info()["crashes"] == 1, "the stubborn slave is killed",
                             timeout=15)
            assert "CANCEL" in pool.crashlog()[-1]
            assert await pool.submit("echo", "replaced").result() == "replaced"
            assert not pool.policy.owner and not pool.policy.cancelled


@pytest.mark.parametrize("event", ["flood", "aflood"])
async def test_a_slow_consumer_bounds_the_buffered_chunks(tmp_path, event):
    n = 100_000
    with trio.fail_after(55):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            job = pool.submit(event, n)
            most, expected = 0, 0
            async for chunk in job:
                assert chunk == expected
                expected += 1
                most = max(most, job.buffered)
                if expected % 2000 == 0:
                    # Real time on purpose: a consumer slower than its producer is the
                    # case under test; the slave keeps producing meanwhile, up to the window.
                    await trio.sleep(0.02)
            assert expected == n
            assert STREAM_WINDOW // 2 <= most <= STREAM_WINDOW + 1, most
            # result() consumes as it collects: a long stream through it completes too
            assert await pool.submit(event, 5000).result() == list(range(5000))


SLEEPER = """
import os, trio
from engine import on

# Real-time sleeps: the work a CANCEL must interrupt.

@on("slow")
async def slow(seconds):
    await trio.sleep(seconds)
    return "woke up"

@on("pid")
def pid(data):
    return os.getpid()

@on("forever")
async def forever(data):
    i = 0
    while True:
        yield i
        i += 1
        await trio.sleep(0.001)
"""


async def test_cli_call_timeout_cancels_the_job_on_the_node(tmp_path, start_node):
    """`python -m engine call APP slow --timeout 0.3` on a 30 s async handler: the
    client's CANCEL reaches the pool, the slave stops the handler and is free again."""
    import json

    from engine.client import connect

    app = tmp_path / "apps" / "sleeper"
    app.mkdir(parents=True)
    (app / "app.py").write_text(textwrap.dedent(SLEEPER))
    (app / "manifest.json").write_text(json.dumps({
        "type": "python", "args": "app.py",
        "engine": {"pool-limit": 1, "termination-timeout": 5, "heartbeat-timeout": 30}}))
    node = await start_node(app.parent)

    async def pool_info() -> dict:
        return (await client.info("sleeper"))["pool"]

    async def freed_after_cancel(n: int) -> dict | None:
        pool = await pool_info()
        return pool if pool["cancelled"] == n and [s["jobs"] for s in pool["slaves"]] == [0] \
            else None

    with trio.fail_after(50):
        async with connect(node.address, timeout=10) as client:
            pid = await client.call("sleeper", "pid")
            cli = await node.cli("call", "sleeper", "slow", "30", timeout=0.3)
            assert cli.returncode != 0, cli
            assert b"Timeout" in cli.stderr or b"timeout" in cli.stderr, cli.stderr
            # Without the CANCEL the slave would be held for 30 s.
            pool = await wait_until(lambda: freed_after_cancel(1), "the cancelled job frees the slave",
                                    timeout=10, interval=0.02)
            assert pool["running"] == pool["cancelling"] == pool["queue"] == 0, pool
            assert pool["spawned"] == 1 and pool["crashes"] == 0
            assert await client.call("sleeper", "pid") == pid  # the same slave serves on

            # a client leaving an endless stream early frees the slave too
            got = []
            async with client.stream("sleeper", "forever") as chunks:
                async for chunk in chunks:
                    got.append(chunk)
                    if len(got) == 3:
                        break
            assert got == [0, 1, 2]
            await wait_until(lambda: freed_after_cancel(2), "the abandoned stream frees the slave",
                             timeout=10, interval=0.02)
            assert await client.call("sleeper", "pid") == pid


# -- auto prefetch (the default) with real slaves ----------------------------------------

async def test_auto_prefetch_queues_quick_jobs_on_busy_slaves_within_the_session_bound(
        tmp_path, monkeypatch):
    # Whether an event is quick enough is its measured time against PREFETCH_BUDGET
    # (2 ms): the rule is tested pure in test_policy.py, and an echo's time is this
    # machine's business.  Here any measured event is quick enough, so that what the
    # pool does with the rule's answer is all that is tested.
    monkeypatch.setattr(prefetch, "PREFETCH_BUDGET", math.inf)
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=2, queue_limit=1000) as pool:
            assert pool.config.prefetch == "auto"  # the default
            assert pool.info()["prefetch"] == {"mode": "auto", "max": AUTO_PREFETCH_MAX,
                                               "service_ms": {}}
            assert await pool.submit("echo", 0).result() == 0  # measured: now it has an estimate
            most = 0
            jobs = [pool.submit("echo", i) for i in range(300)]
            for slave in pool._slaves.values():
                if slave.session is not None:
                    assert slave.session.capacity == 1 + AUTO_PREFETCH_MAX
                    most = max(most, len(slave.session.jobs))
            assert [await job.result() for job in jobs] == list(range(300))
            assert 1 < most <= 1 + AUTO_PREFETCH_MAX   # echoes were queued on busy slaves
            assert pool.info()["prefetch"]["service_ms"]["echo"] > 0


async def test_a_dying_slave_is_no_sample_and_slow_jobs_are_never_prefetched(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            with pytest.raises(SlaveDied):
                await pool.submit("die", "exit").result()
            assert pool.info()["prefetch"]["service_ms"] == {}  # a death says nothing
            pid = (await pool.submit("slow", 0.05).result())[2]
            assert pool.info()["prefetch"]["service_ms"]["slow"] >= 50
            running, waiting = pool.submit("slow", 0.3), pool.submit("slow", 0)
            info = pool.info()
            assert info["prefetched"] == 0 and info["queue"] == 1  # not handed to the busy slave
            assert (await running.result())[2] == (await waiting.result())[2] == pid


def test_engine_info_shows_the_prefetch_rule_and_what_it_measured():
    from engine.cli.commands import format_app_info

    text = format_app_info({"name": "a", "state": "running", "pool": {
        "queue": 3, "prefetched": 2, "running": 1,
        "prefetch": {"mode": "auto", "max": 16, "service_ms": {"report": 50.0, "echo": 0.1}}}})
    assert "prefetch auto (up to 16; 2 queued on slaves now)" in text
    assert "service: report 50.0 ms, echo 0.1 ms" in text and "zygote" not in text
    assert "zygote pid 77 (forks new slaves)" in format_app_info({"pool": {"zygote": 77}})
    # #17: no sample yet reads "-", not "None ms"
    assert "latency p50 - p99 -" in text and "None ms" not in text
    timed = format_app_info({"pool": {"latency_ms": {"p50": 1.5, "p99": 9.0}}})
    assert "latency p50 1.5 ms p99 9.0 ms" in timed


async def test_poll_job_takes_a_lone_jobs_answer_without_the_pump(tmp_path):
    # What the node's RpcServer does while a lone request's job runs (transport/_spin.py):
    # act on the slave's answer as soon as it is there, without waiting for the pump.
    # Each job is a "gate" handler: it marks that it has started, waits for the test to
    # open its gate, marks that it is answering, and answers.  Until the gate opens the
    # node's loop may run (its INVOKEs must go out), since no answer can come; after it,
    # the test only polls, synchronously (wait_until_sync, interval 0): a trio checkpoint
    # would let the pump read the answer, and the pump is what is ruled out.
    def gate(name: str) -> list[str]:
        return [str(tmp_path / f"{name}.{step}") for step in ("started", "go", "answering")]

    def there(*paths: str) -> bool:
        return all(map(os.path.exists, paths))

    def open_gates(*gates: list[str]) -> None:
        for started, go, answering in gates:
            open(go, "w").close()

    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, concurrency=2) as pool:
            lone = gate("lone")
            job = pool.submit("gate", lone)
            await wait_until(lambda: there(lone[0]), "the handler has started")
            open_gates(lone)

            def polled() -> bool:
                job.poll()
                return job.done

            wait_until_sync(polled, "poll() takes the lone job's answer", timeout=10, interval=0)
            assert await job.result() == lone[0]

            # Two in flight: the slave's next frame may be either's, so poll() takes
            # nothing, though both answers are on their way.
            a, b = gate("a"), gate("b")
            first, second = pool.submit("gate", a), pool.submit("gate", b)
            await wait_until(lambda: there(a[0], b[0]), "both handlers have started")
            open_gates(a, b)

            def both_answering() -> bool:
                assert not first.poll() and not second.poll()
                return there(a[2], b[2])

            wait_until_sync(both_answering, "both handlers answer", timeout=10, interval=0)
            # The replies leave the slave just after the "answering" marks.  Nothing can
            # say "arrived, unread" without reading them (what is ruled out here), so poll
            # on for a moment in real time (a slow machine makes this weaker, never red).
            keep_polling_until = time.monotonic() + 0.05
            while time.monotonic() < keep_polling_until:
                assert not first.poll() and not second.poll()
            assert not first.done and not second.done
            assert [await first.result(), await second.result()] == [a[0], b[0]]
