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
from typing import Any, Mapping, Protocol

import trio
from transport.errors import BadMessage, QueueFull, UnknownEvent

from engine.drivers.base import Driver, DriverHost, run_job_quietly
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_number
from engine.drivers.registry import register


# How far ahead an event may be scheduled: a century (its due time must stay a datetime;
# an 'in' of 1e308 or an 'at' in the year 9999 west of UTC would not).
MAX_DELAY = 100 * 365.25 * 86400


@dataclass(frozen=True)
class SchedulerOptions:
    max_pending: int = 10_000


def parse_when(in_: Any = None, at: Any = None, *, now: datetime | None = None) -> float:
    """Seconds from now until the event is due, from exactly one of ``in_`` / ``at``."""
    if (in_ is None) == (at is None):
        raise BadMessage("schedule needs exactly one of 'in' (seconds) or 'at' (ISO-8601 time)")
    if in_ is not None:
        if isinstance(in_, bool) or not isinstance(in_, (int, float)) or not 0 <= in_ <= MAX_DELAY:
            raise BadMessage(f"'in' must be a non-negative number of seconds, at most a century "
                             f"({MAX_DELAY:.0f}), got {in_!r:.60}")
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
    delay = max(0.0, (when - now).total_seconds())
    if delay > MAX_DELAY:
        raise BadMessage(f"'at' must be at most a century from now, got {at!r:.60}")
    return delay


@register("manual-scheduler")
class ManualScheduler(Driver[SchedulerOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self._heap: list[tuple[float, int, Any]] = []   # (trio deadline, id, payload)
        self._ids = itertools.count(1)
        self._changed = trio.Event()

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> SchedulerOptions:
        check_keys(raw, ctx, ["max-pending"])
        return SchedulerOptions(max_pending=opt_number(raw, ctx, "max-pending", default=10_000,
                                                       minimum=1, integer=True))

    def schedule(self, delay: float, payload: Any = None, *, now: float | None = None) -> dict[str, Any]:
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

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
                job = self.submit_or_skip(app, payload)
                if job is not None:
                    jobs.start_soon(run_job_quietly, job, self.stats)

    def details(self) -> dict[str, Any]:
        return {"pending": len(self._heap)}


# -- the node side: the control verb (in every node's table, engine/node/verbs.py) -----

class DriversOfApp(Protocol):
    """An app as the verb sees it (:class:`engine.app.App`): its running drivers."""

    @property
    def drivers(self) -> Mapping[str, Driver[Any]]: ...


class AppsOfNode(Protocol):
    """A node as the verb sees it (:class:`engine.node.node.Node`): its apps by name
    (``get`` raises AppNotFound)."""

    def get(self, name: str) -> DriversOfApp: ...


async def schedule_verb(node: AppsOfNode, args: Any) -> dict[str, Any]:
    if not isinstance(args, dict) or not isinstance(args.get("app"), str) or not isinstance(args.get("driver"), str):
        raise BadMessage('schedule expects {"app", "driver", "in" | "at", "payload"}')
    driver = node.get(args["app"]).drivers.get(args["driver"])
    if not isinstance(driver, ManualScheduler):
        raise UnknownEvent(f"app {args['app']} has no manual-scheduler driver {args['driver']!r}")
    now = datetime.now(timezone.utc)
    return driver.schedule(parse_when(args.get("in"), args.get("at"), now=now), args.get("payload"),
                           now=now.timestamp())


# -- the caller side: from a handler, or any Python code --------------------------------

async def schedule(driver: str, *, in_: float | None = None, at: str | None = None, payload: Any = None,
                   app: str | None = None, node: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
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
        reply: dict[str, Any] = await client.verb("schedule", args, timeout=timeout)
    return reply
