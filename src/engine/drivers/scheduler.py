"""``manual-scheduler``: events the app (or an operator) schedules for later.

Schedule one from the CLI: ``python -m engine schedule APP DRIVER --in 30 '{"k": 1}'``
or ``--at 2030-01-01T09:00:00+01:00``; from an ``async def`` handler::

    from engine.drivers.scheduler import schedule
    await schedule("later", in_=30, payload={"k": 1})   # app/node from ENGINE_APP/ENGINE_NODE

Both go through the node's control verb ``schedule`` with
``{"app", "driver", "in": seconds | "at": ISO-8601, "payload"}`` and get back
``{"id", "due"}``.  When due, the driver submits ``payload`` with its ``emit``; if the
pool has no room the event is skipped and counted.  Scheduled events live in the
node's memory only: they do not survive a restart of the node or an undeploy.
Option: ``max-pending`` (default 10000): more are refused with ``queue-full``.
"""
from __future__ import annotations

import heapq
import itertools
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import trio
from transport.errors import BadMessage, QueueFull, UnknownEvent

from engine.drivers.base import NO_ROOM, DriverStats, check_keys, opt_number, run_job_quietly
from engine.drivers.registry import OptionContext, register


@dataclass(frozen=True)
class SchedulerOptions:
    max_pending: int = 10_000


def parse_when(in_: Any = None, at: Any = None, *, now: datetime | None = None) -> float:
    """Seconds from now until the event is due, from exactly one of ``in_`` / ``at``."""
    if (in_ is None) == (at is None):
        raise BadMessage("schedule needs exactly one of 'in' (seconds) or 'at' (ISO-8601 time)")
    if in_ is not None:
        if isinstance(in_, bool) or not isinstance(in_, (int, float)) or not in_ >= 0:
            raise BadMessage(f"'in' must be a non-negative number of seconds, got {in_!r:.60}")
        return float(in_)
    try:
        when = datetime.fromisoformat(at) if isinstance(at, str) else None
    except ValueError:
        when = None
    if when is None:
        raise BadMessage(f"'at' must be an ISO-8601 time like 2030-01-01T09:00:00+00:00, got {at!r:.60}")
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is the node's local time
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


