"""``python -m engine top [--node ADDR] [--once]``: every app, its pool and its drivers.

Finds the apps with the node's ``list`` verb and each app's maintenance channel in
its ``info`` (``pubsub``), subscribes to their ``state`` topic, and redraws a table
as states arrive.  An app whose channel is silent or missing is shown from its
``info`` reply instead (marked ``*``).  ``--once`` prints one snapshot and exits.
"""
from __future__ import annotations

import argparse
import time
from typing import AbstractSet

import pynng
import trio
from transport.errors import CodecError
from transport.sockets import TrioSocket

from engine.cli.common import EXIT_OK, Runner, command, connect_node, node_options
from engine.node.maintenance import STATE_TOPIC, RateMeter, split_frame, state_of

CLEAR = "\x1b[H\x1b[2J"


def render(states: dict[str, dict], *, polled: AbstractSet[str] = frozenset(), now: float | None = None) -> str:
    """Pure: the table for a set of app states (maintenance ``state`` bodies)."""
    now = time.time() if now is None else now
    head = f"{'APP':<20} {'STATE':<9} {'SLAVES':>6} {'QUEUE':>5} {'RUN':>4} {'JOBS/S':>8} {'DONE':>8} {'ERR':>5} {'P50MS':>7}"
    lines = [head]
    for name in sorted(states):
        s = states[name]
        lat = (s.get("latency_ms") or {}).get("p50")
        mark = "*" if name in polled else ""
        lines.append(f"{(name + mark)[:20]:<20} {str(s.get('state'))[:9]:<9} {s.get('slaves', 0):>6} "
                     f"{s.get('queue', 0):>5} {s.get('running', 0):>4} {s.get('jobs_per_s', 0):>8.1f} "
                     f"{s.get('done', 0):>8} {s.get('errors', 0):>5} {'-' if lat is None else f'{lat:.1f}':>7}")
        for dname, d in sorted((s.get("drivers") or {}).items()):
            extra = f" last error: {d['last_error']}"[:60] if d.get("last_error") else ""
            lines.append(f"  {dname[:18]:<18} {str(d.get('type'))[:18]:<18} ticks {d.get('ticks', 0):<7} "
                         f"skipped {d.get('skipped', 0):<5} errors {d.get('errors', 0):<5} "
                         f"in flight {d.get('in_flight', 0)}{extra}")
    if not states:
        lines.append("(no apps)")
    return "\n".join(lines)


async def _discover(client) -> tuple[dict[str, dict], dict[str, str]]:
    """(app -> info, app -> maintenance endpoint) from the node's list/info verbs."""
    listing = await client.list()
    infos, endpoints = {}, {}
    for name in (listing.get("apps") or {}):
        try:
            info = await client.info(name)
        except Exception:
            continue  # undeployed meanwhile
        infos[name] = info
        endpoint = info.get("pubsub")
        if isinstance(endpoint, dict):
            endpoint = endpoint.get("endpoint")
        if isinstance(endpoint, str):
            endpoints[name] = endpoint
    return infos, endpoints


async def _follow(name: str, endpoint: str, states: dict[str, dict], changed: trio.Event) -> None:
    sock = TrioSocket(pynng.Sub0())
    try:
        sock.sock.subscribe(STATE_TOPIC.encode() + b"\0")
        sock.sock.dial(endpoint, block=False)
        while True:
            try:
                topic, body = split_frame(await sock.recv())
            except CodecError:
                continue
            if topic == STATE_TOPIC and isinstance(body, dict):
                states[name] = body
                changed.set()
    finally:
        sock.close()


async def snapshot(client, *, wait: float = 3.0) -> tuple[dict[str, dict], set[str]]:
    """One state per app: from its channel if it speaks within ``wait`` s, else from info."""
    infos, endpoints = await _discover(client)
    states: dict[str, dict] = {}
    changed = trio.Event()
    async with trio.open_nursery() as nursery:
        for name, endpoint in endpoints.items():
            nursery.start_soon(_follow, name, endpoint, states, changed)
        with trio.move_on_after(wait if endpoints else 0):
            while len(states) < len(endpoints):
                await changed.wait()
                changed = trio.Event()
        nursery.cancel_scope.cancel()
    polled = set()
    for name, info in infos.items():
        if name not in states:
            states[name] = state_of(_Info(info), 0, RateMeter(), 0.0)
            polled.add(name)
    return states, polled


class _Info:
    def __init__(self, info: dict):
        self._info, self.name = info, info.get("name", "?")

    def info(self) -> dict:
        return self._info


def _draw(text: str) -> None:
    # Flush every frame: piped into `tee` or a pager, stdout is block-buffered and a
    # live view would otherwise show nothing until it exits.
    print(text, flush=True)


async def live(client, *, interval: float = 1.0, out=_draw) -> None:
    """Redraw until cancelled (Ctrl-C); rediscover apps every few seconds."""
    while True:
        infos, endpoints = await _discover(client)
        states: dict[str, dict] = {}
        changed = trio.Event()
        async with trio.open_nursery() as nursery:
            for name, endpoint in endpoints.items():
                nursery.start_soon(_follow, name, endpoint, states, changed)
            with trio.move_on_after(max(5.0, interval * 5)):
                while True:
                    polled = {n for n in infos if n not in states}
                    shown = dict(states)
                    for n in polled:
                        shown[n] = state_of(_Info(infos[n]), 0, RateMeter(), 0.0)
                    out(CLEAR + render(shown, polled=polled))
                    await trio.sleep(interval)
            nursery.cancel_scope.cancel()


@command("top", "a live view of every app, its pool and its drivers")
def top_command(p: argparse.ArgumentParser) -> Runner:
    node_options(p, timeout=10.0)
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="redraw period")

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as client:
            if args.once:
                states, polled = await snapshot(client)
                print(render(states, polled=polled))
            else:
                try:
                    await live(client, interval=args.interval)
                except KeyboardInterrupt:
                    pass
        return EXIT_OK
    return run
