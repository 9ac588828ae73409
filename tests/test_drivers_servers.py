"""nng-server, nng-sink and raw-socket-server on real loopback sockets (e2e), with a fake
app; their option parsing and framers in process."""
import struct
from pathlib import Path

import msgpack
import pynng
import pytest
import trio

from engine.drivers.nng_server import NngServer
from engine.drivers.nng_sink import NngSink
from engine.drivers.raw_socket import (LengthPrefixedFramer, LineFramer, FrameTooLarge, RawSocketServer,
                                       encode_frame_reply)
from engine.drivers.registry import OptionContext, get
from engine.drivers.testing import FakeApp
from engine.errors import DriverError, ManifestError
from engine.manifest import DriverSpec
from transport.sockets import bound_address

from support import wait_until

CTX = OptionContext(file="m.json", path="drivers.s", base_dir=Path("."))


def make(cls, **raw):
    return cls(DriverSpec("s", cls.type_name, "request", cls.parse_options(raw, CTX)))


def sleeper(seconds):
    async def handler(event, payload):
        await trio.sleep(seconds)
        return {"echo": payload, "event": event}
    return handler


def req_call(address, payload, raw=False):
    with pynng.Req0(dial=address, recv_timeout=10_000, send_timeout=10_000) as sock:
        sock.send(payload if raw else msgpack.packb(payload))
        return msgpack.unpackb(sock.recv())


