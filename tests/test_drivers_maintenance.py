"""The maintenance pubsub channel: state at least once a second, sink results, framing.

In process: the channels here listen on nng's ``inproc://`` (the channel does not care
which transport; TCP is tests/test_drivers_live.py's, through a real node)."""
import pynng
import pytest
import trio
from transport.sockets import TrioSocket

from engine.node.maintenance import INTERVAL, MaintenanceChannel, RateMeter, frame, split_frame


class InfoApp:
    name = "demo"

    def __init__(self):
        self.done = 0

    def info(self):
        return {"name": "demo", "state": "running",
                "pool": {"slaves": [{"id": 1}], "queue": 2, "running": 1, "done": self.done, "failed": 1},
                "drivers": {"t": {"type": "recurring-timer", "ticks": 5, "skipped": 2}}}


def test_frame_roundtrip_and_rate():
    assert split_frame(frame("result.x", {"a": b"\0"})) == ("result.x", {"a": b"\0"})
    meter = RateMeter()
    assert meter.update(0.0, 10) == 0.0
    assert meter.update(2.0, 30) == 10.0


async def test_channel_publishes_state_and_results():
    app = InfoApp()
    channel = MaintenanceChannel(app, "inproc://maintenance-results", interval=0.05)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(channel.run)
        sub = TrioSocket(pynng.Sub0(dial=address))
        sub.sock.subscribe(b"")
        got = []
        with trio.fail_after(15):
            while len([g for g in got if g[0] == "state"]) < 3:
                app.done += 10
                if len(got) == 1:
                    channel.publish("result.sink", {"result": 1})
                got.append(split_frame(await sub.recv()))
        sub.close()
        nursery.cancel_scope.cancel()
    states = [body for topic, body in got if topic == "state"]
    assert [s["seq"] for s in states] == sorted(s["seq"] for s in states)
    last = states[-1]
    assert last["app"] == "demo" and last["slaves"] == 1 and last["queue"] == 2
    assert last["ticks"] == 5 and last["skipped"] == 2 and last["errors"] == 1
    assert last["jobs_per_s"] > 0
    assert last["drivers"]["t"]["type"] == "recurring-timer"
    assert ("result.sink", {"result": 1}) in got


async def test_state_goes_out_once_a_second(autojump_clock):
    assert INTERVAL <= 1.0
    channel = MaintenanceChannel(InfoApp(), "inproc://maintenance-interval")
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        await trio.sleep(10 * INTERVAL + INTERVAL / 2)
        nursery.cancel_scope.cancel()
    assert channel.published == 11 and channel.dropped == 0   # at 0, 1, ..., 10 intervals


async def test_channel_port_taken():
    from engine.errors import DriverError
    from transport.sockets import bound_address
    with pynng.Pub0(listen="inproc://maintenance-taken") as squatter:
        channel = MaintenanceChannel(InfoApp(), bound_address(squatter))
        async with trio.open_nursery() as nursery:
            with pytest.raises(DriverError, match="cannot listen on inproc://maintenance-taken"):
                await nursery.start(channel.run)


def test_top_render_shows_apps_and_drivers():
    from engine.cli.top import render
    text = render({"demo": {"state": "running", "slaves": 2, "queue": 1, "running": 1, "jobs_per_s": 3.5,
                            "done": 10, "errors": 1, "latency_ms": {"p50": 1.25},
                            "drivers": {"t": {"type": "cron", "ticks": 4, "skipped": 1, "errors": 0,
                                              "in_flight": 0, "last_error": None}}}}, polled={"demo"})
    assert "demo*" in text and "3.5" in text and "1.2" in text
    assert "t " in text and "cron" in text and "skipped 1" in text
    assert render({}).endswith("(no apps)")


async def test_top_snapshot_reads_channels_and_falls_back_to_info():
    from engine.cli.top import render, snapshot
    app = InfoApp()
    channel = MaintenanceChannel(app, "inproc://maintenance-top", interval=0.05)

    class Client:
        async def list(self):
            return {"apps": {"demo": {}, "quiet": {}}}

        async def info(self, name):
            if name == "demo":
                return {**app.info(), "pubsub": channel.address}
            return {"name": "quiet", "state": "running", "pool": {}, "drivers": {}}

    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        with trio.fail_after(15):
            states, polled = await snapshot(Client(), wait=10)
        nursery.cancel_scope.cancel()
    assert states["demo"]["seq"] >= 1 and polled == {"quiet"}
    assert "quiet*" in render(states, polled=polled)
