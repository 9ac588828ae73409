"""Timing checks that used to be assertions in the test suite (issue 11, item 6).

On a shared machine how soon or how fast something happens is a measurement, not a
pass/fail of the default suite: the tests keep the behaviour (it happens, in order,
nothing lost, nobody held back) and these rows keep the figures, with their targets.

- the first answer after the second of a Requester/Responder pair starts, in either
  start order (target < 300 ms; was tests/test_mesh.py);
- a Publisher beside a Subscriber that reads nothing: 20,000 events of 1 KB published,
  flushed every 200 (target < 5 s; was tests/test_mesh.py).

Everything runs in this process, on loopback, on a discovery port of its own.
"""
from __future__ import annotations

import time
from typing import Any

import trio

from .harness import Row, Settings, free_udp_port, verdict

FIRST_ANSWER_TARGET = 0.3          # s
FIRST_ANSWER_TRIES = 3             # best of: the machine is shared
SLOW_SUBSCRIBER_EVENTS = 20_000
SLOW_SUBSCRIBER_TARGET = 5.0       # s


def _discovery():
    from transport.mesh.discovery import DiscoveryConfig

    return DiscoveryConfig(port=free_udp_port(), interface="127.0.0.1")


async def _first_answer_once(last: str) -> float:
    from transport.mesh.requester import Requester
    from transport.mesh.responder import Responder

    cfg = _discovery()
    rep = Responder("timing-rep", responds_to=["echo"], discovery=cfg)

    @rep.on("echo")
    def echo(req):
        return req

    rq = Requester("timing-req", requests=["echo"], discovery=cfg)
    first, second = (rq, rep) if last == "responder" else (rep, rq)
    async with first:
        await trio.sleep(0.3)   # the first one's start-up hellos are over: a late joiner
        t0 = time.perf_counter()
        async with second:
            with trio.fail_after(5):
                await rq.send({"type": "echo"})
            return time.perf_counter() - t0


async def first_answer(settings: Settings) -> dict[str, float]:
    tries = 1 if settings.quick else FIRST_ANSWER_TRIES
    return {last: min([await _first_answer_once(last) for _ in range(tries)])
            for last in ("responder", "requester")}


async def slow_subscriber(settings: Settings) -> dict[str, Any]:
    from transport.mesh.pubsub import Publisher, Subscriber

    n = 2_000 if settings.quick else SLOW_SUBSCRIBER_EVENTS
    cfg = _discovery()
    async with Subscriber("slow", discovery=cfg, buffer=50, nng_buffer=4), \
            Publisher("pub", broadcasts=["tick"], discovery=cfg, nng_buffer=32) as pub:
        with trio.fail_after(10):
            while pub.subscribers < 1:
                await trio.sleep(0.01)
        blob = b"x" * 1000
        t0 = time.perf_counter()
        with trio.fail_after(60):
            for i in range(n):
                pub.publish("tick", (i, blob))
                if i % 200 == 0:
                    await pub.flush()
            await pub.flush()
        return {"events": n, "seconds": time.perf_counter() - t0}


def family_timing(settings: Settings, results, measure) -> None:
    """Rows for ``python -m bench`` (``measure`` is its ``_measure``)."""
    from . import mesh

    reason = mesh.available()
    if reason is not None:
        results.add(Row("timing", "mesh first answer / publisher beside a stalled subscriber",
                        verdict="SKIP", note=reason))
        return
    out, err = measure("timing: mesh first answer, either start order", first_answer, settings)
    results.figures["first_answer_s"] = out or err
    for last in ("responder", "requester"):
        name = f"mesh first answer, {last} started last (ms)"
        if out is None:
            results.add(Row("timing", name, verdict="FAIL", note=err))
            continue
        results.add(Row("timing", name, out[last] * 1000, None, "ms",
                        f"< {FIRST_ANSWER_TARGET * 1000:.0f} ms",
                        verdict(out[last] < FIRST_ANSWER_TARGET),
                        f"best of {1 if settings.quick else FIRST_ANSWER_TRIES}"))
    out, err = measure("timing: publisher beside a subscriber that reads nothing",
                       slow_subscriber, settings)
    results.figures["slow_subscriber"] = out or err
    name = "publish N x 1 KB beside a subscriber that reads nothing (s)"
    if out is None:
        results.add(Row("timing", name, verdict="FAIL", note=err))
        return
    target = SLOW_SUBSCRIBER_TARGET * out["events"] / SLOW_SUBSCRIBER_EVENTS
    results.add(Row("timing", name, out["seconds"], None, "s", f"< {target:g} s",
                    verdict(out["seconds"] < target), f"N = {out['events']:,}"))
