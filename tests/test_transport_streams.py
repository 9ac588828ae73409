"""FramedStream over a socketpair, and an EnvelopeChannel running over it."""
import os
import subprocess
import sys
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from transport.channel import EnvelopeChannel
from transport.codec import Kind
from transport.errors import Closed, CodecError
from transport.streams import FramedStream, from_socket, socketpair


async def test_frames_survive_fragmentation_and_coalescing():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    with trio.fail_after(5):
        frames = [b"", b"x", os.urandom(70_000), b"tail"]
        for f in frames:
            await fa.send(f)
        assert [await fb.recv() for _ in frames] == frames
    fa.close(); fb.close()


async def test_peer_close_is_closed_not_a_hang():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    fa.close()
    with trio.fail_after(5), pytest.raises(Closed):
        await fb.recv()
    fb.close()


async def test_oversized_length_prefix_is_a_codec_error():
    a, b = socketpair()
    fb = FramedStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), max_message=10)
    a.sendall(b"\xff\xff\xff\xff")
    with trio.fail_after(5), pytest.raises(CodecError):
        await fb.recv()
    a.close(); fb.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_socket_stream_hands_its_descriptor_over_whole():
    # FramedStream reads and writes the stdlib socket directly; a trio SocketStream
    # keeps its own private, so the FramedStream takes the descriptor over (detach):
    # one owner at a time, nothing duplicated, nothing closed twice.
    fds = open_fds()
    a, b = socketpair()
    raw = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    fb = FramedStream(raw)
    fa = from_socket(a)
    try:
        with trio.fail_after(5):
            await raw.aclose()  # what trio.serve_listeners does when its handler returns
            await fa.send(b"still here")
            assert await fb.recv() == b"still here"
            assert fb.poll_frames() == []  # the direct, non-blocking read works too
            await fb.send(b"and back")
            assert await fa.recv() == b"and back"
            assert open_fds() == fds + 2  # no extra descriptor
            fb.close()  # the peer sees the end of the stream: nobody else holds it open
            with pytest.raises(Closed):
                await fa.recv()
    finally:
        fa.close()
        fb.close()  # closing again is harmless
    assert open_fds() == fds


async def test_closing_wakes_a_receiver_parked_on_the_socket():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def receive():
                with pytest.raises(Closed):
                    await fb.recv()
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            fb.close()
    fa.close()


async def test_frames_over_a_stream_that_is_not_a_socket():
    # Any trio stream works, through its generic methods; polling finds only what a
    # read already buffered.
    left, right = trio.testing.memory_stream_pair()
    fl, fr = FramedStream(left), FramedStream(right)
    with trio.fail_after(5):
        assert not fl.try_send_nowait(b"no direct write")
        await fl.send(b"one")
        await fl.send(b"two")
        assert await fr.recv() == b"one"
        assert fr.poll_frames() == [b"two"]
        assert fr.poll_frames() == []
        await fl.aclose()
        with pytest.raises(Closed):
            await fr.recv()


@pytest.mark.e2e
async def test_child_death_is_seen_as_end_of_stream():
    parent, child = socketpair()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            pass_fds=[child.fileno()])
    child.close()
    stream = from_socket(parent)
    try:
        proc.kill()
        with trio.fail_after(5), pytest.raises(Closed):
            await stream.recv()
    finally:
        proc.kill()
        proc.wait()
        stream.close()


@asynccontextmanager
async def channel_pair():
    """Two EnvelopeChannels over a socketpair, the first with its writer task running."""
    a, b = socketpair()
    ca, cb = EnvelopeChannel(from_socket(a)), EnvelopeChannel(from_socket(b))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                await n.start(ca.run_writer)
                yield ca, cb
                n.cancel_scope.cancel()
    finally:
        ca.close()
        cb.close()


async def test_envelope_channel_over_framed_stream():
    async with channel_pair() as (ca, cb):
        for i in range(10):
            ca.send_nowait(Kind.INVOKE, i, ["echo", i])
        got = []
        while len(got) < 10:
            got += await cb.receive()
        assert [e.body for e in got] == [["echo", i] for i in range(10)]


