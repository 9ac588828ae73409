"""What makes many small requests cheap (issue 6): plain handlers answered inline,
Deferred answers, Requester.send_many, held outboxes and the shared packer."""
from __future__ import annotations

import time
from contextlib import aclosing

import msgpack
import pytest
import trio

from transport import codec
from transport.codec import Kind, decode, decode_lists, encode_envelope, join_frame
from transport.errors import BadMessage, CodecError, HandlerError, QueueFull, TimeoutError_
from transport._outbox import SENT_PARTLY, Outbox
from transport.mesh.requester import Requester
from transport.mesh.responder import Responder
from transport.rpc import Deferred, RpcClient, RpcServer, Stream
from transport.streams import READ_SIZE

from support import wait_until


# -- RpcServer: what a handler returns decides how it is answered ----------------------

def plain(req):
    if req.event == "boom":
        raise ValueError("plain boom")
    return {"echo": req.payload}


@pytest.mark.e2e
async def test_plain_handler_is_answered_inline_without_a_worker_task(nursery):
    server = RpcServer("tcp://127.0.0.1:0", plain)
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            results = {}

            async def call(i):
                results[i] = await client.call("t", "echo", i)

            async with trio.open_nursery() as calls:
                for i in range(50):
                    calls.start_soon(call, i)
            assert results == {i: {"echo": i} for i in range(50)}
            with pytest.raises(HandlerError) as err:
                await client.call("t", "boom")
            assert err.value.type == "ValueError" and "plain boom" in str(err.value)
    # No worker task was ever needed: an async handler would leave one parked.
    assert server._idle == [] and server.inflight == 0
    assert (server.served, server.failed) == (50, 1)


@pytest.mark.e2e
async def test_deferred_answers_resolve_fail_stream_and_settle_early(nursery):
    waiting: dict[str, Deferred] = {}

    def handler(req):
        deferred = Deferred()
        if req.event == "early":
            deferred.resolve("settled before the handler returned")
        else:
            waiting[req.event] = deferred
        return deferred

    async def chunks():
        for i in range(3):
            yield i

    server = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            assert await client.call("t", "early") == "settled before the handler returned"
            got = {}

            async def call(event):
                try:
                    got[event] = await client.call("t", event)
                except QueueFull as exc:
                    got[event] = exc

            async with trio.open_nursery() as calls:
                for event in ("value", "error", "stream"):
                    calls.start_soon(call, event)
                await wait_until(lambda: len(waiting) == 3, "the three handlers have returned")
                assert server.inflight == 3 and got == {}  # nobody waits on a task for them
                waiting["value"].resolve(42)
                waiting["value"].resolve(43)  # a second settlement is ignored
                waiting["error"].fail(QueueFull("full, try later"))
                waiting["stream"].stream(chunks())
            assert got["value"] == 42 and got["stream"] == [0, 1, 2]
            assert isinstance(got["error"], QueueFull) and got["error"].retryable
    assert server.inflight == 0


@pytest.mark.e2e
async def test_a_caller_giving_up_cancels_its_deferred(nursery):
    cancelled = trio.Event()
    deferreds = []

    def handler(req):
        deferreds.append(Deferred(on_cancel=cancelled.set))
        if req.event == "now":
            deferreds[-1].resolve("now")
        return deferreds[-1]

    server = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            with pytest.raises(TimeoutError_):
                await client.call("t", "slow", timeout=0.1)
            await cancelled.wait()   # the CANCEL reached the deferred's owner
            assert server.inflight == 0
            deferreds[0].resolve("too late")  # ignored: nobody to answer
            assert await client.call("t", "now") == "now"
    assert server.inflight == 0 and server.served == 1


# -- Requester.send_many --------------------------------------------------------------

def watched_responder(disco, *, window_seen: list[int], delay: float = 0.0):
    rep = Responder("rep", responds_to=["work"], discovery=disco)
    running = [0]

    @rep.on("work")
    async def work(req):
        running[0] += 1
        window_seen.append(running[0])
        try:
            await trio.sleep(delay)
            if req.get("fail"):
                raise QueueFull("refused on purpose")  # retryable, but every try fails
            if req.get("bad"):
                raise ValueError("bad input")
            return req["n"] * 2
        finally:
            running[0] -= 1

    return rep


