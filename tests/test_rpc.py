"""RpcServer/RpcClient over real nng sockets and framed streams on loopback."""
import logging
from functools import partial

import pynng
import pytest
import trio

from support import wait_until
from transport.codec import Kind, decode, encode
from transport.errors import (BadMessage, Closed, HandlerError, QueueFull, TimeoutError_,
                              Unreachable)
from transport.rpc import Deferred, RpcClient, RpcServer, Stream
from transport.streams import FramedStream

pytestmark = pytest.mark.e2e


class Boom(Exception):
    pass


async def handler(req):
    if req.event == "echo":
        return req.payload
    if req.event == "count":
        async def items():
            for i in range(req.payload):
                yield {"i": i}
        return Stream(items())
    if req.event == "boom":
        raise Boom("it broke")
    if req.event == "sleep":
        await trio.sleep(req.payload)
        return "slept"
    if req.event == "target":
        return req.target
    raise KeyError(req.event)


@pytest.fixture(params=["nng-tcp", "stream-tcp", "stream-unix"])
def address(request, tmp_path):
    return {
        "nng-tcp": "nng+tcp://127.0.0.1:0",
        "stream-tcp": "tcp://127.0.0.1:0",
        "stream-unix": f"ipc://{tmp_path}/rpc.sock",
    }[request.param]


@pytest.fixture
async def server(nursery, address):
    srv = RpcServer(address, handler)
    await nursery.start(srv.run)
    return srv


async def test_echo_value_and_target(server):
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            assert await client.call("app", "echo", {"a": [1, 2, b"x"]}) == {"a": [1, 2, b"x"]}
            assert await client.call("myapp", "target") == "myapp"


async def test_stream_chunks_in_order(server):
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            got = [c async for c in client.stream("app", "count", 50)]
            assert got == [{"i": i} for i in range(50)]
            # call() on a streamed reply collects the chunks
            assert await client.call("app", "count", 3) == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_handler_exception_reaches_caller_typed(server):
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            with pytest.raises(HandlerError) as info:
                await client.call("app", "boom")
            assert info.value.type == "Boom" and "it broke" in info.value.message
            # the server lives on
            assert await client.call("app", "echo", 1) == 1


async def test_timeout_cancels_server_side_work(server):
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            with pytest.raises(TimeoutError_):
                await client.call("app", "sleep", 30, timeout=0.2)
            await wait_until(lambda: server.inflight == 0, "the CANCEL stops the handler")


async def test_many_in_flight_are_batched_and_all_answered(server):
    results = {}
    with trio.fail_after(20):
        async with RpcClient(server.address) as client:
            async def one(i):
                results[i] = await client.call("app", "echo", i)
            async with trio.open_nursery() as n:
                for i in range(1000):
                    n.start_soon(one, i)
    assert results == {i: i for i in range(1000)}


async def test_max_inflight_refuses_with_queue_full(nursery, address):
    srv = RpcServer(address, handler, max_inflight=2)
    await nursery.start(srv.run)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as client:
            async with trio.open_nursery() as n:
                n.start_soon(client.call, "app", "sleep", 0.5)
                n.start_soon(client.call, "app", "sleep", 0.5)
                await wait_until(lambda: srv.inflight == 2, "both sleeps run on the server")
                with pytest.raises(QueueFull):
                    await client.call("app", "echo", 1)


async def test_server_vanishing_fails_pending_calls_unreachable(address):
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            srv = RpcServer(address, handler)
            with trio.CancelScope() as server_scope:
                pass
            async def run_server(task_status=trio.TASK_STATUS_IGNORED):
                nonlocal server_scope
                with trio.CancelScope() as server_scope:
                    await srv.run(task_status=task_status)
            await outer.start(run_server)
            async with RpcClient(srv.address) as client:
                await client.wait_connected()
                async def stop_soon():
                    await wait_until(lambda: srv.inflight == 1, "the call is in flight")
                    server_scope.cancel()
                outer.start_soon(stop_soon)
                with pytest.raises(Unreachable):
                    await client.call("app", "sleep", 30)


@pytest.mark.parametrize("nobody", ["nng+tcp://127.0.0.1:1", "tcp://127.0.0.1:1"])
async def test_unreachable_server_times_out(nobody):
    with trio.fail_after(10):
        async with RpcClient(nobody) as client:
            with pytest.raises(TimeoutError_):
                await client.call("app", "echo", 1, timeout=0.3)


