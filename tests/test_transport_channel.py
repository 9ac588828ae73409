"""TrioSocket and EnvelopeChannel over real nng Pair0 sockets (nng's in-process
transport: the same pollable descriptors and non-blocking calls as over ipc or tcp,
without an address on the machine)."""
import itertools

import pynng
import pytest
import trio
import trio.testing

from transport.channel import EnvelopeChannel
from transport.codec import Kind
from transport.errors import Closed
from transport.sockets import TrioSocket


_names = itertools.count()


@pytest.fixture
def pair():
    addr = f"inproc://test-transport-channel-{next(_names)}"
    a = TrioSocket(pynng.Pair0(listen=addr))
    b = TrioSocket(pynng.Pair0(dial=addr))
    yield a, b
    a.close()
    b.close()


async def test_socket_round_trip(pair):
    a, b = pair
    with trio.fail_after(5):
        await a.send(b"ping")
        assert await b.recv() == b"ping"


async def test_close_wakes_a_parked_receiver(pair):
    a, _ = pair
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            async def receive():
                with pytest.raises(Closed):
                    await a.recv()
            n.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()  # parked on the descriptor
            a.close()


async def test_channel_batches_queued_envelopes_into_one_frame(pair):
    a, b = pair
    ca, cb = EnvelopeChannel(a), EnvelopeChannel(b)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(ca.run_writer)
            for i in range(100):
                ca.send_nowait(Kind.CHUNK, i, i)
            got = []
            while len(got) < 100:
                got += await cb.receive()
            assert [e.sid for e in got] == list(range(100))
            assert ca.frames_sent == 1
            n.cancel_scope.cancel()


async def test_channel_skips_and_counts_malformed_frames(pair):
    a, b = pair
    cb = EnvelopeChannel(b)
    with trio.fail_after(5):
        await a.send(b"\xc1not msgpack")
        await a.send(b"\x93\x01\x02\x03")  # msgpack, but not a frame of envelopes
        ca = EnvelopeChannel(a)
        async with trio.open_nursery() as n:
            await n.start(ca.run_writer)
            ca.send_nowait(Kind.HEARTBEAT, 0, None)
            [env] = await cb.receive()
            assert env.kind == Kind.HEARTBEAT
            assert cb.bad_frames == 2
            n.cancel_scope.cancel()


async def test_unencodable_envelope_becomes_error_for_its_stream(pair):
    a, b = pair
    ca, cb = EnvelopeChannel(a), EnvelopeChannel(b)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(ca.run_writer)
            ca.send_nowait(Kind.RESULT, 1, "fine")
            ca.send_nowait(Kind.RESULT, 2, object())
            got = []
            while len(got) < 2:
                got += await cb.receive()
            assert got[0].body == "fine"
            assert got[1].kind == Kind.ERROR and got[1].sid == 2
            assert got[1].body["code"] == "bad-message"
            n.cancel_scope.cancel()
