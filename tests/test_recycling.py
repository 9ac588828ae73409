"""Slaves are recycled (#17, "Recycling"): after ``engine.max-jobs-per-slave`` jobs or past
``engine.max-rss-per-slave`` MB a slave finishes what it holds and is replaced, and no
job fails because of it.  Real nodes, real slaves."""
from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest
import trio

from engine.client import connect

from support import start_node_process, stop_node, write_app

pytestmark = pytest.mark.e2e

APP = textwrap.dedent('''\
    import os
    import time
    from engine import on

    hoard = []


    @on("pid")
    def pid(data):
        time.sleep(0.005)
        return os.getpid()


    @on("grow")
    def grow(mb):
        hoard.append(bytearray(mb * 1024 * 1024))   # (touched: resident)
        time.sleep(0.05)
        return os.getpid()
    ''')


def app(where: Path, **engine) -> Path:
    return write_app(where, APP, {"termination-timeout": 2, **engine})


async def test_a_slave_is_replaced_after_its_job_quota_and_every_job_is_answered(tmp_path):
    node = await start_node_process([app(tmp_path, **{"pool-limit": 2, "max-jobs-per-slave": 5})],
                                    tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            pids: list[int] = []

            async def caller() -> None:
                for _ in range(15):
                    pids.append(await client.call("worker", "pid"))

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for _ in range(4):
                        nursery.start_soon(caller)
            per_slave = Counter(pids)
            assert len(pids) == 60                               # every job answered
            assert max(per_slave.values()) <= 5, per_slave      # (5 // 10: no jitter)
            assert len(per_slave) >= 12, per_slave
            info = await client.info("worker")
            assert info["pool"]["recycled"] >= 11, info["pool"]
            assert info["pool"]["failed"] == 0
    finally:
        assert not stop_node(node)


async def test_a_slave_past_its_memory_limit_is_replaced(tmp_path):
    node = await start_node_process([app(tmp_path, **{"pool-limit": 1, "max-rss-per-slave": 120})],
                                    tmp_path / "node.log", tmp_path)
    try:
        async with connect(node.address, timeout=30) as client:
            first = await client.call("worker", "pid")
            seen = [first]
            with trio.fail_after(60):
                while seen[-1] == first:            # 20 MB a call; checked every second
                    seen.append(await client.call("worker", "grow", 20))
            assert len(set(seen)) == 2 and len(seen) >= 5, seen
            log = (tmp_path / "node.log").read_text()
            assert "(max-rss-per-slave 120): replacing it once its jobs are done" in log, log[-2000:]
            assert (await client.info("worker"))["pool"]["failed"] == 0
    finally:
        assert not stop_node(node)