@pytest.mark.e2e
async def test_send_many_answers_in_order_with_at_most_window_in_flight(disco):
    seen: list[int] = []
    async with watched_responder(disco, window_seen=seen, delay=0.001) as rep, \
            Requester("req", requests=["work"], discovery=disco) as rq:
        with trio.fail_after(20):
            answers = [a async for a in rq.send_many(({"type": "work", "n": n} for n in range(300)),
                                                     window=20)]
    assert answers == [n * 2 for n in range(300)]
    assert max(seen) <= 20 and max(seen) >= 10   # the window is used, never exceeded
    assert rq.outstanding == 0 and rq.stats["answered"] == 300
    assert rep.server.inflight == 0


@pytest.mark.e2e
async def test_send_many_errors_in_place_or_raised_and_leaving_early_cancels(disco):
    seen: list[int] = []
    async with watched_responder(disco, window_seen=seen, delay=0.0) as rep, \
            Requester("req", requests=["work"], discovery=disco, retries=1) as rq:
        with trio.fail_after(20):
            requests = [{"type": "work", "n": 1}, {"type": "work", "n": 2, "bad": True},
                        {"type": "work", "n": 3}, {"type": "work", "n": 4, "payload": object()},
                        "not a request", {"type": "work", "n": 5}]
            answers = [a async for a in rq.send_many(requests, return_exceptions=True)]
            assert answers[0] == 2 and answers[2] == 6 and answers[5] == 10
            assert isinstance(answers[1], HandlerError) and answers[1].type == "ValueError"
            assert isinstance(answers[3], BadMessage)  # could not even be encoded
            assert isinstance(answers[4], BadMessage)  # each in its own place
            with pytest.raises(HandlerError):
                async for _ in rq.send_many(requests):
                    pass
            # A retryable failure goes through send()'s retries before it is given up.
            with pytest.raises(QueueFull):
                async for _ in rq.send_many([{"type": "work", "n": 0, "fail": True}]):
                    pass
            assert rq.stats["retried"] >= 1

        with trio.fail_after(20):
            got = []
            async with aclosing(rq.send_many(({"type": "work", "n": n} for n in range(10_000)),
                                             window=50)) as answers:
                async for answer in answers:
                    got.append(answer)
                    if len(got) == 5:
                        break
            assert got == [0, 2, 4, 6, 8]
            assert rq.outstanding == 0   # the rest were given up at once
            await wait_until(lambda: rep.server.inflight == 0, "the Responder was told to stop them")


@pytest.mark.e2e
async def test_send_many_waits_for_a_responder_like_send(disco):
    async with Requester("req", requests=["work"], discovery=disco) as rq:
        answers = []

        async def consume():
            async for answer in rq.send_many([{"type": "work", "n": 5}], timeout=10):
                answers.append(answer)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                # no Responder yet: the request waits
                await wait_until(lambda: rq.outstanding == 1, "the request is waiting")
                async with watched_responder(disco, window_seen=[]):
                    await wait_until(lambda: answers, "the late Responder answers")
    assert answers == [10]


# -- outbox and codec ---------------------------------------------------------------

async def test_outbox_sends_one_envelope_direct_and_batches_a_burst():
    sent = []

    def try_send(frame):
        sent.append(frame)
        return True

    box = Outbox()
    assert box.put(b"\x01", try_send) is False      # alone: written at once
    assert box.put(b"\x02", try_send) is True       # right after: queued for the writer
    assert box.put(b"\x03", try_send) is True
    assert sent == [join_frame([b"\x01"])]
    assert [frame for frame, _ in box.frames()] == [join_frame([b"\x02", b"\x03"])]
    # Real time on purpose: DIRECT_GAP (20 us) is measured on perf_counter, which no
    # MockClock moves; 1 ms is past it whatever the machine's load.
    await trio.sleep(0.001)                          # quiet again: the next goes direct
    assert box.put(b"\x04", try_send) is False
    box.held = True                                  # a burst is being assembled
    await trio.sleep(0.001)
    assert box.put(b"\x05", try_send) is True
    assert len(sent) == 2


