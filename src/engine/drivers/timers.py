"""Time-driven drivers: ``recurring-timer`` and ``drifting-timer``.

recurring-timer
    Fires every ``interval`` ms on a fixed grid (start + n * interval), whatever
    earlier jobs are doing, so several can run at once up to the pool's limits.
    A tick the pool refuses (queue full) or that the node woke too late for is
    *skipped* and counted, never queued up for later: a timer never piles work on a
    saturated pool.
drifting-timer
    At most one job in flight: the next tick fires ``interval`` ms after the
    previous job finished, so the schedule drifts by the jobs' run time.

Both send the payload ``{"tick": n, "time": unix seconds}`` with the manifest's
``emit`` as the event.  Neither fires at start: the first tick is one interval in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio
from transport.errors import RemoteError

from engine.drivers.base import Driver, DriverHost, SubmittedJob, run_job, run_job_quietly
from engine.drivers.options import OptionContext, check_keys, opt_number
from engine.drivers.registry import register


@dataclass(frozen=True)
class TimerOptions:
    interval: float  # seconds


def _parse_interval(raw: Any, ctx: OptionContext) -> TimerOptions:
    check_keys(raw, ctx, ["interval"])
    ms = opt_number(raw, ctx, "interval", minimum=1)
    return TimerOptions(interval=ms / 1000.0)


class _Timer(Driver[TimerOptions]):
    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> TimerOptions:
        return _parse_interval(raw, ctx)

    def _submit(self, app: DriverHost) -> SubmittedJob | None:
        """Hand one tick to the pool; None (and a counted skip) if it has no room."""
        self.stats.ticks += 1
        return self.submit_or_skip(app, {"tick": self.stats.ticks, "time": time.time()})

    def details(self) -> dict[str, Any]:
        return {"interval_ms": self.options.interval * 1000}


@register("recurring-timer")
class RecurringTimer(_Timer):
    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        interval = self.options.interval
        async with trio.open_nursery() as jobs:
            task_status.started()
            deadline = trio.current_time() + interval
            while True:
                await trio.sleep_until(deadline)
                # If the node was too busy to wake us on time, whole intervals went
                # by: those ticks are skipped (counted), not fired in a burst.
                late = trio.current_time() - deadline
                missed = int(late // interval)
                if missed:
                    self.stats.ticks += missed
                    self.stats.skipped += missed
                deadline += (missed + 1) * interval
                job = self._submit(app)
                if job is not None:
                    jobs.start_soon(run_job_quietly, job, self.stats)


@register("drifting-timer")
class DriftingTimer(_Timer):
    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.options.interval)
            job = self._submit(app)
            if job is None:
                continue
            try:
                await run_job(job, self.stats)
            except RemoteError:
                pass  # counted in stats; the next tick still comes
