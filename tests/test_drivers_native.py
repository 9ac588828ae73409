"""native-server and native-sink through the engine's own RpcServer/RpcClient, fake app."""
from pathlib import Path

import pytest
import trio
from transport.errors import HandlerError, QueueFull, TimeoutError_
from transport.rpc import RpcClient

from engine.drivers.native import NativeServer, NativeSink
from engine.drivers.registry import OptionContext
from engine.drivers.testing import FakeApp
from engine.errors import DriverError, ManifestError
from engine.manifest import DriverSpec
from support import wait_until

pytestmark = pytest.mark.e2e   # each driver listens on loopback

CTX = OptionContext(file="m.json", path="drivers.n", base_dir=Path("."))


def make(cls, **raw):
    return cls(DriverSpec("n", cls.type_name, "work", cls.parse_options(raw, CTX)))


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:0", "nng+tcp://127.0.0.1:0"])
async def test_native_server_single_and_streamed_replies(endpoint):
    async def single(event, payload):
        if payload == "fail":
            raise ValueError("no")
        return {"event": event, "payload": payload}
    async def streamed(event, payload):
        for i in range(payload):
            yield i
    app = FakeApp(single)
    driver = make(NativeServer, endpoint=endpoint)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        with trio.fail_after(15):
            async with RpcClient(address, timeout=10) as client:
                assert await client.call("any", "ignored", 5) == {"event": "work", "payload": 5}
                with pytest.raises(HandlerError, match="no"):
                    await client.call("any", "x", "fail")
                app.handler = streamed
                assert [c async for c in client.stream("any", "x", 4)] == [0, 1, 2, 3]
        nursery.cancel_scope.cancel()
    assert driver.stats.done == 2 and driver.stats.errors == 1


async def test_native_server_queue_full_and_no_endpoint():
    release = trio.Event()
    async def handler(event, payload):
        await release.wait()
    app = FakeApp(handler, queue_limit=1)
    driver = make(NativeServer, endpoint="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        with trio.fail_after(15):
            async with RpcClient(address, timeout=10) as client, trio.open_nursery() as calls:
                calls.start_soon(client.call, "a", "b", 1)
                await wait_until(lambda: app.in_flight == 1, "the first call's job runs")
                with pytest.raises(QueueFull):
                    await client.call("a", "b", 2)
                release.set()  # the first call then completes before the client closes
        # without an endpoint the driver binds nothing; the node's control endpoint serves the app
        bare = make(NativeServer)
        assert await nursery.start(bare.run, app) is None
        assert bare.info()["endpoint"] == "(node control)"
        nursery.cancel_scope.cancel()
    assert driver.stats.skipped == 1


async def test_native_server_answers_from_the_job_and_a_caller_giving_up_cancels_it():
    async def slow(event, payload):
        await trio.sleep(payload)
        return payload
    app = FakeApp(slow)
    driver = make(NativeServer, endpoint="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        with trio.fail_after(15):
            async with RpcClient(address, timeout=10) as client:
                assert await client.call("a", "b", 0) == 0
                with pytest.raises(TimeoutError_):
                    await client.call("a", "b", 30, timeout=0.2)
                await wait_until(lambda: app.submitted[1].cancelled, "the CANCEL reaches the job")
                assert driver.server.inflight == 0
                assert driver.server._idle == []  # answered from callbacks: no worker task
        nursery.cancel_scope.cancel()
    assert app.submitted[0].cancelled is False


async def test_native_sink_acks_and_publishes():
    app = FakeApp()
    driver = make(NativeSink, endpoint="tcp://127.0.0.1:0", publish=True)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        with trio.fail_after(15):
            async with RpcClient(address, timeout=10) as client:
                for i in range(3):
                    assert await client.call("", "", i) is None
            await wait_until(lambda: len(app.published) == 3, "the three outcomes are published")
        nursery.cancel_scope.cancel()
    assert [p["result"] for _, p in app.published] == [0, 1, 2]


async def test_native_port_taken_and_options():
    driver = make(NativeSink, endpoint="nng+tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, FakeApp())
        for cls in (NativeServer, NativeSink):
            again = make(cls, endpoint=address)
            with pytest.raises(DriverError, match="cannot listen"):
                await nursery.start(again.run, FakeApp())
        nursery.cancel_scope.cancel()
    with pytest.raises(ManifestError) as info:
        NativeSink.parse_options({}, CTX)
    assert info.value.path == "drivers.n.endpoint"
    with pytest.raises(ManifestError):
        NativeServer.parse_options({"endpoint": "http://x"}, CTX)
