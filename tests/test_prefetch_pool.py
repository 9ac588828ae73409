"""Auto prefetch (the default) end to end: real slave processes, the pool's wiring of
the policy's prefetch rule, its service-time samples and the session's bound."""
from __future__ import annotations

import textwrap
from contextlib import asynccontextmanager

import pytest
import trio

from engine.errors import SlaveDied
from engine.manifest import EngineConfig
from engine.prefetch import AUTO_PREFETCH_MAX
from engine.pool import SlavePool

pytestmark = pytest.mark.e2e

APP = """
import os
import trio
from engine import on

@on("echo")
def echo(data):
    return data

@on("slow")
async def slow(data):
    await trio.sleep(data)
    return os.getpid()

@on("die")
def die(data):
    os._exit(7)
"""


@asynccontextmanager
async def running_pool(tmp_path, **cfg):
    entry = tmp_path / "app.py"
    entry.write_text(textwrap.dedent(APP))
    config = EngineConfig(heartbeat_timeout=10.0, startup_timeout=20.0, termination_timeout=2.0, **cfg)
    assert config.prefetch == "auto"  # the default
    pool = SlavePool("prefetch-app", entry, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()


async def test_auto_prefetch_measures_echo_jobs_and_stays_within_the_session_bound(tmp_path):
    with trio.fail_after(30):
        async with running_pool(tmp_path, pool_limit=2, queue_limit=1000) as pool:
            assert pool.info()["prefetch"] == {"mode": "auto", "max": AUTO_PREFETCH_MAX,
                                               "service_ms": {}}
            assert await pool.submit("echo", 0).result() == 0
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
                await pool.submit("die", None).result()
            assert pool.info()["prefetch"]["service_ms"] == {}  # a death says nothing
            pid = await pool.submit("slow", 0.05).result()
            assert pool.info()["prefetch"]["service_ms"]["slow"] >= 50
            running, waiting = pool.submit("slow", 0.3), pool.submit("slow", 0)
            info = pool.info()
            assert info["prefetched"] == 0 and info["queue"] == 1  # not handed to the busy slave
            assert await running.result() == await waiting.result() == pid


def test_engine_info_shows_the_prefetch_rule_and_what_it_measured():
    from engine.cli import format_app_info

    text = format_app_info({"name": "a", "state": "running", "pool": {
        "queue": 3, "prefetched": 2, "running": 1,
        "prefetch": {"mode": "auto", "max": 16, "service_ms": {"report": 50.0, "echo": 0.1}}}})
    assert "prefetch auto (up to 16; 2 queued on slaves now)  service: report 50.0 ms, echo 0.1 ms" in text
