"""Sockend: browser-like websocket clients (trio-websocket, in this process) against a
Sockend child process bridging to a mesh Responder and Publisher (child processes),
all on loopback with discovery confined to a per-run UDP port and key.

- request round trips: one websocket, ``{"id", "type": "echo", "data": {"p": ...}}``,
  sequential p50/p99 and throughput in flight (ids multiplex one connection);
- fan-out: ``CLIENTS`` websockets connected, then a Publisher publishes ``events``
  ``tick`` events; deliveries/s over all clients, first to last, and how many were
  missed (skipped by Sockend for slow clients, or lost).
"""
from __future__ import annotations

import itertools
import json
import os
import time
from contextlib import AsyncExitStack
from typing import Any

import trio

from .harness import Settings, child_process, free_udp_port, measure_rr, python_child

CLIENTS = 100
CONNECTIONS = 8         # request callers share these: at most 256 / 8 in flight on each
FANOUT_EVENTS = 250     # under Sockend's per-browser event buffer (256): nothing need be skipped


def available() -> str | None:
    try:
        import trio_websocket  # noqa: F401

        from sockend.bridge import TransportMesh  # noqa: F401
        from sockend.server import Sockend, SockendConfig  # noqa: F401
    except ImportError as exc:
        return f"skipped: sockend not importable ({exc})"
    return None


class _WsCaller:
    """Requests multiplexed by id over one websocket; a reader task routes answers."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, trio.Event] = {}
        self.answers: dict[int, Any] = {}

    async def reader(self) -> None:
        while True:
            frame = json.loads(await self.ws.get_message())
            rid = frame.get("id")
            if rid in self.waiting:
                self.answers[rid] = frame
                self.waiting.pop(rid).set()

    async def call(self) -> None:
        rid = next(self.ids)
        done = self.waiting[rid] = trio.Event()
        await self.ws.send_message(json.dumps({"id": rid, "type": "echo",
                                               "data": {"p": "x" * 32}}))
        await done.wait()
        frame = self.answers.pop(rid)
        if not frame.get("ok"):
            raise RuntimeError(f"sockend answered an error: {frame.get('error')}")


async def sockend_bench(settings: Settings) -> dict[str, Any]:
    from trio_websocket import open_websocket_url

    port, key = free_udp_port(), f"bench-{os.getpid()}"
    out: dict[str, Any] = {}
    async with child_process(python_child("bench.servers", "mesh-responder", port, key)), \
            child_process(python_child("bench.servers", "sockend", port, key)) as sockend:
        url = f"ws://127.0.0.1:{sockend.ready}/"
        async with AsyncExitStack() as stack:
            # Sockend allows 64 requests in flight per connection (docs/sockend.md), so
            # the callers are spread over several connections, as browsers would be.
            nursery = await stack.enter_async_context(trio.open_nursery())
            callers = []
            for _ in range(CONNECTIONS):
                ws = await stack.enter_async_context(open_websocket_url(url))
                callers.append(_WsCaller(ws))
                nursery.start_soon(callers[-1].reader)
            with trio.fail_after(10):   # until discovery has found the Responder
                while True:
                    try:
                        await callers[0].call()
                        break
                    except RuntimeError:
                        await trio.sleep(0.05)
            turn = itertools.cycle(callers)
            try:
                out["rr"] = await measure_rr(lambda: next(turn).call, settings)
            except* RuntimeError as group:   # an error answer: report it, go on to fan-out
                out["rr"] = f"error: {group.exceptions[0]}"[:300]
            nursery.cancel_scope.cancel()
        out["fanout"] = await _fanout(url, port, key, FANOUT_EVENTS)
    return out


async def _fanout(url: str, port: int, key: str, events: int) -> dict[str, Any]:
    from trio_websocket import open_websocket_url

    counts = {"received": 0, "skipped": 0, "first": 0.0, "last": 0.0}
    expected = events * CLIENTS

    async def client(ready: trio.Event, connected: list[int]) -> None:
        async with open_websocket_url(url) as ws:
            connected.append(1)
            if len(connected) == CLIENTS:
                ready.set()
            while True:
                frame = json.loads(await ws.get_message())
                event = frame.get("event")
                if event == "tick":
                    now = time.perf_counter()
                    if not counts["received"]:
                        counts["first"] = now
                    counts["received"] += 1
                    counts["last"] = now
                elif event == "$skipped":
                    counts["skipped"] += int((frame.get("data") or {}).get("count", 0))
                if counts["received"] + counts["skipped"] >= expected:
                    done.cancel()

    async with trio.open_nursery() as nursery:
        done = nursery.cancel_scope
        ready, connected = trio.Event(), []
        for _ in range(CLIENTS):
            nursery.start_soon(client, ready, connected)
        with trio.fail_after(20):
            await ready.wait()
        async with child_process(python_child("bench.servers", "mesh-publisher",
                                              port, key, events)):
            with trio.move_on_after(30):
                seen, idle = -1, 0.0
                while idle < 1.5:       # a quiet spell once started: whatever is missing is lost
                    await trio.sleep(0.1)
                    idle = 0.0 if counts["received"] != seen or not seen > 0 else idle + 0.1
                    seen = counts["received"]
        done.cancel()
    secs = counts["last"] - counts["first"]
    return {"clients": CLIENTS, "events": events, "received": counts["received"],
            "skipped": counts["skipped"], "missed": expected - counts["received"],
            "deliveries_per_s": (counts["received"] - 1) / secs if secs > 0 else 0.0}
