"""An app stops only when asked (issue 12, item 3): its parts (each driver, the pool,
the maintenance channel) fail alone; each is recorded and started again with backoff.
In process, with fake pools and drivers, on trio's MockClock: the backoff costs no
real time, and its delays are read off the virtual clock."""
from __future__ import annotations

import itertools
import json
from typing import Any

import pynng
import pytest
import trio

from engine.app import App
from engine.drivers import registry
from engine.drivers.base import Driver, DriverHost
from engine.errors import DriverError, ShuttingDown
from engine.faults import Backoff
from engine.manifest import load_manifest
from engine.node.maintenance import split_frame
from engine.node.node import Node
from support import wait_until
from transport.sockets import TrioSocket

_names = itertools.count()


class Script:
    """What the fake parts do, run by run: "crash" (start, then raise), "refuse" (raise
    before starting), "end" (start, then return), "serve" (start and run)."""

    def __init__(self, *runs: str) -> None:
        self.runs = list(runs)
        self.started_at: list[float] = []
        self.release: trio.Event | None = None   # "held-crash" waits for it

    def next(self) -> str:
        return self.runs.pop(0) if self.runs else "serve"


SCRIPT = Script()


class FlakyDriver(Driver[None]):
    @staticmethod
    def parse_options(raw: Any, ctx: Any) -> None:
        return None

    async def run(self, app: DriverHost, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        what = SCRIPT.next()
        if what == "refuse":
            raise DriverError("port 1 is taken")
        SCRIPT.started_at.append(trio.current_time())
        self.stats.ticks += 1
        task_status.started()
        if what == "held-crash":
            assert SCRIPT.release is not None
            await SCRIPT.release.wait()
            what = "crash"
        if what == "crash":
            await trio.sleep(0.1)
            raise RuntimeError("a driver bug")
        if what == "end":
            return
        await trio.sleep_forever()


class FakePool:
    """A Pool (engine.pool.base) that runs no jobs; its run follows POOL_SCRIPT."""
    made: list["FakePool"] = []

    def __init__(self, manifest: Any) -> None:
        self.app_name = manifest.name
        self.done = self.failed = self.cancelled = self.crashes = 0
        self.running = False
        FakePool.made.append(self)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        what = POOL_SCRIPT.next()
        self.running = True
        try:
            task_status.started()
            if what == "crash":
                await trio.sleep(0.1)
                raise RuntimeError("a pool bug")
            await trio.sleep_forever()
        finally:
            self.running = False

    def use_zygote(self, zygote: Any) -> None:
        pass

    def submit(self, event: str, payload: Any = None, chunks: Any = None) -> Any:
        if not self.running:
            raise ShuttingDown("not running")
        return (self, event, payload)

    async def drain(self, timeout: float) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"state": "running", "slaves": [], "faults": {}, "recent_faults": []}

    def crashlog(self) -> list[str]:
        return []


POOL_SCRIPT = Script()


@pytest.fixture(autouse=True)
def scripts():
    global SCRIPT, POOL_SCRIPT
    registry.register("test-faults-flaky")(FlakyDriver)
    SCRIPT, POOL_SCRIPT = Script(), Script()
    FakePool.made.clear()
    yield


