"""An RpcServer against clients that break the protocol (issue 12, items 4 and 6).

Whatever one connection sends, its own accounting is exact (the server's in-flight
count goes back to 0 when it leaves, whatever it did), a protocol violation closes
that connection with an ``ERROR bad-message`` saying why (on the offending sid when
there is one, else on sid 0), and every other connection goes on as if nothing
happened.  Both link kinds: framed streams (``tcp://``) and nng Pair1 (``nng+tcp://``).
"""
from __future__ import annotations

import logging

import msgpack
import pynng
import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from support import wait_until
from transport._links import connect_stream
from transport.codec import Kind, decode, encode
from transport.errors import BadMessage, Closed, CodecError, QueueFull
from transport.rpc import Deferred, RpcClient, RpcServer
from transport.streams import FramedStream, frame_header

pytestmark = pytest.mark.e2e

REQ, CHUNK, CHOKE, CANCEL = Kind.REQUEST, Kind.CHUNK, Kind.CHOKE, Kind.CANCEL


class App:
    """A handler whose requests can be held open: ``hang`` (a Deferred nobody settles
    until the caller gives up), ``forever`` (a coroutine that never returns), ``echo``."""

    def __init__(self) -> None:
        self.cancelled = 0
        self.seen: list[str] = []

    def __call__(self, req):
        self.seen.append(req.event)
        if req.event == "hang":
            return Deferred(on_cancel=self._on_cancel)
        if req.event == "forever":
            return self._forever()
        if req.event == "sleep":
            return self._sleep(req.payload)
        return req.payload

    def _on_cancel(self) -> None:
        self.cancelled += 1

    async def _forever(self):
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1

    async def _sleep(self, seconds):
        await trio.sleep(seconds)
        return "slept"


async def serve(nursery, address="tcp://127.0.0.1:0", **kw):
    app = App()
    srv = RpcServer(address, app, **kw)
    await nursery.start(srv.run)
    return srv, app


async def until_closed(stream: FramedStream) -> list:
    """Every envelope the server sends until it hangs up."""
    got = []
    try:
        while True:
            for frame in await stream.recv_many():
                got.extend(decode(frame))
    except Closed:
        return got


def one_error(got, sid):
    [(kind, got_sid, body)] = got
    assert (kind, got_sid, body["code"]) == (Kind.ERROR, sid, BadMessage.code), got
    return body["message"]


# -- item 4: duplicate request ids ------------------------------------------------------
@pytest.mark.parametrize("event", ["hang", "forever"])
async def test_duplicate_request_ids_leak_no_capacity(nursery, event):
    # The scenario: clients that send REQUESTs reusing a sid, then leave.  Each
    # pair used to leave one request counted in flight for ever (the second overwrote
    # the first's entry), so after max_inflight of them every client got QueueFull.
    srv, app = await serve(nursery, max_inflight=4)
    with trio.fail_after(20):
        for _ in range(12):
            raw = await connect_stream(srv.address)
            await raw.send(encode([(REQ, 1, ["", event, None]), (REQ, 1, ["", event, None])]))
            raw.close()
        await wait_until(lambda: srv.connections == 0 and srv.inflight == 0,
                         "the offenders are gone and nothing of theirs is counted in flight")
        async with RpcClient(srv.address) as client:
            assert await client.call("", "echo", "room") == "room"
    assert srv.inflight == 0


@pytest.mark.parametrize("event", ["hang", "forever"])
async def test_a_duplicate_request_id_closes_that_connection_with_a_reason(nursery, event):
    srv, app = await serve(nursery)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as good:
            async with trio.open_nursery() as calls:
                calls.start_soon(good.call, "", "sleep", 0.3)  # in flight meanwhile
                await wait_until(lambda: srv.inflight == 1, "the good call runs")
                raw = await connect_stream(srv.address)
                await raw.send(encode([(REQ, 5, ["", event, None])]))
                await wait_until(lambda: srv.inflight == 2, "the first request runs")
                await raw.send(encode([(REQ, 5, ["", event, None])]))
                message = one_error(await until_closed(raw), 5)
                raw.close()
                assert "5" in message and "in flight" in message
                # The first request of that sid was cancelled with its connection.
                await wait_until(lambda: app.cancelled == 1, "the offender's request is cancelled")
                assert srv.violations == 1
            assert await good.call("", "echo", "unaffected") == "unaffected"
        await wait_until(lambda: srv.inflight == 0, "nothing left in flight")