@register("manual-scheduler")
class ManualScheduler:
    def __init__(self, spec):
        self.spec = spec
        self.options: SchedulerOptions = spec.options
        self.stats = DriverStats()
        self._heap: list[tuple[float, int, Any]] = []   # (trio deadline, id, payload)
        self._ids = itertools.count(1)
        self._changed = trio.Event()
        self._app = None

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> SchedulerOptions:
        check_keys(raw, ctx, ["max-pending"])
        return SchedulerOptions(max_pending=opt_number(raw, ctx, "max-pending", default=10_000,
                                                       minimum=1, integer=True))

    def schedule(self, delay: float, payload: Any = None, *, now: float | None = None) -> dict:
        """Queue ``payload`` to fire in ``delay`` seconds (sync; raises QueueFull).
        ``now``: the wall-clock reading (unix s) ``delay`` was computed from, so the
        ``due`` reported for an ``at`` time is that time exactly."""
        if len(self._heap) >= self.options.max_pending:
            raise QueueFull(f"{self.spec.name}: {len(self._heap)} events already scheduled")
        event_id = next(self._ids)
        heapq.heappush(self._heap, (trio.current_time() + delay, event_id, payload))
        self._changed.set()
        due = (datetime.now(timezone.utc).timestamp() if now is None else now) + delay
        return {"id": event_id, "due": datetime.fromtimestamp(due, timezone.utc).isoformat()}

    async def run(self, app, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as jobs:
            task_status.started()
            while True:
                self._changed = trio.Event()
                if not self._heap:
                    await self._changed.wait()
                    continue
                deadline = self._heap[0][0]
                with trio.move_on_at(deadline):
                    await self._changed.wait()   # an earlier event may arrive meanwhile
                    continue
                _, event_id, payload = heapq.heappop(self._heap)
                self.stats.ticks += 1
                try:
                    job = app.submit(self.spec.emit, payload)
                except NO_ROOM:
                    self.stats.skipped += 1
                    continue
                self.stats.submitted += 1
                jobs.start_soon(run_job_quietly, job, self.stats)

    def info(self) -> dict:
        return {"type": "manual-scheduler", "emit": self.spec.emit, "pending": len(self._heap),
                **self.stats.as_dict()}


# -- the node side: the control verb ---------------------------------------------------

async def schedule_verb(node: Any, args: Any) -> dict:
    if not isinstance(args, dict) or not isinstance(args.get("app"), str) or not isinstance(args.get("driver"), str):
        raise BadMessage('schedule expects {"app", "driver", "in" | "at", "payload"}')
    app = node.get(args["app"])
    driver = getattr(app, "drivers", {}).get(args["driver"])
    if not isinstance(driver, ManualScheduler):
        raise UnknownEvent(f"app {args['app']} has no manual-scheduler driver {args['driver']!r}")
    now = datetime.now(timezone.utc)
    return driver.schedule(parse_when(args.get("in"), args.get("at"), now=now), args.get("payload"),
                           now=now.timestamp())


try:  # registered when the control module is importable (the node's side)
    from engine.node.control import verb as _verb
    _verb("schedule")(schedule_verb)
except ImportError:  # pragma: no cover
    pass


# -- the caller side: from a handler, or any Python code --------------------------------

async def schedule(driver: str, *, in_: float | None = None, at: str | None = None, payload: Any = None,
                   app: str | None = None, node: str | None = None, timeout: float = 10.0) -> dict:
    """Ask the node to fire ``driver``'s event later. ``app``/``node`` default to the
    ``ENGINE_APP``/``ENGINE_NODE`` environment of a slave."""
    from engine.client import connect

    app = app or os.environ.get("ENGINE_APP")
    node = node or os.environ.get("ENGINE_NODE")
    if not app or not node:
        raise RuntimeError("schedule(): pass app= and node=, or run inside a slave (ENGINE_APP/ENGINE_NODE)")
    args = {"app": app, "driver": driver, "payload": payload}
    args.update({"in": in_} if in_ is not None else {"at": at})
    async with connect(node, timeout=timeout) as client:
        return await client.verb("schedule", args, timeout=timeout)


def _register_cli() -> None:
    from engine.cli import commands as cli

    @cli.command("schedule", "schedule a manual-scheduler driver's event for later")
    def schedule_command(p):
        cli.node_options(p)
        p.add_argument("app")
        p.add_argument("driver")
        # The payload may follow the time (`--in 5 '{"k": 1}'`, the documented form):
        # on Python < 3.12 argparse hands an optional positional an empty match when it
        # sits after an option, so the time options collect it themselves.
        when = p.add_mutually_exclusive_group(required=True)
        when.add_argument("--in", dest="in_", nargs="+", metavar=("S", "JSON"), help="seconds from now")
        when.add_argument("--at", nargs="+", metavar=("ISO", "JSON"),
                          help="an ISO-8601 time (naive = the node's local time)")
        p.add_argument("payload", nargs="?", help="JSON payload (default null)")

        async def run(args) -> int:
            given = args.in_ if args.in_ is not None else args.at
            texts = given[1:] + ([args.payload] if args.payload is not None else [])
            if len(texts) > 1:
                raise SystemExit("error: schedule takes one JSON payload, got "
                                 + " ".join(repr(t) for t in texts))
            if args.in_ is not None:
                try:
                    when = {"in": float(given[0])}
                except ValueError:
                    raise SystemExit(f"error: --in expects seconds, got {given[0]!r}") from None
            else:
                when = {"at": given[0]}
            payload = cli._parse_json_arg(texts[0] if texts else None)
            async with cli.connect_node(args) as client:
                reply = await client.verb("schedule", {"app": args.app, "driver": args.driver,
                                                       "payload": payload, **when})
            print(cli.to_json(reply))
            return 0
        return run


try:
    _register_cli()
except ImportError:  # pragma: no cover
    pass