async def test_a_held_burst_leaves_as_one_frame_when_released():
    sent, answer = [], [True]

    def try_send(frame):
        if answer[0]:
            sent.append(frame)
        return answer[0]

    box = Outbox()
    box.held = True
    for b in (b"\x01", b"\x02", b"\x03"):
        assert box.put(b, try_send) is True
    assert box.release(try_send) == 3 and not box.held
    assert sent == [join_frame([b"\x01", b"\x02", b"\x03"])] and len(box) == 0
    # The link would block: the burst stays for the writer, in order.
    answer[0] = False
    box.held = True
    box._wakeup = trio.Event()
    box.put(b"\x04", try_send)
    box.put(b"\x05", try_send)
    assert not box._wakeup.is_set()              # held: the writer is not woken per item
    assert box.release(try_send) == 0 and box._wakeup.is_set()
    assert [frame for frame, _ in box.frames()] == [join_frame([b"\x04", b"\x05"])]
    # Half written: the writer is woken to finish the frame.
    answer[0] = SENT_PARTLY
    box.held = True
    box.put(b"\x06", try_send)
    box._wakeup = trio.Event()
    assert box.release(try_send) == 1 and box._wakeup.is_set()


async def plain_client(nursery) -> RpcClient:
    """A connected client (one call answered) of a server with the plain handler."""
    server = RpcServer("tcp://127.0.0.1:0", plain)
    await nursery.start(server.run)
    client = RpcClient(server.address)
    await nursery.start(client.run)
    assert await client.call("", "echo", 0) == {"echo": 0}
    return client


async def answers(calls) -> list:
    out = []
    for call in calls:
        while not call.done:
            await call.wait()
        out.extend(call.items)
    return out


@pytest.mark.e2e
async def test_a_client_batch_is_on_the_wire_before_the_caller_awaits(nursery):
    with trio.fail_after(10):
        client = await plain_client(nursery)
        client.hold(True)
        calls = [client.start("", "echo", i) for i in range(1, 6)]
        client.hold(False)
        # Nothing is left for the writer task: a caller that goes on working
        # (send_many taking the answers already in) does not hold the burst back.
        assert len(client._outbox) == 0
        assert await answers(calls) == [{"echo": i} for i in range(1, 6)]


@pytest.mark.e2e
async def test_only_a_lone_call_is_written_direct(nursery):
    # Callers awaiting answers start their next requests as the answers come in; those
    # leave as one frame (answered as one) rather than each written alone.
    with trio.fail_after(10):
        client = await plain_client(nursery)
        first = client.start("", "echo", 1)
        assert len(client._outbox) == 0          # alone: on the wire already
        time.sleep(0.001)                       # past DIRECT_GAP (perf_counter): only "alone" decides
        second = client.start("", "echo", 2)
        assert len(client._outbox) == 1          # one in flight: queued for the writer
        assert await answers([first, second]) == [{"echo": 1}, {"echo": 2}]


def test_shared_packer_recovers_from_errors_and_big_values():
    good = encode_envelope(Kind.RESULT, 7, {"a": [1, b"x"]})
    with pytest.raises(CodecError):
        encode_envelope(Kind.RESULT, 8, {"a": object()})
    assert encode_envelope(Kind.RESULT, 7, {"a": [1, b"x"]}) == good  # nothing left over
    packer = codec._packer
    # A big bytes body (a chunk) is packed beside the packer, which it never grows...
    chunk = encode_envelope(Kind.CHUNK, 1, b"z" * (2 << 20))
    assert chunk == msgpack.packb([Kind.CHUNK, 1, b"z" * (2 << 20)], use_bin_type=True)
    assert codec._packer is packer
    # ...any other big value goes through it, and its grown buffer is let go.
    big = encode_envelope(Kind.CHUNK, 1, [b"z" * (2 << 20)])
    assert msgpack.unpackb(big) == [Kind.CHUNK, 1, [b"z" * (2 << 20)]]
    assert codec._packer is not packer  # its grown buffer was let go
    assert encode_envelope(Kind.RESULT, 7, {"a": [1, b"x"]}) == good


