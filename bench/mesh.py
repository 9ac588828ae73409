"""The mesh components, the same shapes as the cote baseline:

- Requester (this process) -> Responder (child process) echo, found by discovery on
  loopback: sequential p50/p99 and throughput in flight;
- 100 tasks each awaiting ``Requester.send`` (the shape of cote's requester and of
  every service that fans out: the 1.5x target) and ``Requester.send_many`` with 100 in
  flight from one task (an extra row), against cote's requester with 100 in flight,
  head to head in interleaved rounds;
- Publisher (child process) -> Subscriber (this process, ``async for``): delivered
  events/s from first to last, and how many were lost;
- the RSS of an idle Responder process (a mesh component).
"""
from __future__ import annotations

import os
import time
from contextlib import aclosing, asynccontextmanager
from typing import Any, AsyncIterator

import trio

from .harness import (PAYLOAD, RRFigures, Settings, child_process, cpu_seconds, free_udp_port,
                      measure_rr, python_child, sequential, throughput)


def available() -> str | None:
    try:
        from transport.mesh.discovery import DiscoveryConfig  # noqa: F401
        from transport.mesh.pubsub import Publisher, Subscriber  # noqa: F401
        from transport.mesh.requester import Requester  # noqa: F401
        from transport.mesh.responder import Responder  # noqa: F401
    except ImportError as exc:
        return f"skipped: mesh components not importable ({exc})"
    return None


def _discovery(port: int):
    from transport.mesh.discovery import DiscoveryConfig

    return DiscoveryConfig(port=port, interface="127.0.0.1", hello_interval=0.2, expiry=1.0)


PIPELINE_WINDOW = 100


@asynccontextmanager
async def _echo_pair(memory: dict[str, float] | None = None) -> AsyncIterator[Any]:
    """A Responder echo in a child process and a Requester here that has found it."""
    from transport.mesh.requester import Requester

    port, key = free_udp_port(), f"bench-{os.getpid()}"
    async with child_process(python_child("bench.servers", "mesh-responder",
                                          port, key)) as responder:
        await trio.sleep(0.3)  # settle: the idle figure is after start-up allocations
        if memory is not None:
            memory["idle_responder"] = responder.rss_mb()
        async with Requester("bench-req", requests=["echo"], key=key,
                             discovery=_discovery(port), timeout=10,
                             max_pending=100_000) as requester:
            yield requester, responder


async def reqrep(settings: Settings) -> tuple[RRFigures, dict[str, float]]:
    """Per-caller figures (k tasks, each awaiting ``send``, like cote's requester's k
    async workers) and the responder's memory samples."""
    memory: dict[str, float] = {}
    async with _echo_pair(memory) as (requester, responder):
        request = {"type": "echo", "p": PAYLOAD}

        async def call():
            await requester.send(request)

        figures = await measure_rr(
            lambda: call, settings,
            after_warmup=lambda: memory.__setitem__("responder_after_warmup",
                                                    responder.rss_mb()))
        memory["responder_after_run"] = responder.rss_mb()
    return figures, memory


