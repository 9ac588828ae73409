"""Pool dynamics, with :class:`engine.pool.SlavePool` run in this process (its slaves
are real child processes hosting ``bench/echo_app.py``):

- cold start: a fresh pool's first job, submit to result (spawn + import + handshake,
  waiting for the pool's zygote to be ready); then a job that needs a second slave in
  the running pool, until it serves (forked by the zygote);
- burst: from the first of a burst of slow jobs until pool-limit (8) slaves each hold
  a job;
- idle retirement: from the burst's last answer until every slave is gone, with a
  1 s idle-timeout;
- the RSS of each idle slave (between the burst and its retirement).
"""
from __future__ import annotations

import time
from typing import Any

import psutil
import trio

from .harness import Settings, median
from .engine import APP_ENTRY

POOL_LIMIT = 8
IDLE_TIMEOUT = 1.0
POLL = 0.005


def available() -> str | None:
    try:
        from engine.pool.process import SlavePool  # noqa: F401
    except ImportError as exc:
        return f"skipped: engine.pool not importable ({exc})"
    return None


def _pool(pool_limit: int, idle_timeout: float):
    from engine.manifest import EngineConfig
    from engine.pool.process import SlavePool

    config = EngineConfig(pool_limit=pool_limit, queue_limit=1000, grow_threshold=1,
                          idle_timeout=idle_timeout, startup_timeout=15)
    return SlavePool("bench-pool", APP_ENTRY, config)


async def cold_start(runs: int) -> tuple[list[float], list[float]]:
    """Seconds: from submit to answer of the first job of a fresh pool (its zygote
    starting too), then from submitting three jobs to the running pool until a second
    slave has taken one."""
    first, more = [], []
    for _ in range(runs):
        pool = _pool(2, 600)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            with trio.fail_after(20):
                t0 = time.perf_counter()
                await pool.submit("echo", b"x").result()
                first.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                busy = [pool.submit("sleep", 0.5) for _ in range(3)]  # 2 queued: grow
                while _serving(pool) < 2:
                    await trio.sleep(POLL / 5)
                more.append(time.perf_counter() - t0)
                for job in busy:
                    await job.result()
            nursery.cancel_scope.cancel()
    return first, more


def _serving(pool) -> int:
    return sum(1 for s in pool.info()["slaves"] if s["state"] == "ready" and s["jobs"] > 0)


async def burst_and_retire(job_seconds: float) -> dict[str, Any]:
    pool = _pool(POOL_LIMIT, IDLE_TIMEOUT)
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        t0 = time.perf_counter()
        jobs = [pool.submit("sleep", job_seconds) for _ in range(POOL_LIMIT * 2)]
        with trio.fail_after(20):
            while _serving(pool) < POOL_LIMIT:
                await trio.sleep(POLL)
            out["burst_to_limit_s"] = time.perf_counter() - t0
            for job in jobs:
                await job.result()
        answered = time.perf_counter()
        pids = [s["pid"] for s in pool.info()["slaves"] if s["pid"]]
        rss = []
        for pid in pids:
            try:
                rss.append(psutil.Process(pid).memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                pass
        out["idle_slave_rss_mb"] = rss
        with trio.fail_after(IDLE_TIMEOUT + 20):
            while pool.info()["slaves"]:
                await trio.sleep(POLL * 4)
        out["retired_after_s"] = time.perf_counter() - answered
        out["retired"] = pool.info()["retired"]
        nursery.cancel_scope.cancel()
    return out


async def pool_dynamics(settings: Settings) -> dict[str, Any]:
    first, more = await cold_start(1 if settings.quick else 3)
    out = await burst_and_retire(0.5)
    out["cold_start_s"] = median(first)
    out["cold_starts_s"] = first
    out["new_slave_s"] = median(more)
    out["new_slaves_s"] = more
    return out
