"""The node <-> slave link's channel (transport/channel.py) keeps its limit: what
cannot go fails one message, never the link, and a link broken mid-write ends the
writer quietly.  Over a socketpair, in process."""
from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from transport.channel import FRAME_OVERHEAD, EnvelopeChannel
from transport.codec import Kind, decode
from transport.errors import BadMessage
from transport.streams import FramedStream, from_socket

LIMIT = 4096


def pair() -> tuple[EnvelopeChannel, FramedStream]:
    """A channel that sends at most what fits a frame of LIMIT bytes, and a peer that
    refuses (CodecError) any frame longer than that."""
    a, b = socket.socketpair()
    return (EnvelopeChannel(FramedStream(a), max_message=LIMIT - FRAME_OVERHEAD),
            FramedStream(b, max_message=LIMIT))


async def received(stream: FramedStream, count: int) -> list:
    got: list = []
    while len(got) < count:
        for frame in await stream.recv_many():
            got += decode(frame)
    return got


async def test_a_reply_over_the_limit_is_replaced_by_an_error_for_its_stream():
    chan, peer = pair()
    assert chan.max_message == LIMIT - FRAME_OVERHEAD
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(chan.run_writer)
            chan.send_nowait(Kind.RESULT, 1, b"x" * LIMIT)
            chan.send_nowait(Kind.RESULT, 2, "fine")
            first, second = await received(peer, 2)
            assert first.kind == Kind.ERROR and first.sid == 1
            assert first.body["code"] == "bad-message" and "RESULT message of" in first.body["message"]
            assert second == (Kind.RESULT, 2, "fine")
            n.cancel_scope.cancel()


async def test_a_request_or_chunk_over_the_limit_is_refused_to_its_sender():
    chan, peer = pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(chan.run_writer)
            with pytest.raises(BadMessage, match="INVOKE message of .* over this link's limit"):
                chan.send_or_refuse(Kind.INVOKE, 1, ["e", b"x" * LIMIT])
            with pytest.raises(BadMessage, match="CHUNK"):
                await chan.send(Kind.CHUNK, 2, b"x" * LIMIT)
            with pytest.raises(BadMessage, match="could not be encoded"):
                chan.send_or_refuse(Kind.INVOKE, 3, object())
            chan.send_or_refuse(Kind.INVOKE, 4, ["e", 1])
            assert await received(peer, 1) == [(Kind.INVOKE, 4, ["e", 1])]   # the link is fine
            n.cancel_scope.cancel()


async def test_a_burst_is_cut_into_frames_the_peer_accepts():
    """Many envelopes, each under the limit, never make a frame over it."""
    chan, peer = pair()
    body = b"y" * (LIMIT // 3)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(chan.run_writer)
            chan.hold()
            for sid in range(1, 11):
                chan.send_nowait(Kind.CHUNK, sid, body)
            chan.release()
            got = await received(peer, 10)   # recv_many raises CodecError for a frame over it
            assert [e.sid for e in got] == list(range(1, 11))
            assert chan.frames_sent >= 4
            n.cancel_scope.cancel()


async def test_the_writer_ends_quietly_when_the_peer_dies_mid_frame():
    a, b = socket.socketpair()
    chan = EnvelopeChannel(from_socket(a))
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(chan.run_writer)
            chan.send_nowait(Kind.INVOKE, 1, ["e", b"z" * (8 << 20)])  # more than the socket takes
            await trio.testing.wait_all_tasks_blocked()
            b.close()                            # the peer is gone: EPIPE for the writer
        # the nursery ended without an error: the writer returned
    with pytest.raises(Exception, match="closed"):
        chan.send_nowait(Kind.INVOKE, 2, None)

