"""``cron``: fire on a 5-field cron schedule (minute hour day-of-month month day-of-week).

Parsing and "next fire time" come from croniter (ranges, steps, names, DST).  The
schedule is read in ``timezone`` (an IANA name, default UTC), so ``0 9 * * 1-5`` means
9:00 local time on weekdays, across DST changes.

The driver sleeps until the next fire time by the *wall clock*, re-reading it at least
every 30 s: a wall clock that jumps (NTP, suspend) neither fires early nor loses the
schedule; the fire time it was waiting for fires late once.  Fire times missed entirely (the node was suspended, or the pool refused the
job) are counted as skipped, never fired late in a burst.  The payload is
``{"tick": n, "scheduled": ISO-8601 fire time}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio
from croniter import croniter

from engine.drivers.base import Driver, DriverHost, run_job_quietly
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_str
from engine.drivers.registry import register

MAX_MISSED_COUNTED = 10_000  # bound the catch-up loop after a very long suspend
# trio sleeps on a monotonic clock; waking at least this often (seconds) lets the
# driver notice a wall clock that jumped forward while it slept.
MAX_SLEEP = 30.0


@dataclass(frozen=True)
class CronOptions:
    schedule: str
    timezone: str = "UTC"

    @property
    def tz(self) -> tzinfo:
        return timezone.utc if self.timezone == "UTC" else ZoneInfo(self.timezone)


def next_fire(schedule: str, after: datetime) -> datetime:
    """The first fire time strictly after ``after`` (an aware datetime), in its zone."""
    return _next(croniter(schedule, after))


def count_between(schedule: str, after: datetime, until: datetime) -> int:
    """How many fire times fall in ``(after, until]`` (capped)."""
    it = croniter(schedule, after)
    n = 0
    while n < MAX_MISSED_COUNTED and _next(it) <= until:
        n += 1
    return n


def _next(it: croniter) -> datetime:
    fire: datetime = it.get_next(datetime)   # croniter is untyped: say what it returns
    return fire


@register("cron")
class CronDriver(Driver[CronOptions]):
    # The wall clock, replaceable in tests (which derive it from trio's MockClock).
    now: Callable[[tzinfo], datetime] = staticmethod(datetime.now)

    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.next_at: datetime | None = None

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> CronOptions:
        check_keys(raw, ctx, ["schedule", "timezone"])
        schedule = opt_str(raw, ctx, "schedule")
        if len(schedule.split()) != 5 or not croniter.is_valid(schedule):
            raise ctx.error("schedule", "a 5-field cron expression like '*/5 * * * *'", schedule)
        tz = opt_str(raw, ctx, "timezone", default="UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long to look up
            raise ctx.error("timezone", "an IANA time zone name like 'Europe/Paris'", tz) from None
        return CronOptions(schedule=schedule, timezone=tz)

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        schedule, tz = self.options.schedule, self.options.tz
        async with trio.open_nursery() as jobs:
            task_status.started()
            target = next_fire(schedule, self.now(tz))
            while True:
                self.next_at = target
                while (remaining := (target - self.now(tz)).total_seconds()) > 0:
                    await trio.sleep(min(remaining, MAX_SLEEP))
                now = self.now(tz)
                self._fire(app, jobs, target)
                missed = count_between(schedule, target, now)
                if missed:
                    self.stats.ticks += missed
                    self.stats.skipped += missed
                target = next_fire(schedule, max(now, target))

    def _fire(self, app: DriverHost, jobs: trio.Nursery, target: datetime) -> None:
        self.stats.ticks += 1
        job = self.submit_or_skip(app, {"tick": self.stats.ticks, "scheduled": target.isoformat()})
        if job is not None:
            jobs.start_soon(run_job_quietly, job, self.stats)

    def details(self) -> dict[str, Any]:
        return {"schedule": self.options.schedule, "timezone": self.options.timezone,
                "next": self.next_at.isoformat() if self.next_at else None}
