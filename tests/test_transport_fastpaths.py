"""The transport's fast paths (issue 6): frames read in bursts, reused server workers,
the client's single deadline sweeper, the subscriber's one-pass frame check, and a
``transport`` package that imports pynng only when asked."""
import subprocess
import sys

import msgpack
import pytest
import trio
import trio.testing

from transport.codec import Kind
from transport.errors import TimeoutError_
from transport.mesh.pubsub import Event, Subscriber
from transport.rpc import RpcClient, RpcServer
from transport.streams import from_socket, socketpair
from support import wait_until


async def test_recv_many_returns_every_buffered_frame_in_order():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    try:
        with trio.fail_after(5):
            frames = [b"one", b"", b"three" * 1000]
            for f in frames:
                await fa.send(f)
            got = []
            while len(got) < len(frames):
                got += await fb.recv_many()
            assert got == frames
            # A frame split across reads is only handed back once whole.
            a.sendall(b"\x00\x00\x00\x05ab")
            async with trio.open_nursery() as nursery:
                async def finish():
                    await trio.testing.wait_all_tasks_blocked()  # recv_many has the half
                    a.sendall(b"cde\x00\x00\x00\x01z")
                nursery.start_soon(finish)
                got = await fb.recv_many()
                while len(got) < 2:
                    got += await fb.recv_many()
            assert got == [b"abcde", b"z"]
    finally:
        fa.close()
        fb.close()


async def echo_or_sleep(req):
    if req.event == "sleep":
        await trio.sleep(req.payload)
        return "slept"
    return req.payload


@pytest.mark.e2e
async def test_server_reuses_workers_and_a_cancelled_request_only_ends_its_own(nursery):
    server = RpcServer("tcp://127.0.0.1:0", echo_or_sleep)
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            for i in range(20):
                assert await client.call("t", "echo", i) == i
            assert len(server._idle) == 1  # one worker served all 20, one after another
            results = {}

            async def echo_many(base):
                for i in range(base, base + 50):
                    results[i] = await client.call("t", "echo", i)

            async with trio.open_nursery() as calls:
                calls.start_soon(echo_many, 0)
                with pytest.raises(TimeoutError_):
                    await client.call("t", "sleep", 30, timeout=0.2)
                calls.start_soon(echo_many, 100)
            assert results == {i: i for i in [*range(50), *range(100, 150)]}
            await wait_until(lambda: not server.inflight, "the CANCEL reached the sleeping worker")
            assert await client.call("t", "echo", "after") == "after"
            assert all(w.work is None for w in server._idle)


@pytest.mark.e2e
async def test_deadline_sweeper_expires_each_call_at_its_own_deadline(nursery):
    server = RpcServer("tcp://127.0.0.1:0", echo_or_sleep)
    await nursery.start(server.run)
    with trio.fail_after(20):
        async with RpcClient(server.address, timeout=5) as client:
            ended: dict[str, float] = {}
            t0 = trio.current_time()

            async def call(name, seconds, timeout):
                try:
                    await client.call("t", "sleep", seconds, timeout=timeout)
                    ended[name] = -1.0
                except TimeoutError_:
                    ended[name] = trio.current_time() - t0

            async with trio.open_nursery() as calls:
                calls.start_soon(call, "long", 30, 2.0)
                calls.start_soon(call, "short", 30, 0.3)   # earlier than the sweeper's plan
                calls.start_soon(call, "quick", 0.05, 3)   # answered: never expires
            assert ended["quick"] == -1.0
            # Never before its deadline; the short one long before the long one's (the
            # sweeper woke for it: a 1.7 s margin for a loaded machine's delays).
            assert 0.3 <= ended["short"] < 2.0 <= ended["long"]
            assert client.pending == 0


def test_subscriber_counts_malformed_envelopes_and_builds_events():
    sub = Subscriber("s", subscribes_to=["user.*"])
    frame = msgpack.packb([
        [Kind.PUBLISH, 1, ["user.created", {"id": 1}, 1]],
        [Kind.PUBLISH, 2, ["other", 2, 2]],                  # not subscribed: filtered
        [Kind.PUBLISH, 3, "abc"],                           # body not [topic, data, seq]
        "xyz",                                              # not an envelope
        [Kind.CHUNK, 4, ["user.x", 1, 4]],                  # wrong kind
        [Kind.PUBLISH, 6, ["user.deleted", None, 6]],       # seq 5 lost on the way
    ], use_bin_type=True)
    sub._take("pid", "pub", frame, None)
    sub._take("pid", "pub", b"\xc1 not msgpack", None)
    assert list(sub._buffer) == [Event("user.created", {"id": 1}, "pub"),
                                 Event("user.deleted", None, "pub")]
    assert sub._buffer[0].publisher == "pub" and sub._buffer[0].data == {"id": 1}
    # seqs 3 and 4 were unusable and 5 never came: 3 lost
    assert sub.stats == {"received": 2, "dropped": 3, "resets": 0, "bad_frames": 4,
                         "filtered": 1, "handler_errors": 0, "dial_failed": 0,
                         "unmatched": 0}


@pytest.mark.e2e
def test_transport_package_imports_pynng_only_when_asked():
    # A slave needs only channel/streams/codec; a mesh Requester/Responder pair on TCP
    # streams needs no nng either (pynng costs a process ~9 MB and an asyncio import).
    code = ("import sys, transport.channel, transport.streams, transport.codec;"
            "assert 'pynng' not in sys.modules, 'pynng imported';"
            "from transport import Responder, Requester, TimeoutError_, Kind;"
            "import transport.rpc, transport.mesh.discovery;"
            "assert 'pynng' not in sys.modules and Responder.role == 'responder';"
            "from transport import Subscriber; assert 'pynng' in sys.modules;"
            "import transport; assert 'Subscriber' in dir(transport)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
