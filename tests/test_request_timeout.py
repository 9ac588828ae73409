"""Slow is not hung (#17): heartbeats say a slave's process is alive, the app's
``request-timeout`` bounds how long a job may take.  Real node, real slaves, a real
client: the caller of a job past its request-timeout gets ``RequestTimeout``; a plain
handler busy for longer than the heartbeat-timeout is answered, not killed."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import trio

from engine.client import connect
from engine.errors import RequestTimeout

from support import start_node_process, stop_node, wait_until, write_app

pytestmark = pytest.mark.e2e

APP = textwrap.dedent('''\
    import os
    import time
    import trio
    from engine import on


    @on("busy")
    def busy(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:      # computing, never yielding to the slave's loop
            pass
        return os.getpid()


    @on("spin")
    def spin(data):
        while True:
            pass


    @on("nap")
    async def nap(seconds):
        await trio.sleep(seconds)
        return os.getpid()


    @on("pid")
    def pid(data):
        return os.getpid()
    ''')


def app(where: Path, **engine) -> Path:
    return write_app(where, APP, engine)


async def test_slow_jobs_finish_and_stuck_ones_time_out_through_a_node(tmp_path):
    node = await start_node_process(
        [app(tmp_path, **{"pool-limit": 1, "heartbeat-timeout": 1, "request-timeout": 3,
                          "termination-timeout": 0.5})],
        tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            with trio.fail_after(60):
                first = await client.call("worker", "pid")
                # 2 s of computing under a 1 s heartbeat-timeout: slow, not hung
                assert await client.call("worker", "busy", 2.0) == first

                # an async handler past its request-timeout stops at its await; same slave
                t0 = trio.current_time()
                with pytest.raises(RequestTimeout) as err:
                    await client.call("worker", "nap", 30)
                assert 2.8 < trio.current_time() - t0 < 6
                assert "request-timeout 3s" in str(err.value)
                assert await client.call("worker", "pid") == first

                # a plain handler that never returns: the caller is told at 3 s; the
                # slave, which cannot stop it, is replaced
                with pytest.raises(RequestTimeout):
                    await client.call("worker", "spin")

                async def replaced():
                    pid = await client.call("worker", "pid")
                    return pid if pid != first else None
                await wait_until(replaced, "a fresh slave answers")
                info = await client.info("worker")
                assert info["pool"]["timed_out"] == 2
                assert info["pool"]["crashes"] == 1     # only the one that could not stop
        assert "killing slave" in (tmp_path / "node.log").read_text()
    finally:
        assert not stop_node(node)