def manifest(tmp_path, drivers: bool = True):
    folder = tmp_path / f"app{next(_names)}"
    folder.mkdir()
    (folder / "app.py").write_text("")
    data: dict[str, Any] = {"pubsub": {"endpoint": f"inproc://test-app-parts-{next(_names)}"}}
    if drivers:
        data["drivers"] = {"flaky": {"type": "test-faults-flaky", "emit": "e"}}
    (folder / "manifest.json").write_text(json.dumps(data))
    return load_manifest(folder)


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_long_run():
    b = Backoff(first=0.5, cap=4.0, stable_after=30.0)
    assert [b.failed(1.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.failed(31.0) == 0.5
    assert b.failed(None) == 1.0   # a start that failed is a failure in a row


async def test_a_driver_that_fails_while_running_is_started_again_with_backoff(tmp_path, autojump_clock):
    global SCRIPT
    SCRIPT = Script("held-crash", "crash", "crash")
    SCRIPT.release = trio.Event()
    app = App(manifest(tmp_path), pool_factory=FakePool)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            sub = TrioSocket(pynng.Sub0(dial=app.maintenance.address))
            sub.sock.subscribe(b"")
            # nng connects the subscriber on its own threads, in real time, while the
            # mock clock runs ahead: the first crash waits until a state message has
            # come through, so no fault is published before anyone listens.
            await sub.recv()
            released_at = trio.current_time()
            SCRIPT.release.set()
            await wait_until(lambda: len(SCRIPT.started_at) == 4, "the fourth start")
            starts = [released_at, *SCRIPT.started_at[1:]]
            gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
            assert gaps == [0.6, 1.1, 2.1]       # 0.1 s of running, then 0.5, 1, 2 s of backoff
            info = app.info()
            assert app.state == "running" and info["state"] == "running"
            assert info["restarts"] == {"driver flaky": 3}
            assert info["faults"] == {"driver-crash": 3}
            assert info["drivers"]["flaky"]["restarts"] == 3
            assert info["drivers"]["flaky"]["ticks"] == 4   # the counters carry on
            assert [f["kind"] for f in info["recent_faults"]] == ["driver-crash"] * 3
            assert "RuntimeError: a driver bug" in info["recent_faults"][0]["reason"]
            published = []
            while len(published) < 3:
                topic, body = split_frame(await sub.recv())
                if topic == "fault":
                    published.append(body)
            assert [body["part"] for body in published] == ["driver flaky"] * 3
            assert app.submit("e", 1)[1:] == ("e", 1)   # the app served throughout
            sub.close()
            await app.stop(1)
    assert app.state == "stopped"


@pytest.mark.parametrize("runs, kinds", [
    (("end",), {"driver-ended": 1}),
    (("crash", "refuse", "refuse"), {"driver-crash": 1, "driver-start": 2}),
])
async def test_a_driver_that_ends_or_cannot_start_again_is_retried(tmp_path, autojump_clock, runs, kinds):
    global SCRIPT
    SCRIPT = Script(*runs)
    app = App(manifest(tmp_path), pool_factory=FakePool)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            await wait_until(lambda: len(SCRIPT.started_at) == 2 and not SCRIPT.runs,
                             "the driver serves again")
            assert app.info()["faults"] == kinds
            await app.stop(1)


async def test_a_driver_that_cannot_start_at_first_still_fails_the_apps_start(tmp_path, autojump_clock):
    global SCRIPT
    SCRIPT = Script("refuse")
    app = App(manifest(tmp_path), pool_factory=FakePool)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with pytest.raises(DriverError, match="port 1 is taken"):
                await nursery.start(app.run)
    assert app.state == "stopped" and not FakePool.made[0].running


async def test_a_pool_that_fails_is_replaced_by_a_fresh_one(tmp_path, autojump_clock):
    global POOL_SCRIPT
    POOL_SCRIPT = Script("crash")
    app = App(manifest(tmp_path, drivers=False), pool_factory=FakePool)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            first = app.pool
            await wait_until(lambda: len(FakePool.made) == 2 and app.pool.running,
                             "a fresh pool runs")
            assert app.pool is not first and not first.running
            assert app.submit("e", 1)[0] is app.pool
            assert app.info()["faults"] == {"pool-crash": 1}
            await app.stop(1)


async def test_an_app_asked_to_stop_while_a_part_backs_off_stops_at_once(tmp_path, autojump_clock):
    global SCRIPT
    SCRIPT = Script("crash", "crash", "crash", "crash", "crash", "crash", "crash")
    app = App(manifest(tmp_path), pool_factory=FakePool)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(app.run)
            await wait_until(lambda: app.restarts.get("driver flaky", 0) >= 5, "five restarts")
            before = trio.current_time()
            await app.stop(1)
            assert trio.current_time() - before < 2   # not after the 8 s backoff
    assert app.state == "stopped"


class FailingApp(App):
    """Its first run fails after it started, whole (as a bug in App itself would)."""
    runs = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        FailingApp.runs += 1
        if FailingApp.runs == 1:
            task_status.started(self)
            await trio.sleep(0.1)
            raise RuntimeError("the whole app failed")
        await super().run(task_status=task_status)


async def test_an_app_that_fails_whole_is_started_again_by_its_node(tmp_path, autojump_clock):
    FailingApp.runs = 0
    node = Node(control=None, app_factory=lambda m: FailingApp(m, pool_factory=FakePool))
    m = manifest(tmp_path, drivers=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            first = await node.deploy(m)
            await wait_until(lambda: node.apps.get(m.name) is not first
                             and node.apps[m.name].state == "running", "a fresh app runs")
            assert node.app_failures == 1 and FailingApp.runs == 2
            await node.undeploy(m.name)
            await wait_until(lambda: m.name not in node.apps, "the app is gone")
            await node.shutdown()


async def test_the_maintenance_channel_publishes_each_fault_once():
    """A pool's faults reach the channel through the app's info, with the next state.

    On trio's real clock with a short interval: nng delivers on its own threads, which a
    MockClock cannot see, so an autojumping clock ran out the test's deadline while a
    frame was on its way (5 of 20 runs)."""
    from engine.node.maintenance import MaintenanceChannel

    class Reporting:
        name = "demo"
        recent: list[dict[str, Any]] = []

        def info(self) -> dict[str, Any]:
            return {"name": "demo", "state": "running", "pool": {}, "drivers": {},
                    "faults": {"slave-died": len(self.recent)}, "recent_faults": list(self.recent)}

    app = Reporting()
    channel = MaintenanceChannel(app, f"inproc://test-app-parts-{next(_names)}", interval=0.02)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(channel.run)
            sub = TrioSocket(pynng.Sub0(dial=address))
            sub.sock.subscribe(b"")
            got: list[tuple[str, Any]] = []
            for seq in (1, 2):
                app.recent = [*app.recent, {"seq": seq, "part": "slave 7", "kind": "slave-died",
                                            "reason": "killed", "time": 0.0}]
                # Read on until a state shows this fault, and one more state after it:
                # states published before the fault was added may still be queued (the
                # mock clock runs the channel ahead while this task waits on the socket).
                seen = None
                while True:
                    topic, body = split_frame(await sub.recv())
                    got.append((topic, body))
                    if topic != "state":
                        continue
                    if seen is not None:
                        break
                    if body["faults"] == {"slave-died": seq}:
                        seen = body
            sub.close()
            nursery.cancel_scope.cancel()
    faults = [body["seq"] for topic, body in got if topic == "fault"]
    assert faults == [1, 2]                       # each once, though every state repeats them
    assert [body["faults"] for topic, body in got if topic == "state"][-1] == {"slave-died": 2}
