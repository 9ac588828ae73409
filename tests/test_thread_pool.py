"""backend "thread": handlers in the node's process, same contract as the slave pool."""
from __future__ import annotations

import json
import math
import textwrap
import threading
from contextlib import asynccontextmanager

import pytest
import trio

from engine.client import connect
from engine.errors import AppBroken, JobCancelled, QueueFull, RequestTimeout, ShuttingDown
from engine.manifest import EngineConfig
from engine.pool import threads
from engine.pool.threads import ThreadPool
from support import wait_until
from transport.errors import BadMessage, HandlerError, UnknownEvent

APP = """
import threading, time
import trio
from engine import on

# The sleeps below are the handlers' work, in real time (a blocked thread, a running
# job to cancel, a job still running when a drain ends).

@on("echo")
def echo(data):
    return data

@on("where")
def where(data):
    return threading.current_thread().name

@on("double")
async def double(data):
    await trio.sleep(0)
    return data * 2

@on("count")
def count(n):
    for i in range(n):
        yield i

@on("acount")
async def acount(n):
    for i in range(n):
        yield i

@on("boom")
def boom(data):
    raise ValueError(f"bad {data}")

@on("block")
def block(seconds):
    time.sleep(seconds)
    return "woke"

@on("asleep")
async def asleep(seconds):
    await trio.sleep(seconds)
    return "slept"

@on("hold")
async def hold(path):
    open(path, "w").close()  # the test waits for this: the handler has started
    await trio.sleep(30)

@on("total")
async def total(_, chunks):
    n = 0
    async for chunk in chunks:
        n += len(chunk)
    return n

@on("maybe_call")
def maybe_call(data):
    if data:
        from engine import call
        return call("elsewhere", "x", node="tcp://127.0.0.1:1", timeout=1)
    return "quick"
"""


@pytest.fixture
def quick_once_measured(monkeypatch):
    """Any plain handler counts as quick once one call has been measured, so which call
    runs where does not depend on how fast this machine hops threads: with the real
    INLINE_BELOW (0.5 ms) a loaded machine's first hops (3-7 ms seen) need 10-20
    calls to average below it, or never get there (bench/timing.py measures it)."""
    monkeypatch.setattr(threads, "INLINE_BELOW", math.inf)


@asynccontextmanager
async def running_pool(tmp_path, source=APP, name="threads", **cfg):
    entry = tmp_path / f"{name}.py"
    entry.write_text(textwrap.dedent(source))
    pool = ThreadPool(name, entry, EngineConfig(backend="thread", **cfg))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("inline_below, runs_inline", [(math.inf, True), (0.0, False)])
async def test_a_plain_handler_runs_on_a_thread_until_its_calls_have_proved_quick(
        tmp_path, monkeypatch, inline_below, runs_inline):
    # Then inline on the node's loop: a thread hop costs more than such a call.  Which
    # calls are quick is the threshold's business (timing, in bench/timing.py); this is
    # what the pool does with the answer.
    monkeypatch.setattr(threads, "INLINE_BELOW", inline_below)
    main = threading.main_thread().name
    with trio.fail_after(20):
        async with running_pool(tmp_path) as pool:
            seen = [await pool.submit("where", None).result() for _ in range(3)]
    assert seen[0] != main, seen                              # never measured: a thread
    assert all((where == main) == runs_inline for where in seen[1:]), seen


async def test_every_kind_of_handler_runs_and_errors_are_typed(tmp_path):
    with trio.fail_after(20):
        async with running_pool(tmp_path) as pool:
            assert await pool.submit("echo", {"a": 1}).result() == {"a": 1}
            assert await pool.submit("where", None).result() != threading.main_thread().name
            assert await pool.submit("double", 21).result() == 42
            assert await pool.submit("count", 4).result() == [0, 1, 2, 3]
            assert [c async for c in pool.submit("acount", 3)] == [0, 1, 2]
            with pytest.raises(HandlerError) as err:
                await pool.submit("boom", 7).result()
            assert err.value.type == "ValueError" and "bad 7" in str(err.value)
            with pytest.raises(UnknownEvent):
                await pool.submit("nope", None).result()
            info = pool.info()
            assert info["backend"] == "thread" and info["done"] == 5 and info["failed"] == 2
            assert any("bad 7" in line for line in pool.crashlog())


async def test_limits_queue_full_cancel_and_a_hung_thread(tmp_path):
    with trio.fail_after(20):
        async with running_pool(tmp_path, pool_limit=1, queue_limit=1,
                                heartbeat_timeout=0.1, request_timeout=0.5) as pool:
            started = tmp_path / "started"
            running = pool.submit("hold", str(started))
            queued = pool.submit("echo", "later")
            await wait_until(started.exists, "the first job's handler runs")
            assert (pool.info()["running"], pool.info()["queue"]) == (1, 1)
            with pytest.raises(QueueFull):
                pool.submit("echo", "refused")
            running.cancel()
            with pytest.raises(JobCancelled):
                await running.result()
            assert await queued.result() == "later"   # the slot went to the queued job
            # 5 s of real time.sleep in a thread: it outlives request_timeout (0.5 s)
            hung = pool.submit("block", 5)            # a thread cannot be stopped...
            with pytest.raises(RequestTimeout):       # ...but its job fails and frees the slot
                await hung.result()
            assert await pool.submit("echo", "after").result() == "after"
            assert pool.info()["cancelled"] == 1 and pool.info()["timed_out"] == 1


