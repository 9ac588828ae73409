"""manual-scheduler: firing order on MockClock, the control verb, and --at parsing."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
from transport.errors import BadMessage, QueueFull, UnknownEvent

from engine.drivers.registry import OptionContext
from engine.drivers.scheduler import ManualScheduler, parse_when, schedule_verb
from engine.drivers.testing import FakeApp
from engine.manifest import DriverSpec

CTX = OptionContext(file="m.json", path="drivers.later", base_dir=Path("."))


def make(**raw):
    return ManualScheduler(DriverSpec("later", "manual-scheduler", "due", ManualScheduler.parse_options(raw, CTX)))


async def test_events_fire_when_due_in_order(autojump_clock):
    app = FakeApp()
    driver = make(**{"max-pending": 4})
    fired = []
    async def handler(event, payload):
        fired.append((round(trio.current_time()), payload))
    app.handler = handler
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        driver.schedule(10, "b")
        driver.schedule(5, "a")
        await trio.sleep(1)               # virtual time (autojump_clock), as all waits here
        driver.schedule(1, "first")       # earlier than everything queued: wakes the driver
        driver.schedule(0, "now")
        with pytest.raises(QueueFull):
            driver.schedule(1, "too many")
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert fired == [(1, "now"), (2, "first"), (5, "a"), (10, "b")]
    assert driver.info()["pending"] == 0 and driver.stats.done == 4


def test_parse_when():
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert parse_when(in_=2.5) == 2.5
    assert parse_when(at="2030-01-01T00:01:00+00:00", now=now) == 60
    assert parse_when(at="2029-01-01T00:00:00+00:00", now=now) == 0  # past: due at once
    for bad in [dict(), dict(in_=1, at="x"), dict(in_=-1), dict(in_=True), dict(at="tomorrow")]:
        with pytest.raises(BadMessage):
            parse_when(**bad)


async def test_schedule_verb(autojump_clock):
    driver = make()
    class Node:
        def get(self, name):
            assert name == "app"
            return type("A", (), {"drivers": {"later": driver, "other": object()}})()
    async with trio.open_nursery() as nursery:
        app = FakeApp()
        await nursery.start(driver.run, app)
        reply = await schedule_verb(Node(), {"app": "app", "driver": "later", "in": 3, "payload": {"k": 1}})
        assert reply["id"] == 1 and "due" in reply
        with pytest.raises(UnknownEvent):
            await schedule_verb(Node(), {"app": "app", "driver": "other", "in": 3})
        with pytest.raises(BadMessage):
            await schedule_verb(Node(), {"app": "app"})
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [j.payload for j in app.submitted] == [{"k": 1}]