@pytest.mark.e2e
async def test_nng_server_answers_concurrently():
    n = 16
    all_in = trio.Event()

    async def barrier(event, payload):
        # No job finishes before all are in: served one at a time, this never returns.
        if app.in_flight == n:
            all_in.set()
        await all_in.wait()
        return {"echo": payload, "event": event}
    app = FakeApp(barrier)
    driver = make(NngServer, endpoint="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        results = {}
        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                for i in range(n):
                    async def one(i=i):
                        results[i] = await trio.to_thread.run_sync(req_call, address, {"n": i})
                    clients.start_soon(one)
        nursery.cancel_scope.cancel()
    assert results == {i: {"result": {"echo": {"n": i}, "event": "request"}} for i in range(n)}
    assert driver.info()["done"] == n


@pytest.mark.e2e
async def test_nng_server_error_maps():
    async def handler(event, payload):
        raise KeyError("missing")
    app = FakeApp(handler)
    driver = make(NngServer, endpoint="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        bad = await trio.to_thread.run_sync(req_call, address, b"\xc1", True)
        failed = await trio.to_thread.run_sync(req_call, address, [1, 2])
        nursery.cancel_scope.cancel()
    assert bad["error"]["code"] == "bad-message"
    assert failed["error"]["code"] == "handler" and failed["error"]["type"] == "KeyError"
    assert set(failed["error"]) == {"code", "type", "message", "retryable"}


@pytest.mark.e2e
async def test_nng_server_answers_queue_full_at_once():
    release = trio.Event()
    async def handler(event, payload):
        await release.wait()
    app = FakeApp(handler, queue_limit=1)
    driver = make(NngServer, endpoint="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        first = []

        async def ask_first():
            first.append(await trio.to_thread.run_sync(req_call, address, "first"))
        nursery.start_soon(ask_first)
        with trio.fail_after(10):
            await wait_until(lambda: app.in_flight == 1, "the first request's job runs")
            second = await trio.to_thread.run_sync(req_call, address, "second")
        release.set()
        await wait_until(lambda: first, "the first request is answered")
        nursery.cancel_scope.cancel()
    assert first[0]["result"] is None
    assert second["error"]["code"] == "queue-full" and second["error"]["retryable"] is True
    assert driver.stats.skipped == 1


@pytest.mark.e2e
async def test_nng_server_port_taken_is_driver_error():
    with pynng.Rep0(listen="tcp://127.0.0.1:0") as squatter:
        taken = bound_address(squatter)
        driver = make(NngServer, endpoint=taken)
        async with trio.open_nursery() as nursery:
            with pytest.raises(DriverError, match="cannot listen"):
                await nursery.start(driver.run, FakeApp())


def test_aliases_and_endpoint_validation():
    assert get("zeromq-server") is NngServer and get("zeromq-sink") is NngSink
    with pytest.raises(ManifestError) as info:
        NngServer.parse_options({"endpoint": "127.0.0.1:9"}, CTX)
    assert info.value.path == "drivers.s.endpoint"


@pytest.mark.e2e
async def test_nng_sink_runs_jobs_and_publishes_outcomes():
    app = FakeApp(sleeper(0))
    driver = make(NngSink, endpoint="tcp://127.0.0.1:0", publish=True)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        # Open until everything is in: closing a Push0 may drop what it still holds.
        with pynng.Push0(dial=address, send_timeout=10_000) as sock:
            def push():
                for i in range(5):
                    sock.send(msgpack.packb(i))
                sock.send(b"\xc1")  # garbage: counted, dropped
            await trio.to_thread.run_sync(push)
            await wait_until(lambda: len(app.published) == 5 and driver.stats.errors == 1,
                             "five outcomes are published and the garbage is counted")
        nursery.cancel_scope.cancel()
    assert sorted(p["payload"] for _, p in app.published) == list(range(5))
    assert {t for t, _ in app.published} == {"result.s"}
    assert app.published[0][1]["result"]["event"] == "request"
    assert driver.stats.errors == 1 and driver.stats.done == 5


@pytest.mark.e2e
async def test_nng_sink_holds_backpressure_instead_of_dropping():
    release = trio.Event()
    async def handler(event, payload):
        await release.wait()
        return payload
    app = FakeApp(handler, queue_limit=2)
    driver = make(NngSink, endpoint="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        def push():
            with pynng.Push0(dial=address, send_timeout=10_000) as sock:
                for i in range(20):
                    sock.send(msgpack.packb(i))
        nursery.start_soon(trio.to_thread.run_sync, push)
        await wait_until(lambda: driver.stats.held >= 1, "the sink holds a message back")
        assert len(app.submitted) == 2
        release.set()
        await wait_until(lambda: driver.stats.done == 20, "all twenty jobs are done")
        nursery.cancel_scope.cancel()
    assert sorted(j.payload for j in app.submitted) == list(range(20))


def test_framers():
    lf = LineFramer(8)
    assert lf.feed(b"ab\r\ncd") == [b"ab"] and lf.feed(b"\n\n") == [b"cd", b""]
    with pytest.raises(FrameTooLarge):
        LineFramer(4).feed(b"abcdefgh")
    pf = LengthPrefixedFramer(100)
    data = struct.pack(">I", 3) + b"abc" + struct.pack(">I", 0) + struct.pack(">I", 5) + b"xy"
    assert pf.feed(data[:5]) == [] and pf.feed(data[5:]) == [b"abc", b""]
    assert pf.feed(b"zzz") == [b"xyzzz"]
    with pytest.raises(FrameTooLarge):
        LengthPrefixedFramer(4).feed(struct.pack(">I", 5))


async def read_until(stream, count, sep=b"\n"):
    data = b""
    with trio.fail_after(10):
        while data.count(sep) < count:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data


@pytest.mark.e2e
async def test_raw_socket_line_framing_pipelined_in_order():
    async def handler(event, payload):
        if payload == "boom":
            raise ValueError("bad input")
        await trio.sleep(0.05 if payload == "slow" else 0)
        return payload.upper() if payload != "obj" else {"a": [1, 2]}
    app = FakeApp(handler)
    driver = make(RawSocketServer, endpoint="127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(driver.run, app)
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"slow\nfast\r\nboom\nobj\n")
        await stream.send_eof()
        data = await read_until(stream, 4)
        assert await stream.receive_some(10) == b""  # server closes after answering all
        nursery.cancel_scope.cancel()
    assert data == b'SLOW\nFAST\nERROR handler: bad input\n{"a": [1, 2]}\n'


@pytest.mark.e2e
async def test_raw_socket_length_prefixed_and_queue_full():
    release = trio.Event()
    async def handler(event, payload):
        await release.wait()
        return payload[::-1]
    app = FakeApp(handler, queue_limit=1)
    driver = make(RawSocketServer, endpoint="127.0.0.1:0", framing="length-prefixed")
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(driver.run, app)
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(struct.pack(">I", 3) + b"abc" + struct.pack(">I", 1) + b"z")
        await wait_until(lambda: driver.stats.skipped == 1, "the second frame is refused")
        release.set()
        data = b""
        with trio.fail_after(10):
            while len(data) < 8 + 4:
                data += await stream.receive_some(4096)
        nursery.cancel_scope.cancel()
    assert data[:8] == struct.pack(">I", 4) + b"\x00cba"
    assert data[8:13] == struct.pack(">I", len(data) - 12) + b"\x02"
    assert data[13:].startswith(b"queue-full")
    assert encode_frame_reply({"k": 1}) == struct.pack(">I", 5) + b"\x01" + msgpack.packb({"k": 1})


@pytest.mark.e2e
async def test_raw_socket_port_taken_and_oversize_frame():
    driver = make(RawSocketServer, endpoint="127.0.0.1:0", **{"max-frame": 4})
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(driver.run, FakeApp())
        again = make(RawSocketServer, endpoint=f"127.0.0.1:{port}")
        with pytest.raises(DriverError, match="cannot listen"):
            await nursery.start(again.run, FakeApp())
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(b"toolongline\n")
        data = await read_until(stream, 1)
        nursery.cancel_scope.cancel()
    assert data.startswith(b"ERROR bad-message")


def test_raw_socket_options():
    for raw, field in [({"endpoint": "nohost"}, "endpoint"), ({"endpoint": "h:1", "framing": "xml"}, "framing"),
                       ({"endpoint": "h:99999"}, "endpoint"), ({"endpoint": "h:1", "max-frame": 0}, "max-frame")]:
        with pytest.raises(ManifestError) as info:
            RawSocketServer.parse_options(raw, CTX)
        assert info.value.path == f"drivers.s.{field}"
