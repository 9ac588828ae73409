"""SlavePool end to end: real slave processes on ipc:// under tmp_path."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import asynccontextmanager

import psutil
import pytest
import trio

from engine.errors import AppBroken, QueueFull, ShuttingDown, SlaveDied, SlaveHung, UnknownEvent
from engine.manifest import EngineConfig
from engine.pool import SlavePool
from transport.errors import HandlerError

pytestmark = pytest.mark.e2e

APP = """
import os, sys, time
import trio
from engine import on

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

@on("pid")
def pid(data):
    return os.getpid()

@on("slow")
async def slow(data):
    start = time.time()
    await trio.sleep(data)
    return [start, time.time(), os.getpid()]

@on("spin")
def spin(data):
    while True:
        pass

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


async def wait_until(predicate, timeout=20.0, step=0.05):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(step)


async def test_echo_streams_errors_and_the_slave_lives_on(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=1) as pool:
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


async def test_grows_to_pool_limit_under_burst_and_shrinks_when_idle(tmp_path):
    with trio.fail_after(50):
        async with running_pool(tmp_path, pool_limit=3, idle_timeout=0.5) as pool:
            jobs = [pool.submit("slow", 0.5) for _ in range(12)]
            most = 0
            results = []
            async with trio.open_nursery() as n:
                async def watch():
                    nonlocal most
                    while not all(j.done for j in jobs):
                        most = max(most, len(pool.info()["slaves"]))
                        await trio.sleep(0.02)
                n.start_soon(watch)
                for j in jobs:
                    results.append(await j.result())
            assert most == 3
            assert len({pid for _, _, pid in results}) == 3
            assert pool.info()["spawned"] == 3
            await wait_until(lambda: not pool.info()["slaves"])
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


async def test_hung_slave_is_killed_and_its_caller_told(tmp_path):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=2, heartbeat_timeout=1.5) as pool:
            await pool.submit("echo", 1).result()
            hung = pool.submit("spin", None)
            others = [pool.submit("echo", i) for i in range(5)]
            with pytest.raises(SlaveHung) as err:
                await hung.result()
            assert "heartbeat" in str(err.value)
            assert [await j.result() for j in others] == list(range(5))
            assert await pool.submit("echo", "after").result() == "after"


@pytest.mark.parametrize("how", ["exit", "kill"])
async def test_crashing_slave_is_replaced_without_losing_other_jobs(tmp_path, how):
    with trio.fail_after(40):
        async with running_pool(tmp_path, pool_limit=2) as pool:
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


async def test_app_that_fails_to_import_is_broken_with_backoff(tmp_path):
    source = "import no_such_module_for_engine_tests\n"
    with trio.fail_after(40):
        async with running_pool(tmp_path, source, pool_limit=4,
                                pool_kw=dict(restart_intensity=2, backoff_base=0.3)) as pool:
            job = pool.submit("echo", 1)
            with pytest.raises(AppBroken):
                await job.result()
            info = pool.info()
            assert info["state"] == "broken"
            assert "no_such_module_for_engine_tests" in info["reason"]
            with pytest.raises(AppBroken):
                pool.submit("echo", 2)
            spawned = info["spawned"]
            await trio.sleep(1.5)  # backoff 0.3, 0.6, 1.2...: a few probes, not a fork loop
            assert pool.info()["spawned"] - spawned <= 3
            assert any("ModuleNotFoundError" in line for line in pool.crashlog())


async def test_cancelling_the_pool_leaves_no_child_processes(tmp_path):
    with trio.fail_after(40):
        pids = []
        async with running_pool(tmp_path, pool_limit=3) as pool:
            jobs = [pool.submit("slow", 0.3) for _ in range(6)]
            pids = {(await j.result())[2] for j in jobs}
            pending = pool.submit("slow", 30)
            await trio.sleep(0.2)
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
            await trio.sleep(0.5)
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
            line = await trio.to_thread.run_sync(node.stdout.readline)
        pids = eval(line)
        assert pids and all(psutil.pid_exists(p) for p in pids)
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait()
        node.stdout.close()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        await trio.sleep(0.05)
    left = [p for p in pids if psutil.pid_exists(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left