# -- items 4 and 6: every kind of violation -------------------------------------------------
VIOLATIONS = {
    # name: (frames to send after REQUEST 1 "hang", sid the error comes on)
    "chunk for a request that is not chunked": ([encode([(CHUNK, 1, b"x")])], 1),
    "choke for a request that is not chunked": ([encode([(CHOKE, 1, None)])], 1),
    "a kind no client sends": ([encode([(Kind.RESULT, 9, "x")])], 9),
    "request id 0": ([encode([(REQ, 0, ["", "echo", 1])])], 0),
    "not msgpack": ([b"\xc1garbage"], 0),
    "not an array of envelopes": ([msgpack.packb({"kind": 10})], 0),
    "an envelope of the wrong shape": ([msgpack.packb([[10, "sid", None]])], 0),
}


@pytest.mark.parametrize("violation", list(VIOLATIONS))
async def test_a_violation_closes_only_that_connection(nursery, violation, caplog):
    frames, sid = VIOLATIONS[violation]
    srv, app = await serve(nursery)
    with trio.fail_after(10), caplog.at_level(logging.WARNING, logger="transport.rpc.server"):
        async with RpcClient(srv.address) as good:
            async with trio.open_nursery() as calls:
                calls.start_soon(good.call, "", "sleep", 0.3)
                raw = await connect_stream(srv.address)
                await raw.send(encode([(REQ, 1, ["", "hang", None])]))
                await wait_until(lambda: srv.inflight == 2, "both requests run")
                for frame in frames:
                    await raw.send(frame)
                message = one_error(await until_closed(raw), sid)
                raw.close()
                assert message
                await wait_until(lambda: srv.inflight == 1, "the offender's request is cancelled")
            assert await good.call("", "echo", "fine") == "fine"
    assert app.cancelled == 1 and srv.inflight == 0
    assert message in caplog.text  # the reason is logged too


async def test_a_cancel_or_chunk_for_a_finished_request_is_no_violation(nursery):
    # Races the protocol allows: a CANCEL, or the rest of a request's chunks, arriving
    # after its answer left.
    srv, app = await serve(nursery)
    with trio.fail_after(10):
        raw = await connect_stream(srv.address)
        await raw.send(encode([(REQ, 1, ["", "echo", "a", True])]))
        [(kind, sid, body)] = decode(await raw.recv())
        assert (kind, sid, body) == (Kind.RESULT, 1, "a")
        await raw.send(encode([(CHUNK, 1, b"late"), (CHOKE, 1, None), (CANCEL, 1, None),
                               (CANCEL, 77, None), (REQ, 2, ["", "echo", "b"])]))
        [(kind, sid, body)] = decode(await raw.recv())
        assert (kind, sid, body) == (Kind.RESULT, 2, "b")
        raw.close()
    assert srv.violations == 0


async def test_an_ill_shaped_request_is_answered_and_the_connection_lives(nursery):
    srv, app = await serve(nursery)
    with trio.fail_after(10):
        raw = await connect_stream(srv.address)
        await raw.send(encode([(REQ, 7, "not-a-list")]))
        [(kind, sid, body)] = decode(await raw.recv())
        assert (kind, sid, body["code"]) == (Kind.ERROR, 7, BadMessage.code)
        await raw.send(encode([(REQ, 8, ["", "echo", "still"])]))
        assert decode(await raw.recv()) == [(Kind.RESULT, 8, "still")]
        raw.close()


async def test_an_oversized_frame_is_refused_with_a_reason(nursery):
    srv, app = await serve(nursery, max_message=1 << 20)
    with trio.fail_after(10):
        raw = await connect_stream(srv.address)
        await raw.stream.send_all(frame_header((1 << 20) + 1))  # only the length: no body needed
        message = one_error(await until_closed(raw), 0)
        raw.close()
        assert str(1 << 20) in message
        assert srv.bad_frames == 1 and srv.connections == 0


class Tagged:
    """A FrameGuard of this test's own: a frame is sealed by a trailing tag."""

    def seal(self, frame: bytes) -> bytes:
        return frame + b"TAG"

    def open(self, frame: bytes) -> bytes:
        if not frame.endswith(b"TAG"):
            raise CodecError("frame not sealed")
        return frame[:-3]


async def test_an_unsealed_frame_on_a_guarded_server_is_refused_with_a_reason(nursery):
    srv, app = await serve(nursery, guard=Tagged())
    with trio.fail_after(10):
        raw = await connect_stream(srv.address)
        await raw.send(encode([(REQ, 1, ["", "echo", "unsealed"])]))
        frame = await raw.recv()
        assert frame.endswith(b"TAG")  # the reason is sealed like every frame it sends
        assert "not sealed" in one_error(decode(frame[:-3]), 0)
        with pytest.raises(Closed):
            await raw.recv()
        raw.close()
    assert srv.bad_frames == 1 and srv.violations == 1 and app.seen == []