@pytest.mark.parametrize("size", [4095, 4096, 65535, 65536, 70000])
@pytest.mark.parametrize("kind, sid", [(Kind.CHUNK, 1), (Kind.CHUNK, 300), (Kind.RESULT, 2 ** 40),
                                       (Kind.ERROR, 0), (Kind.CHUNK, -5)])
def test_bytes_bodies_pack_as_msgpack_does(size, kind, sid):
    body = bytes(range(256)) * (size // 256) + b"q" * (size % 256)
    assert encode_envelope(kind, sid, body) == msgpack.packb([kind, sid, body], use_bin_type=True)


@pytest.mark.parametrize("frame", [
    join_frame([encode_envelope(Kind.REQUEST, 1, ["t", "e", None]), encode_envelope(Kind.CANCEL, 1)]),
    msgpack.packb([[1, 2]]), msgpack.packb({"a": 1}), msgpack.packb([[1, "x", 3]]), b"\xc1",
])
def test_decode_lists_checks_what_decode_checks(frame):
    try:
        expected = decode(frame)
    except CodecError:
        with pytest.raises(CodecError):
            decode_lists(frame)
    else:
        assert [tuple(env) for env in decode_lists(frame)] == expected


@pytest.mark.e2e
async def test_stream_returned_by_a_plain_handler_goes_to_a_worker(nursery):
    async def items():
        for i in range(4):
            yield i

    server = RpcServer("tcp://127.0.0.1:0", lambda req: Stream(items()))
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address) as client:
            assert [c async for c in client.stream("t", "s")] == [0, 1, 2, 3]


@pytest.mark.e2e
async def test_a_client_that_never_reads_its_answers_is_not_read_either(nursery):
    """Its answers queue up to high_water, then the server stops reading its requests
    (TCP pushes back on it); other clients are still served."""
    server = RpcServer("tcp://127.0.0.1:0", lambda req: b"x" * 1024, high_water=64)
    await nursery.start(server.run)
    host, port = server.address[len("tcp://"):].rsplit(":", 1)
    greedy = await trio.open_tcp_stream(host, int(port))
    requests = b"".join(
        len(frame).to_bytes(4, "big") + frame
        for frame in (join_frame([encode_envelope(Kind.REQUEST, sid, ["t", "e", None])])
                      for sid in range(1, 20_001)))

    async def flood():
        try:
            await greedy.send_all(requests)  # blocks for good once the server stops reading
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # closed under it at the end of the test

    with trio.fail_after(20):
        nursery.start_soon(flood)
        await wait_until(lambda: server._connections, "the flood's connection is accepted")
        [conn] = server._connections.values()
        # The state in which the server stops reading it: answers queued to high water.
        await wait_until(lambda: len(conn.outbox) >= 64, "the unread answers reach high water")
        async with RpcClient(server.address) as other:   # the server works on meanwhile
            assert await other.call("t", "e") == b"x" * 1024
        per_read = READ_SIZE // (len(requests) // 20_000)  # requests one 64 KiB read holds
        assert len(conn.outbox) < 64 + 2 * per_read   # bounded: it is not read while over
        assert server.served < 20_000                 # it stopped reading the flood
    await greedy.aclose()


async def test_an_outbox_counts_the_bytes_it_holds_whatever_happens_to_them():
    # A stream waits on this count (a slow reader's backlog): it must stay the sum of
    # what is queued through puts, held bursts, direct writes, frames taken and drops.
    from hypothesis import given, settings, strategies as st

    ops = st.lists(st.tuples(st.sampled_from(["put", "put-direct", "hold", "release",
                                              "release-direct", "frames", "clear"]),
                             st.integers(1, 300)), max_size=60)

    @settings(max_examples=150, deadline=None)
    @given(ops)
    def check(steps):
        box = Outbox(max_frame=2_000)
        for op, n in steps:
            if op == "put":
                box.put(b"x" * n)
            elif op == "put-direct":
                box.put(b"x" * n, lambda frame: n % 3 != 0)
            elif op == "hold":
                box.held = True
            elif op == "release":
                box.release()
            elif op == "release-direct":
                box.release(lambda frame: n % 2 == 0)
            elif op == "frames":
                for _ in zip(range(n % 3), box.frames()):
                    pass
            else:
                box.clear()
            assert box.size == sum(map(len, box.items))

    check()