async def test_garbage_and_malformed_requests_do_not_crash_server(nursery):
    server = RpcServer("nng+tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(10):
        # An ill-shaped request is answered on its sid; the connection lives on.
        with pynng.Pair1(dial=server.address.removeprefix("nng+")) as raw:
            raw.send(encode([(Kind.REQUEST, 7, "not-a-list")]))
            [(kind, sid, body)] = decode(await trio.to_thread.run_sync(raw.recv))
            assert (kind, sid, body["code"]) == (Kind.ERROR, 7, BadMessage.code)
            raw.send(encode([(Kind.REQUEST, 8, ["app", "echo", "again"])]))
            assert decode(await trio.to_thread.run_sync(raw.recv)) == [(Kind.RESULT, 8, "again")]
        # A frame that cannot be read is answered on sid 0, and its pipe closed.
        with pynng.Pair1(dial=server.address.removeprefix("nng+")) as raw:
            raw.send(b"\xc1garbage")
            [(kind, sid, body)] = decode(await trio.to_thread.run_sync(raw.recv))
            assert (kind, sid, body["code"]) == (Kind.ERROR, 0, BadMessage.code)
        async with RpcClient(server.address) as client:
            assert await client.call("app", "echo", "still fine") == "still fine"
        assert server.bad_frames == 1


async def test_unencodable_payload_is_a_typed_error_not_a_crash(server):
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            with pytest.raises(BadMessage):
                await client.call("app", "echo", object())


async def test_stream_link_reconnects_after_server_restart(tmp_path):
    address = f"ipc://{tmp_path}/again.sock"
    with trio.fail_after(10):
        async with RpcClient(address) as client:
            for attempt in range(2):
                async with trio.open_nursery() as n:
                    srv = RpcServer(address, handler)
                    await n.start(srv.run)
                    await client.wait_connected()
                    assert await client.call("app", "echo", attempt) == attempt
                    n.cancel_scope.cancel()
                await wait_until(lambda: not client.connected, "the client sees the server gone")


async def test_stream_link_garbage_framing_drops_only_that_connection(nursery):
    srv = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(srv.run)
    host, port = srv.address.rsplit("//", 1)[1].rsplit(":", 1)
    with trio.fail_after(10):
        bad = await trio.open_tcp_stream(host, int(port))
        await bad.send_all(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
        async with RpcClient(srv.address) as client:
            assert await client.call("app", "echo", "ok") == "ok"
        assert srv.bad_frames == 1
        await bad.aclose()


@pytest.mark.parametrize("link", ["tcp", "ipc"])
async def test_long_stream_to_a_slow_reader_arrives_whole(nursery, tmp_path, link):
    address = "tcp://127.0.0.1:0" if link == "tcp" else f"ipc://{tmp_path}/long.sock"
    srv = RpcServer(address, handler)
    await nursery.start(srv.run)
    with trio.fail_after(30):
        async with RpcClient(srv.address) as client:
            got = []
            async for chunk in client.stream("app", "count", 20_000):
                got.append(chunk["i"])
                if len(got) % 2000 == 0:
                    await trio.sleep(0.05)  # a reader slower than the producer
            assert got == list(range(20_000))


async def test_flush_waits_for_answers_in_flight(nursery):
    srv = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(srv.run)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as client:
            async with trio.open_nursery() as n:
                n.start_soon(client.call, "app", "sleep", 0.3)
                await wait_until(lambda: srv.inflight, "the call is in flight")
                await srv.flush()
                assert srv.inflight == 0 and srv.served == 1


async def test_reply_stream_says_whether_it_streamed(server):
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            single = client.stream("app", "echo", 1)
            assert single.streamed is None          # nothing arrived yet
            assert [x async for x in single] == [1] and single.streamed is False
            stream = client.stream("app", "count", 1)
            chunks = stream.__aiter__()
            assert await chunks.__anext__() == {"i": 0}
            assert stream.streamed is True          # a one-chunk stream is still a stream
            await chunks.aclose()


async def test_a_stream_left_early_runs_its_cleanup_at_once(nursery):
    cleaned = trio.Event()
    inflight_during_cleanup = []

    async def endless(req):
        async def items():
            try:
                while True:
                    yield "tick"   # never awaits: the server waits for room instead
            finally:
                inflight_during_cleanup.append(srv.inflight)
                cleaned.set()
        return Stream(items())

    # high_water 1: after every chunk the server waits for its writer, so the CANCEL
    # lands in the server's wait, outside the generator
    srv = RpcServer("tcp://127.0.0.1:0", endless, high_water=1)
    await nursery.start(srv.run)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as client:
            async with client.stream("app", "ticks") as replies:
                async for tick in replies:
                    break          # the caller leaves: CANCEL goes to the server
            await cleaned.wait()
    # closed by the request's own worker, still counted in flight: not left to the
    # garbage collector's finalizer, which would run it later, elsewhere
    assert inflight_during_cleanup == [1]


@pytest.mark.parametrize("size", [300_000, 12_000_000])  # (under the 16 MiB max_message)
async def test_a_large_lone_request_and_answer_arrive_whole(server, size):
    # A lone frame is written straight to the socket when the link is idle; one bigger
    # than the socket's buffer is only half written then, and the rest must still go.
    async with RpcClient(server.address) as client:
        with trio.fail_after(10):
            assert await client.call("", "echo", b"x" * size) == b"x" * size
            assert await client.call("", "echo", "small") == "small"


class Later:
    """An awaitable that is neither a coroutine nor a Stream nor a Deferred."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield from trio.sleep(0).__await__()
        return self.value


async def test_any_awaitable_a_handler_returns_is_awaited(nursery):
    srv = RpcServer("tcp://127.0.0.1:0", lambda req: Later(req.payload))
    await nursery.start(srv.run)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as client:
            assert await client.call("", "later", {"x": 1}) == {"x": 1}


async def test_a_stream_of_another_servers_reply_is_relayed_and_closed(nursery):
    # Stream(items) where items is an async iterable, not an iterator: its iterator
    # (here ReplyStream's generator) is what the server closes, not the iterable.
    inner = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(inner.run)
    with trio.fail_after(10):
        async with RpcClient(inner.address) as inner_client:
            relay = RpcServer("tcp://127.0.0.1:0",
                              lambda req: Stream(inner_client.stream("", "count", req.payload)))
            await nursery.start(relay.run)
            async with RpcClient(relay.address) as client:
                assert await client.call("", "relay", 3) == [{"i": 0}, {"i": 1}, {"i": 2}]
                async with client.stream("", "relay", 10**6) as replies:
                    async for _ in replies:
                        break  # left early: the relay's worker closes the inner stream
                await wait_until(lambda: inner.inflight == 0 and relay.inflight == 0,
                                 "the CANCEL reaches the inner server through the relay")
                assert relay.failed == 0


async def test_failing_on_cancel_is_counted_and_logged_once(nursery, caplog):
    def broken_cancel():
        raise RuntimeError("on_cancel bug")

    def deferring(req):
        return Deferred(on_cancel=broken_cancel) if req.event == "forever" else req.payload

    srv = RpcServer("tcp://127.0.0.1:0", deferring)
    await nursery.start(srv.run)
    with trio.fail_after(10), caplog.at_level(logging.ERROR, logger="transport.rpc.server"):
        async with RpcClient(srv.address) as client:
            for n in (1, 2):
                client.start("", "forever").cancel()  # CANCEL: the Deferred's on_cancel
                await wait_until(lambda: srv.cancel_errors == n, "the CANCEL is handled")
            assert srv.inflight == 0
            assert await client.call("", "echo", "still fine") == "still fine"
    logged = [r for r in caplog.records if r.name == "transport.rpc.server"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "on_cancel bug" in caplog.text


async def test_server_counts_a_connection_with_garbage_framing(nursery, caplog):
    srv = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(srv.run)
    host, port = srv.address.rsplit("//", 1)[1].rsplit(":", 1)
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="transport.rpc.server"):
        for n in (1, 2):
            bad = await trio.open_tcp_stream(host, int(port))
            await bad.send_all(b"\xff\xff\xff\xff")  # a frame longer than any allowed
            said = b""
            while chunk := await bad.receive_some():  # the server says why, then hangs up
                said += chunk
            await bad.aclose()
            [(kind, sid, body)] = decode(said[4:])
            assert (kind, sid, body["code"]) == (Kind.ERROR, 0, BadMessage.code)
            assert srv.bad_frames == n
    logged = [r for r in caplog.records if r.name == "transport.rpc.server"]
    assert len(logged) == 1 and "RpcServer.bad_frames" in logged[0].getMessage()


async def _fake_server(nursery, serve):
    """A tcp:// server speaking raw frames: ``serve(stream)`` per connection."""
    async def connection(raw):
        stream = FramedStream(raw)
        try:
            await serve(stream)
        except Closed:
            pass
        finally:
            stream.close()

    listeners = await nursery.start(partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
    return f"tcp://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def _requests(stream):
    while True:
        for frame in await stream.recv_many():
            for kind, sid, body in decode(frame):
                if kind == Kind.REQUEST:
                    yield sid, body


async def test_client_counts_corrupt_frames_and_logs_the_first(nursery, caplog):
    async def garbage_then_answer(stream):
        async for sid, body in _requests(stream):
            await stream.send(b"\xc1garbage")  # not msgpack: answers nobody
            await stream.send(encode([(Kind.RESULT, sid, body[2])]))

    address = await _fake_server(nursery, garbage_then_answer)
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="transport.rpc.client"):
        async with RpcClient(address) as client:
            # however each frame is read (by the reader, or polled by the lone call)
            assert await client.call("", "echo", 1) == 1
            assert await client.call("", "echo", 2) == 2
            assert client.bad_frames == 2
    logged = [r for r in caplog.records if r.name == "transport.rpc.client"]
    assert len(logged) == 1 and "RpcClient.bad_frames" in logged[0].getMessage()


async def test_client_counts_garbage_framing_and_fails_its_calls(nursery):
    async def bad_length(stream):
        async for _ in _requests(stream):
            await stream.stream.send_all(b"\xff\xff\xff\xff")

    address = await _fake_server(nursery, bad_length)
    with trio.fail_after(10):
        async with RpcClient(address) as client:
            with pytest.raises(Unreachable):
                await client.call("", "echo", 1)
            assert client.bad_frames == 1


async def test_a_channel_streamed_and_left_early_is_closed(nursery):
    send, receive = trio.open_memory_channel(1)
    srv = RpcServer("tcp://127.0.0.1:0", lambda req: Stream(receive))
    await nursery.start(srv.run)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as client:
            send.send_nowait("first")
            async with client.stream("", "feed") as replies:
                async for item in replies:
                    assert item == "first"
                    break  # CANCEL: the server's worker closes the channel's receiving end
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await send.send("more")