async def head_to_head(settings: Settings) -> dict[str, list]:
    """Ours against cote's, both pairs running all along, in ``settings.rounds``
    rounds taking turns (who goes first alternates): a moment of machine noise then
    touches one round of one side, not the whole comparison.  Each round: sequential
    round trips (rate, p50, p99), then ``PIPELINE_WINDOW`` tasks each awaiting
    ``Requester.send`` and ``Requester.send_many`` with ``PIPELINE_WINDOW`` in flight,
    each for ``settings.duration``, against cote's requester with as many in flight.  The sequential rounds also record the CPU both
    processes of each pair spent per round trip (ours poll instead of sleeping:
    transport/_spin.py)."""
    from . import cote

    request = {"type": "echo", "p": PAYLOAD}
    out: dict[str, list] = {"ours": [], "ours_callers": [], "cote": [], "ours_seq": [],
                            "cote_seq": [], "ours_seq_cpu_us": [], "cote_seq_cpu_us": []}
    async with _echo_pair() as (requester, responder), \
            cote.rounds_requester(PIPELINE_WINDOW) as theirs:
        async def call():
            await requester.send(request)

        await sequential(call, settings.warmup_calls)
        await send_many_rate(requester, request, PIPELINE_WINDOW, 0.3)  # warm-up
        await throughput(lambda: call, PIPELINE_WINDOW, 0.3)
        seq_calls = max(100, settings.seq_calls // 2)
        for i in range(settings.rounds):
            async def ours_round():
                pids = (os.getpid(), responder.pid)
                cpu = cpu_seconds(pids)
                out["ours_seq"].append(await sequential(call, seq_calls))
                out["ours_seq_cpu_us"].append((cpu_seconds(pids) - cpu) / seq_calls * 1e6)
                out["ours_callers"].append(await throughput(lambda: call, PIPELINE_WINDOW,
                                                            settings.duration))
                out["ours"].append(await send_many_rate(requester, request, PIPELINE_WINDOW,
                                                        settings.duration))

            async def cote_round():
                cpu = cpu_seconds(theirs.pids)
                out["cote_seq"].append(await theirs.sequential(seq_calls))
                out["cote_seq_cpu_us"].append((cpu_seconds(theirs.pids) - cpu) / seq_calls * 1e6)
                out["cote"].append(await theirs.inflight(settings.duration))

            for turn in ((cote_round, ours_round) if i % 2 else (ours_round, cote_round)):
                await turn()
    return out


async def send_many_rate(requester, request: dict, window: int, duration: float) -> float:
    """Answers/s from ``requester.send_many`` keeping ``window`` in flight for ``duration``."""
    clock = time.perf_counter
    deadline = clock() + duration

    def requests():
        while clock() < deadline:
            yield request

    answered = 0
    t0 = clock()
    async with aclosing(requester.send_many(requests(), window=window)) as answers:
        async for _ in answers:
            answered += 1
    return answered / (clock() - t0)


async def pubsub(settings: Settings) -> dict[str, Any]:
    from transport.mesh.pubsub import Subscriber

    port, key = free_udp_port(), f"bench-{os.getpid()}"
    n = settings.pubsub_messages
    counts = {"received": 0, "first": 0.0, "last": 0.0}
    async with Subscriber("bench-sub", subscribes_to=["tick"], key=key,
                          discovery=_discovery(port)) as subscriber:
        async with child_process(python_child("bench.servers", "mesh-publisher",
                                              port, key, n)) as publisher:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_count, subscriber, n, counts, nursery.cancel_scope)
                nursery.start_soon(_stop_when_quiet, counts, nursery.cancel_scope)
            published = await publisher.result(timeout=5)
            stats = dict(subscriber.stats)
    received = counts["received"]
    secs = counts["last"] - counts["first"]
    return {"rate": (received - 1) / secs if secs > 0 else 0.0, "received": received,
            "lost": n - received, "dropped": stats.get("dropped", 0),
            "publisher": published}


async def _count(subscriber, n: int, counts: dict[str, Any], done: trio.CancelScope) -> None:
    clock = time.perf_counter
    received = 0
    async for _event in subscriber:
        if received == 0:
            counts["first"] = clock()
        received += 1
        if received >= n:
            break
        if received & 1023 == 0:
            counts["received"], counts["last"] = received, clock()
    counts["received"], counts["last"] = received, clock()
    done.cancel()


async def _stop_when_quiet(counts: dict[str, Any], done: trio.CancelScope,
                           quiet: float = 1.0, first_within: float = 20.0) -> None:
    """Lost events would leave the counter waiting: stop after a quiet second."""
    await trio.sleep(first_within / 100)
    seen, idle = -1, 0.0
    while idle < (quiet if counts["received"] else first_within):
        await trio.sleep(0.1)
        idle = 0.0 if counts["received"] != seen else idle + 0.1
        seen = counts["received"]
    done.cancel()