async def test_a_lone_frame_bigger_than_the_socket_buffer_arrives_whole():
    # With nothing queued a frame is written straight to the socket; the socketpair
    # takes only the start of 3 MB and the writer task must send the rest unprompted
    # (nothing else is sent after it: a node's one large job to an idle slave).
    async with channel_pair() as (ca, cb):
        await trio.sleep(0)
        ca.send_nowait(Kind.INVOKE, 1, ["echo", b"x" * 3_000_000])
        (env,) = await cb.receive()
        assert env.body == ["echo", b"x" * 3_000_000]


async def test_a_held_channel_sends_its_burst_as_one_frame_on_release():
    # The pool holds a slave's channel while it acts on a frame of answers: the jobs
    # they free the slave for leave together, without waiting for the writer task.
    async with channel_pair() as (ca, cb):
        await trio.sleep(0.001)
        ca.hold()
        for i in range(3):
            ca.send_nowait(Kind.INVOKE, i, ["echo", i])
        ca.release()
        assert len(ca._outbox) == 0 and ca.frames_sent == 1
        got = await cb.receive()
        assert [e.sid for e in got] == [0, 1, 2] and cb.frames_received == 1


async def test_frames_from_another_thread_never_land_inside_the_trio_sides_frames():
    """A slave's watchdog writes heartbeats from its own thread while the trio side
    writes frames, some larger than the socket buffer (half-written, then finished
    across awaits, or left as a tail): every frame arrives whole, the trio side's in
    their order."""
    import threading

    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    beat = b"\x00heartbeat"
    stop = threading.Event()
    sent_from_thread = []

    def beater() -> None:
        while not stop.is_set():
            if fa.send_from_thread(beat):
                sent_from_thread.append(1)

    frames = [bytes([i % 251]) * size for i, size in
              enumerate([10, 300_000, 7, 70_000, 1, 500_000, 3] * 40)]
    fa.allow_thread_sends()
    thread = threading.Thread(target=beater, daemon=True)
    received: list[bytes] = []
    with trio.fail_after(30):
        thread.start()
        try:
            async with trio.open_nursery() as nursery:
                async def read_all() -> None:
                    while len([f for f in received if f != beat]) < len(frames):
                        received.extend(await fb.recv_many())
                nursery.start_soon(read_all)
                for i, f in enumerate(frames):
                    if i % 2:
                        await fa.send(f)
                    elif not fa.try_send_nowait(f):
                        await fa.send(f)
                    await fa.flush()
        finally:
            stop.set()
            thread.join(5)
    received.extend(fb.poll_frames())
    assert [f for f in received if f != beat] == frames
    assert received.count(beat) == len(sent_from_thread) > 0
    fa.close(); fb.close()


async def test_large_chunks_go_direct_in_order_even_when_the_socket_fills():
    """Bulk chunks (written beside their frame headers, a partial write's rest left to
    the writer) arrive whole and in order among small envelopes, however the reader
    cuts its reads."""
    a, b = socketpair()
    sender, receiver = EnvelopeChannel(from_socket(a)), EnvelopeChannel(from_socket(b))
    sent = [(Kind.CHUNK, i, os.urandom(70_000) if i % 3 else {"i": i}) for i in range(1, 60)]
    got = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run_writer)
            for kind, sid, body in sent:
                await sender.send(kind, sid, body)
            while len(got) < len(sent):
                got += [tuple(env) for env in await receiver.receive()]
            nursery.cancel_scope.cancel()
    assert got == sent
    assert sender.frames_sent >= 40  # the big ones each a frame of its own
    sender.close(); receiver.close()


async def test_a_large_frame_half_written_directly_is_finished_before_the_next():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    big = os.urandom(3 << 20)  # more than the socket takes at once
    assert fa.try_send_parts_nowait(b"\x91", big) == 2  # SENT_PARTLY: the rest is the tail
    assert fa.try_send_parts_nowait(b"\x91", b"x" * 20_000) is False  # not inside it
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def write():
                await fa.flush()
                await fa.send(b"after")
            nursery.start_soon(write)
            assert await fb.recv() == b"\x91" + big
            assert await fb.recv() == b"after"
    fa.close(); fb.close()
