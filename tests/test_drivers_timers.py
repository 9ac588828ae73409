"""Timer and cron drivers against a fake app, on trio's MockClock (the ``autojump_clock``
fixture of tests/conftest.py): every sleep here is virtual time."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio

from engine.drivers.cron import CronDriver, count_between, next_fire
from engine.drivers.registry import OptionContext
from engine.drivers.testing import FakeApp
from engine.drivers.timers import DriftingTimer, RecurringTimer
from engine.errors import ManifestError
from engine.manifest import DriverSpec

CTX = OptionContext(file="manifest.json", path="drivers.t", base_dir=Path("."))


def spec(cls, raw, emit="tick"):
    return DriverSpec(name="t", type=cls.type_name, emit=emit, options=cls.parse_options(raw, CTX))


def sleeper(seconds):
    async def handler(event, payload):
        await trio.sleep(seconds)
        return payload
    return handler


async def run_for(driver, app, seconds):
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_recurring_timer_overlaps_slow_jobs(autojump_clock):
    peak = [0]
    async def slow(event, payload):
        peak[0] = max(peak[0], app.in_flight)
        await trio.sleep(2.5)
    app = FakeApp(slow)
    driver = RecurringTimer(spec(RecurringTimer, {"interval": 1000}))
    await run_for(driver, app, 10.2)
    assert driver.stats.ticks == 10 and driver.stats.skipped == 0
    assert [j.event for j in app.submitted] == ["tick"] * 10
    assert peak[0] == 3  # jobs overlap: a tick does not wait for the previous job
    assert driver.info()["done"] == 7  # ticks 1..7 finished by t=10.2


async def test_recurring_timer_skips_when_queue_full(autojump_clock):
    app = FakeApp(sleeper(100), queue_limit=2)
    driver = RecurringTimer(spec(RecurringTimer, {"interval": 500}))
    await run_for(driver, app, 5.2)
    assert driver.stats.ticks == 10
    assert driver.stats.submitted == 2 and driver.stats.skipped == 8


async def test_recurring_timer_counts_late_wakeups_as_skipped(autojump_clock):
    app = FakeApp()
    driver = RecurringTimer(spec(RecurringTimer, {"interval": 1000}))
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        await trio.sleep(1.5)
        autojump_clock.jump(3.0)  # the node stalled for 3 s: ticks at 2, 3, 4 are late
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    assert driver.stats.submitted == 2  # t=1 and one catch-up tick, not a burst of three
    assert driver.stats.skipped == 2


async def test_drifting_timer_runs_one_at_a_time_and_drifts(autojump_clock):
    app = FakeApp(sleeper(2.0))
    driver = DriftingTimer(spec(DriftingTimer, {"interval": 1000}))
    start = trio.current_time()
    times = []
    async def handler(event, payload):
        times.append(trio.current_time() - start)
        assert app.in_flight == 1
        await trio.sleep(2.0)
    app.handler = handler
    await run_for(driver, app, 10.5)
    assert times == pytest.approx([1, 4, 7, 10])
    assert driver.stats.done == 3 and driver.stats.skipped == 0


async def test_drifting_timer_counts_failures_and_keeps_going(autojump_clock):
    async def boom(event, payload):
        raise ValueError("nope")
    app = FakeApp(boom)
    driver = DriftingTimer(spec(DriftingTimer, {"interval": 1000}))
    await run_for(driver, app, 3.5)
    assert driver.stats.errors == 3
    assert "ValueError" in driver.info()["last_error"]


@pytest.mark.parametrize("raw, field", [
    ({}, "interval"), ({"interval": 0}, "interval"), ({"interval": "5"}, "interval"),
    ({"interval": True}, "interval"), ({"interval": 5, "intervl": 3}, "intervl"),
])
def test_timer_options_rejected_with_field_path(raw, field):
    with pytest.raises(ManifestError) as info:
        RecurringTimer.parse_options(raw, CTX)
    assert info.value.path == f"drivers.t.{field}"


def test_cron_next_fire_and_missed_count():
    t0 = datetime(2024, 1, 1, 0, 3, tzinfo=timezone.utc)
    assert next_fire("*/5 * * * *", t0) == t0.replace(minute=5)
    assert count_between("*/5 * * * *", t0, t0 + timedelta(minutes=17)) == 4  # :05 :10 :15 :20


def test_cron_timezone_applies():
    opts = CronDriver.parse_options({"schedule": "0 9 * * *", "timezone": "Europe/Paris"}, CTX)
    after = datetime(2024, 7, 1, 0, 0, tzinfo=opts.tz)
    fire = next_fire(opts.schedule, after)
    assert fire.astimezone(timezone.utc).hour == 7  # 9:00 CEST


@pytest.mark.parametrize("raw, field", [
    ({}, "schedule"), ({"schedule": "* * * *"}, "schedule"), ({"schedule": "0 0 * * * *"}, "schedule"),
    ({"schedule": "61 * * * *"}, "schedule"), ({"schedule": "* * * * *", "timezone": "Mars/Base"}, "timezone"),
])
def test_cron_options_rejected(raw, field):
    with pytest.raises(ManifestError) as info:
        CronDriver.parse_options(raw, CTX)
    assert info.value.path == f"drivers.t.{field}"


async def test_cron_fires_on_schedule_from_wall_clock(autojump_clock):
    base = datetime(2024, 1, 1, 0, 3, 30, tzinfo=timezone.utc)
    t0 = trio.current_time()
    app = FakeApp()
    driver = CronDriver(spec(CronDriver, {"schedule": "*/5 * * * *"}))
    driver.now = lambda tz: (base + timedelta(seconds=trio.current_time() - t0)).astimezone(tz)
    await run_for(driver, app, 16 * 60)
    assert [j.payload["scheduled"] for j in app.submitted] == [
        "2024-01-01T00:05:00+00:00", "2024-01-01T00:10:00+00:00", "2024-01-01T00:15:00+00:00"]
    assert driver.stats.skipped == 0 and driver.info()["next"] == "2024-01-01T00:20:00+00:00"


async def test_cron_counts_missed_fire_times_after_wall_clock_jump(autojump_clock):
    base = datetime(2024, 1, 1, 0, 0, 30, tzinfo=timezone.utc)
    t0 = trio.current_time()
    offset = [0.0]
    app = FakeApp()
    driver = CronDriver(spec(CronDriver, {"schedule": "* * * * *"}))
    driver.now = lambda tz: base + timedelta(seconds=trio.current_time() - t0 + offset[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        await trio.sleep(40)              # fired at 00:01
        offset[0] = 10 * 60               # suspend: wall clock leaps 10 minutes
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert driver.stats.submitted == 2    # 00:01, then 00:02 fired late once
    assert driver.stats.skipped == 9      # 00:03 .. 00:11 missed
