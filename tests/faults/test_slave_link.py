"""Faults of one slave or of its link never take its app down (issue 12, items 1-3):
a SlavePool in this process over real slave processes; each test asserts that every
accepted job got exactly one answer (a value or a typed error) and that the pool goes
on serving."""
from __future__ import annotations

import random
import signal

import pytest
import trio
import trio.testing

from engine.errors import SlaveDied
from support import wait_until
from transport.errors import BadMessage, HandlerError
from transport.streams import MAX_FRAME

from faults.pools import Ledger, kill, live_slaves, running_children, running_pool

pytestmark = pytest.mark.e2e

MIB = 1 << 20


async def test_a_slave_killed_while_the_pool_writes_to_it_fails_only_its_job(tmp_path):
    """The writer is in the middle of a frame the stopped slave does not read when the
    slave is SIGKILLed: the write fails (EPIPE); that is the slave's failure only."""
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            job = ledger.submit(pool, "pid", None)
            pid = await ledger.settle(job)
            kill(pid, signal.SIGSTOP)
            # 8 MiB: the socket takes its start, the writer task is left the rest
            stuck = ledger.submit(pool, "size", b"x" * (8 * MIB))
            await trio.testing.wait_all_tasks_blocked()
            kill(pid, signal.SIGKILL)
            assert isinstance(await ledger.settle(stuck), SlaveDied)
            again = ledger.submit(pool, "pid", None)
            assert await ledger.settle(again) != pid          # a new slave serves
            assert pool.info()["state"] == "running"
            await wait_until(lambda: pool.info()["faults"] == {"slave-died": 1},
                             "the dead slave is counted")
    ledger.check()


async def test_slaves_killed_again_and_again_under_load_lose_no_job(tmp_path):
    """Four clients keep 256 KiB requests in flight (so writes are often mid-frame)
    while slaves are SIGKILLed one after another."""
    ledger = Ledger()
    kills = 12
    with trio.fail_after(45):
        async with running_pool(tmp_path, pool_limit=3, queue_limit=64, prefetch=2) as pool:
            stop = trio.Event()

            async def client(n: int) -> None:
                blob = bytes([n]) * (256 << 10)
                async with trio.open_nursery() as jobs:
                    while not stop.is_set():
                        job = ledger.submit(pool, "work", {"sleep": 0.002, "blob": blob})
                        if job is None:
                            await trio.sleep(0.01)
                            continue
                        jobs.start_soon(ledger.settle, job)
                        await trio.sleep(0.002)

            async def killer() -> None:
                rng = random.Random(12)
                for _ in range(kills):
                    pids = await wait_until(lambda: live_slaves(pool), "a slave is ready")
                    await trio.sleep(rng.uniform(0.05, 0.15))
                    kill(rng.choice(pids))
                stop.set()

            async with trio.open_nursery() as n:
                for i in range(4):
                    n.start_soon(client, i)
                n.start_soon(killer)
            # the app is still there and serves
            assert await ledger.settle(ledger.submit(pool, "echo", "after")) == "after"
            assert pool.info()["state"] == "running"
    ledger.check()
    assert ledger.outcomes.get("value", 0) > 50, ledger
    assert set(ledger.outcomes) <= {"value", "SlaveDied"}, ledger
    assert not running_children()


@pytest.mark.parametrize("how", ["prefix", "frame"])
async def test_garbage_on_the_link_costs_only_that_slave(tmp_path, how):
    """A length prefix over the limit loses the framing, and a frame that is not msgpack
    would lose the answers in it: either way the slave is replaced and its job fails
    with SlaveDied (never a job left unanswered); the other slave's job is untouched."""
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=2) as pool:
            await ledger.settle(ledger.submit(pool, "pid", None))
            other = ledger.submit(pool, "work", {"sleep": 0.5})  # on the other slave
            got = await ledger.settle(ledger.submit(pool, "garbage", how))
            assert isinstance(got, SlaveDied) and "link" in str(got), got
            await wait_until(lambda: pool.info()["faults"] == {"link-garbage": 1, "slave-died": 1},
                             "the fault and the slave it cost are counted")
            assert isinstance((await ledger.settle(other))[0], int)
            for _ in range(4):
                assert await ledger.settle(ledger.submit(pool, "echo", 1)) == 1
            assert pool.info()["state"] == "running"
    ledger.check()


async def test_a_result_over_the_link_limit_fails_that_job_only(tmp_path):
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            pid = await ledger.settle(ledger.submit(pool, "pid", None))
            got = await ledger.settle(ledger.submit(pool, "big", (MAX_FRAME >> 20) + 6))
            assert isinstance(got, BadMessage) and "limit" in got.message, got
            # the same slave lives on, its link intact
            assert await ledger.settle(ledger.submit(pool, "pid", None)) == pid
    ledger.check()


async def test_a_chunk_over_the_link_limit_ends_that_stream_with_an_error(tmp_path):
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            pid = await ledger.settle(ledger.submit(pool, "pid", None))
            job = ledger.submit(pool, "bigstream", (MAX_FRAME >> 20) + 6)
            assert job is not None
            got = []
            with pytest.raises(BadMessage, match="limit"):
                async for chunk in job:
                    got.append(chunk)
            assert got == ["small first"]
            ledger.outcomes["BadMessage"] = 1
            assert await ledger.settle(ledger.submit(pool, "pid", None)) == pid
            assert pool.info()["running"] == 0
    ledger.check()


