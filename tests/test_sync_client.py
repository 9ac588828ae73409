"""SyncRpcClient: the blocking client, against a real RpcServer (run in a thread here,
so the server's trio loop keeps running)."""
from __future__ import annotations

import pytest
import trio

from support import wait_until
from transport.errors import BadMessage, HandlerError, TimeoutError_, TransportError, Unreachable
from transport.rpc import RpcServer, Stream
from transport.sync_client import SyncRpcClient

pytestmark = pytest.mark.e2e

cleaned_up = []


async def handler(req):
    if req.event == "echo":
        return [req.target, req.payload]
    if req.event == "count":
        async def items():
            try:
                for i in range(req.payload):
                    yield i
                    await trio.sleep(0.01)
            finally:
                cleaned_up.append(req.payload)
        return Stream(items())
    if req.event == "sleep":
        await trio.sleep(req.payload)
        return "slept"
    raise ValueError(f"no {req.event}")


def in_thread(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


@pytest.fixture(params=["tcp", "unix"])
async def server(request, nursery, tmp_path):
    address = "tcp://127.0.0.1:0" if request.param == "tcp" else f"ipc://{tmp_path}/s.sock"
    srv = RpcServer(address, handler)
    await nursery.start(srv.run)
    return srv


async def test_calls_streams_and_typed_errors(server):
    def scenario():
        with SyncRpcClient(server.address, timeout=10) as client:
            assert client.call("app", "echo", {"b": b"x"}) == ["app", {"b": b"x"}]
            assert client.call("app", "count", 3) == [0, 1, 2]
            assert list(client.stream("app", "count", 4)) == [0, 1, 2, 3]
            assert list(client.stream("app", "echo", 1)) == [["app", 1]]
            with pytest.raises(HandlerError) as err:
                client.call("app", "nope")
            assert err.value.type == "ValueError"
            with pytest.raises(BadMessage):
                client.call("app", "echo", object())
            return client.call("app", "echo", "still fine")
    with trio.fail_after(20):
        assert await in_thread(scenario) == ["app", "still fine"]


async def test_timeout_cancels_on_the_server_and_the_late_answer_is_skipped(server):
    def scenario():
        with SyncRpcClient(server.address) as client:
            with pytest.raises(TimeoutError_):
                client.call("app", "sleep", 0.5, timeout=0.1)
            return client.call("app", "echo", "next", timeout=10)
    with trio.fail_after(20):
        assert await in_thread(scenario) == ["app", "next"]
        await wait_until(lambda: server.inflight == 0, "the CANCEL stops the sleeping handler")


async def test_leaving_a_stream_early_cancels_it(server):
    def scenario():
        with SyncRpcClient(server.address, timeout=10) as client:
            got = []
            for chunk in client.stream("app", "count", 1000):
                got.append(chunk)
                if len(got) == 3:
                    break
            return got, client.call("app", "echo", 2)
    cleaned_up.clear()
    with trio.fail_after(20):
        got, after = await in_thread(scenario)
        await wait_until(lambda: 1000 in cleaned_up, "the server's stream runs its cleanup")
    assert got == [0, 1, 2] and after == ["app", 2]


async def test_unreachable_then_reconnects(tmp_path):
    address = f"ipc://{tmp_path}/restart.sock"
    client = SyncRpcClient(address, timeout=5)
    with trio.fail_after(30):
        with pytest.raises(Unreachable):
            await in_thread(client.call, "app", "echo", 1)
        for attempt in range(2):  # a server, gone, then a new one on the same address
            async with trio.open_nursery() as nursery:
                await nursery.start(RpcServer(address, handler).run)
                assert await in_thread(client.call, "app", "echo", attempt) == ["app", attempt]
                nursery.cancel_scope.cancel()
            with pytest.raises(Unreachable):
                await in_thread(client.call, "app", "echo", 9)
    client.close()


def test_only_stream_addresses():
    with pytest.raises(TransportError, match="tcp:// and ipc://"):
        SyncRpcClient("nng+tcp://127.0.0.1:1")
