"""The Celery and Dramatiq side of ``bench/jobqueues.py``, run in child processes only.

``bench/jobqueues.py`` copies this file into a temporary folder as ``bench_jobs.py``;
with that folder and ``bench/.peers/py`` on PYTHONPATH it is

- the tasks module of the workers: ``celery -A bench_jobs worker ...`` /
  ``dramatiq bench_jobs ...`` (``BENCH_JOBS_TOOL`` says which one it defines);
- the client: ``python -m bench_jobs client``.  It warms the workers up, prints
  ``READY``, waits for ``run`` on stdin (the bench samples the workers' idle RSS in
  between), then measures and prints ``RESULT {json}``.

Broker and result backend are the redis at ``BENCH_JOBS_REDIS`` (redis://...).
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

TOOL = os.environ.get("BENCH_JOBS_TOOL", "celery")
REDIS = os.environ.get("BENCH_JOBS_REDIS", "redis://127.0.0.1:6379/0")
TIMEOUT = 30.0                               # any one result, seconds

if TOOL == "celery":
    from celery import Celery

    app = Celery("bench_jobs", broker=REDIS, backend=REDIS)
    app.conf.update(task_serializer="json", result_serializer="json",
                    accept_content=["json"], worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True)

    @app.task(name="bench_jobs.noop")
    def noop(x):
        return x

    def submit(x):
        return noop.delay(x)

    def wait(handle):
        return handle.get(timeout=TIMEOUT)

    def forget(handle):
        handle.forget()

elif TOOL == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    broker = RedisBroker(url=REDIS)
    broker.add_middleware(Results(backend=RedisBackend(url=REDIS)))
    dramatiq.set_broker(broker)

    @dramatiq.actor(store_results=True, max_retries=0)
    def noop(x):
        return x

    def submit(x):
        return noop.send(x)

    def wait(handle):
        return handle.get_result(block=True, timeout=int(TIMEOUT * 1000))

    def forget(handle):
        pass

else:
    raise SystemExit(f"BENCH_JOBS_TOOL must be celery or dramatiq, not {TOOL!r}")


def _percentile(values, q):
    return values[min(len(values) - 1, int(len(values) * q))]


def _ready_wait(deadline_s: float) -> float:
    """Submit until a first result comes back (the workers are up): seconds it took."""
    t0 = time.perf_counter()
    last = None
    while time.perf_counter() - t0 < deadline_s:
        try:
            handle = submit(0)
            if wait(handle) == 0:
                return time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - worker not up yet
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"{TOOL} workers never answered in {deadline_s:g} s: {last!r}")


def _windowed(k: int, duration: float) -> tuple[float, int]:
    """Keep ``k`` jobs outstanding for ``duration`` s (oldest awaited, then one more
    submitted), then drain: (jobs/s counting only the completed ones, jobs done)."""
    outstanding = collections.deque()
    t0 = time.perf_counter()
    for i in range(k):
        outstanding.append((i, submit(i)))
    done = 0
    n = k
    while outstanding:
        i, handle = outstanding.popleft()
        if wait(handle) != i:
            raise RuntimeError(f"{TOOL}: wrong result for job {i}")
        done += 1
        if time.perf_counter() - t0 < duration:
            outstanding.append((n, submit(n)))
            n += 1
    return done / (time.perf_counter() - t0), done


def client(seq_calls: int, warmup_calls: int, duration: float, inflight: list[int]) -> None:
    ready_s = _ready_wait(60.0)
    # Warm both worker processes: a burst in flight, then sequential calls.
    _windowed(32, 0.5)
    for i in range(warmup_calls):
        wait(submit(i))
    print("READY", json.dumps({"first_result_s": ready_s}), flush=True)
    if sys.stdin.readline().strip() != "run":
        return
    lat = []
    clock = time.perf_counter
    t0 = clock()
    for i in range(seq_calls):
        s = clock()
        if wait(submit(i)) != i:
            raise RuntimeError(f"{TOOL}: wrong result")
        lat.append(clock() - s)
    elapsed = clock() - t0
    lat.sort()
    out = {"seq": {"rate": seq_calls / elapsed, "p50_us": _percentile(lat, 0.5) * 1e6,
                   "p99_us": _percentile(lat, 0.99) * 1e6, "n": seq_calls},
           "inflight": {}, "done": {}}
    for k in inflight:
        rate, done = _windowed(k, duration)
        out["inflight"][str(k)] = rate
        out["done"][str(k)] = done
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        seq, warm, dur, ks = sys.argv[2:6]
        try:
            client(int(seq), int(warm), float(dur), [int(k) for k in ks.split(",")])
        except Exception as exc:  # noqa: BLE001 - reported to the bench, not a traceback
            print("RESULT " + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            raise