async def test_a_flood_of_bad_peers_is_logged_once_per_peer_and_bounded(nursery, caplog):
    srv, app = await serve(nursery)
    with trio.fail_after(20), caplog.at_level(logging.WARNING, logger="transport.rpc.server"):
        for _ in range(20):
            raw = await connect_stream(srv.address)
            await raw.send(b"\xc1")
            await until_closed(raw)
            raw.close()
        assert srv.bad_frames == 20 and srv.connections == 0
    logged = [r for r in caplog.records if r.name == "transport.rpc.server"]
    assert len(logged) == 1  # every one came from 127.0.0.1: one peer
    assert len(srv.peer_log) <= srv.peer_log.capacity


# -- the nng link: one polyamorous socket, a pipe per client ---------------------------------
async def nng_raw(srv):
    raw = pynng.Pair1(polyamorous=False, recv_timeout=5000)
    raw.dial(srv.address.removeprefix("nng+"), block=True)
    return raw


async def test_nng_garbage_is_answered_and_its_pipe_closed(nursery):
    srv, app = await serve(nursery, "nng+tcp://127.0.0.1:0")
    with trio.fail_after(10):
        async with RpcClient(srv.address) as good:
            assert await good.call("", "echo", 1) == 1
            raw = await nng_raw(srv)
            try:
                await trio.to_thread.run_sync(raw.send, b"\xc1garbage")
                message = one_error(decode(await trio.to_thread.run_sync(raw.recv)), 0)
                assert message
                await wait_until(lambda: srv.violations == 1 and srv.connections == 1,
                                 "the offender's pipe is dropped")
            finally:
                raw.close()
            assert await good.call("", "echo", 2) == 2


async def test_nng_duplicate_request_ids_leak_no_capacity(nursery):
    srv, app = await serve(nursery, "nng+tcp://127.0.0.1:0", max_inflight=2)
    with trio.fail_after(20):
        for _ in range(4):
            raw = await nng_raw(srv)
            try:
                await trio.to_thread.run_sync(
                    raw.send, encode([(REQ, 1, ["", "hang", None]), (REQ, 1, ["", "hang", None])]))
                one_error(decode(await trio.to_thread.run_sync(raw.recv)), 1)
            finally:
                raw.close()
        await wait_until(lambda: srv.inflight == 0, "nothing of the offenders is in flight")
        async with RpcClient(srv.address) as client:
            assert await client.call("", "echo", "room") == "room"


async def test_client_fails_its_calls_with_the_servers_reason(nursery):
    # The server refuses a connection with ERROR on sid 0: a client's calls fail with
    # that typed error (here the connection cap's QueueFull), not a bare Unreachable.
    srv, app = await serve(nursery, max_connections=1)
    with trio.fail_after(10):
        async with RpcClient(srv.address) as first:
            await first.wait_connected()
            await wait_until(lambda: srv.connections == 1, "the first client is served")
            async with RpcClient(srv.address) as second:
                with pytest.raises(QueueFull, match="connections"):
                    await second.call("", "echo", 1, timeout=5)
                second.close()
            assert await first.call("", "echo", "first") == "first"


# -- any sequence of envelopes: the accounting stays exact ---------------------------------
SIDS = st.integers(-1, 4)
ENVELOPES = st.one_of(
    st.tuples(st.just(REQ), SIDS, st.sampled_from(["echo", "hang", "forever", "sleep"]),
              st.booleans()).map(lambda t: (t[0], t[1], ["", t[2], 0.01, True] if t[3]
                                                else ["", t[2], 0.01])),
    st.tuples(st.sampled_from([CHUNK, CHOKE, CANCEL]), SIDS, st.just(b"c")),
    st.tuples(st.sampled_from([Kind.RESULT, Kind.CREDIT]), SIDS, st.just(1)),
)
FRAMES = st.lists(st.one_of(st.lists(ENVELOPES, min_size=1, max_size=5).map(encode),
                            st.binary(max_size=8)), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(FRAMES)
def test_whatever_a_client_sends_it_holds_nothing_once_it_left(frames):
    async def scenario():
        async with trio.open_nursery() as nursery:
            srv, app = await serve(nursery, max_inflight=8)
            with trio.fail_after(10):
                raw = await connect_stream(srv.address)
                try:
                    for frame in frames:
                        await raw.send(frame)
                except Closed:
                    pass  # closed for a violation meanwhile
                raw.close()
                await wait_until(lambda: srv.connections == 0 and srv.inflight == 0,
                                 "the client is gone and nothing of it is in flight")
                async with RpcClient(srv.address) as client:
                    assert await client.call("", "echo", "after") == "after"
            nursery.cancel_scope.cancel()
    trio.run(scenario)