async def test_a_payload_over_the_link_limit_fails_that_job_only(tmp_path):
    """Seventy MiB from a client (an nng-server has no limit of its own): the job is
    refused with a typed error before anything reaches the slave."""
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            pid = await ledger.settle(ledger.submit(pool, "pid", None))
            got = await ledger.settle(ledger.submit(pool, "size", b"x" * (MAX_FRAME + 6 * MIB)))
            assert isinstance(got, BadMessage) and "limit" in got.message, got
            assert await ledger.settle(ledger.submit(pool, "size", b"x" * MIB)) == MIB
            assert await ledger.settle(ledger.submit(pool, "pid", None)) == pid
            assert pool.info()["running"] == 0
    ledger.check()


async def test_rlimit_breaches_fail_the_job_and_the_app_serves_on(tmp_path):
    """The manifest's resource limits: memory (RLIMIT_AS: the handler gets
    MemoryError, the slave lives) and CPU time (RLIMIT_CPU: the kernel kills the slave)."""
    spin = """
    @on("spin")
    def spin(_):
        while True:
            pass
    """
    from faults.pools import APP
    from engine.manifest import ResourceLimits
    ledger = Ledger()
    with trio.fail_after(40):
        async with running_pool(tmp_path, APP + spin.replace("\n    ", "\n"), pool_limit=1,
                                resource_limits=ResourceLimits(memory_bytes=1 << 30, cpu_seconds=1),
                                heartbeat_timeout=30) as pool:
            pid = await ledger.settle(ledger.submit(pool, "pid", None))
            hog = await ledger.settle(ledger.submit(pool, "hog", 2048))
            assert isinstance(hog, HandlerError) and hog.type == "MemoryError", hog
            assert await ledger.settle(ledger.submit(pool, "pid", None)) == pid
            died = await ledger.settle(ledger.submit(pool, "spin", None))
            assert isinstance(died, SlaveDied) and ("SIGXCPU" in str(died) or "SIGKILL" in str(died)), died
            assert await ledger.settle(ledger.submit(pool, "echo", "on")) == "on"
    ledger.check()


async def test_a_stopped_slave_is_killed_as_hung_and_replaced(tmp_path):
    """SIGSTOP: the slave neither answers nor sends heartbeats; after heartbeat-timeout
    its job fails with SlaveHung, the slave is killed (SIGKILL ends a stopped process
    too) and another one serves."""
    from engine.errors import SlaveHung
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1, heartbeat_timeout=1.5) as pool:
            pid = await ledger.settle(ledger.submit(pool, "pid", None))
            kill(pid, signal.SIGSTOP)
            stuck = ledger.submit(pool, "echo", "never")
            queued = ledger.submit(pool, "echo", "later")
            assert isinstance(await ledger.settle(stuck), SlaveHung)
            assert await ledger.settle(queued) == "later"           # on the replacement
            assert await ledger.settle(ledger.submit(pool, "pid", None)) != pid
    ledger.check()
    assert not running_children()


async def test_a_fault_in_handling_what_a_slave_sent_costs_only_that_slave(tmp_path, monkeypatch):
    """A bug met while acting on a slave's frame (here: a session that raises on one
    reply) is that slave's failure: killed, its job failed, replaced."""
    from engine.protocol import node_session

    receive = node_session.SlaveSession.receive

    def buggy(self, env, now):
        if env[0] == 8 and env[2] == "poison":  # a RESULT
            raise RuntimeError("a bug in the node's session")
        return receive(self, env, now)

    monkeypatch.setattr(node_session.SlaveSession, "receive", buggy)
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            got = await ledger.settle(ledger.submit(pool, "echo", "poison"))
            assert isinstance(got, SlaveDied) and "RuntimeError: a bug" in str(got), got
            assert await ledger.settle(ledger.submit(pool, "echo", "fine")) == "fine"
            assert pool.info()["faults"]["slave-frame"] == 1
    ledger.check()


async def test_a_supervisor_that_fails_still_answers_and_replaces_its_slave(tmp_path, monkeypatch):
    """The last resort: the slave's reaping itself fails (a bug); the supervisor's
    boundary still answers its jobs, forgets it, and the pool spawns another."""
    from engine.pool.process import SlavePool

    reaped = SlavePool._reaped
    calls = []

    def buggy(self, slave, spawn_error):
        calls.append(slave.id)
        if len(calls) == 1:
            raise RuntimeError("a bug in reaping")
        return reaped(self, slave, spawn_error)

    monkeypatch.setattr(SlavePool, "_reaped", buggy)
    ledger = Ledger()
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            pid = await ledger.settle(ledger.submit(pool, "pid", None))
            running = ledger.submit(pool, "work", {"sleep": 5})
            await wait_until(lambda: pool.info()["running"] == 1, "the job runs")
            kill(pid)
            got = await ledger.settle(running)
            assert isinstance(got, SlaveDied) and "supervisor failed" in str(got), got
            assert await ledger.settle(ledger.submit(pool, "pid", None)) != pid
            assert pool.info()["faults"]["supervisor"] == 1 and pool.info()["state"] == "running"
    ledger.check()