async def test_request_timeout_bounds_queued_jobs_and_slow_is_not_hung(tmp_path):
    """No process to watch: a thread job as slow as 1 s under heartbeat-timeout 0.1 is
    answered; a job still queued at its request-timeout leaves the queue then."""
    with trio.fail_after(20):
        async with running_pool(tmp_path, pool_limit=1, queue_limit=5,
                                heartbeat_timeout=0.1, request_timeout=1.5) as pool:
            slow = pool.submit("block", 1.0)
            queued = pool.submit("block", 1.0)   # starts at ~1 s, due at 1.5 s
            t0 = trio.current_time()
            assert await slow.result() == "woke"
            with pytest.raises(RequestTimeout):
                await queued.result()
            assert trio.current_time() - t0 < 2.5


async def test_a_job_cancelled_before_its_task_started_never_runs_nor_holds_its_slot(tmp_path):
    with trio.fail_after(10):   # the cancelled handler, had it run, holds the slot 30 s
        async with running_pool(tmp_path, pool_limit=1) as pool:
            started = tmp_path / "started"
            cancelled = pool.submit("hold", str(started))  # has the slot; no checkpoint yet,
            queued = pool.submit("echo", "next")            # so its task has not started
            cancelled.cancel()
            with pytest.raises(JobCancelled):
                await cancelled.result()
            assert await queued.result() == "next"   # the slot went on at once
            assert not started.exists()               # FIFO: it would have started first
            assert pool.info()["cancelled"] == 1 and pool.info()["running"] == 0


async def test_a_quick_handler_inline_on_the_loop_may_not_block_it_on_a_call(
        tmp_path, quick_once_measured):
    with trio.fail_after(20):
        async with running_pool(tmp_path) as pool:
            # measured once, and quick: it runs inline on the node's loop from now on
            assert await pool.submit("maybe_call", False).result() == "quick"
            with pytest.raises(HandlerError, match="would wait for itself"):
                await pool.submit("maybe_call", True).result()


async def test_a_chunked_request_reaches_a_thread_backend_handler(tmp_path):
    async def blocks():
        for _ in range(100):
            yield b"z" * 100

    with trio.fail_after(20):
        async with running_pool(tmp_path) as pool:
            assert await pool.submit("total", None, blocks()).result() == 10_000
            with pytest.raises(BadMessage, match="async def echo"):
                await pool.submit("echo", None, blocks()).result()


async def test_two_apps_in_one_process_keep_their_own_handlers(tmp_path):
    other = 'from engine import on\n\n@on("echo")\ndef echo(data):\n    return ["other", data]\n'
    with trio.fail_after(20):
        async with running_pool(tmp_path) as one, running_pool(tmp_path, other, name="other") as two:
            assert await one.submit("echo", 1).result() == 1
            assert await two.submit("echo", 1).result() == ["other", 1]
            with pytest.raises(UnknownEvent):
                await two.submit("double", 1).result()


async def test_an_app_that_does_not_import_is_broken_not_the_node(tmp_path):
    with trio.fail_after(20):
        async with running_pool(tmp_path, "raise RuntimeError('no config')\n") as pool:
            assert pool.info()["state"] == "broken"
            with pytest.raises(AppBroken, match="no config"):
                pool.submit("echo", 1)
            assert any("no config" in line for line in pool.crashlog())


async def test_drain_finishes_what_it_can_then_answers_the_rest(tmp_path):
    with trio.fail_after(20):
        async with running_pool(tmp_path, pool_limit=1) as pool:
            # quick: done at its first checkpoint, well within the drain's 0.5 s
            quick, slow = pool.submit("asleep", 0), pool.submit("asleep", 30)
            await pool.drain(0.5)
            assert await quick.result() == "slept"
            with pytest.raises(ShuttingDown):
                await slow.result()
            with pytest.raises(ShuttingDown):
                pool.submit("echo", 1)


@pytest.mark.e2e
async def test_a_node_serves_a_thread_backend_app(tmp_path, start_node):
    folder = tmp_path / "apps" / "inproc"
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(textwrap.dedent(APP))
    (folder / "manifest.json").write_text(json.dumps({
        "args": "app.py", "engine": {"backend": "thread", "pool-limit": 2},
        "drivers": {"rpc": {"type": "native-server", "emit": "double",
                            "endpoint": "tcp://127.0.0.1:0"}}}))
    node = await start_node(folder)
    async with connect(node.address, timeout=20) as client:
        with trio.fail_after(20):
            assert await client.call("inproc", "echo", "hi") == "hi"
            assert await client.call("inproc", "count", 3) == [0, 1, 2]
            info = await client.info("inproc")
            assert info["pool"]["backend"] == "thread"
    assert not node.descendants()  # no slave processes at all
