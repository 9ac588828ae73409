"""Fuzz an RpcServer (transport/rpc/server.py) from a client that sends anything: good
requests of every answer shape, requests of the wrong shape, cancels, a chunked
request's chunks, envelopes of kinds no client sends, reused request ids, and bytes
that are not a frame at all, batched into frames at random.

The server has no sans-I/O core to drive alone (its state is its connections'), so it
runs for real, on 127.0.0.1, one server and one raw client connection per example.
The client's side is modelled: what the server must do with each envelope follows
from the protocol (docs/protocol.md), so the test knows, before it reads a byte, which
requests must be answered and whether the connection must be closed.

Properties:

- the server never fails: its task never raises, and a fresh client is served after;
- no request is answered twice (at most one RESULT / CHOKE / ERROR per REQUEST);
- a client that keeps to the protocol gets exactly one answer to every request that
  can finish (each shape: a value, a coroutine, a stream, a raised error, a Deferred
  settled later, a chunked request), and its connection stays open;
- a client that breaks it (a frame that is not one, a request id in flight, a chunk
  for a request that takes none, a kind no client sends) is told why with
  ``ERROR bad-message`` and its connection is closed;
- however the client leaves, the server's in-flight count and connections return to 0.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from hypothesis import event, example, given, settings, strategies as st

from support import wait_until
from transport.codec import Kind, decode_lists, encode_envelope, join_frame
from transport.errors import CodecError, Closed
from transport.rpc import Deferred, RpcServer, Stream
from transport.rpc.handlers import Request
from transport.streams import FramedStream

pytestmark = pytest.mark.e2e

FINAL = {int(Kind.RESULT), int(Kind.CHOKE), int(Kind.ERROR)}
CLIENT_KINDS = {int(Kind.REQUEST), int(Kind.CHUNK), int(Kind.CHOKE), int(Kind.CANCEL)}
# Requests that finish by themselves ("echo": at once, on the reader; the others on a
# worker or later) and those that never do ("hang", "defer-never": until cancelled).
FINISHING = ["echo", "async", "stream", "raise", "defer-soon", "upload"]
NEVER = ["hang", "defer-never"]


# -- the handler: one of each answer shape ---------------------------------------------------

def make_handler(nursery: trio.Nursery) -> Any:
    def handler(req: Request) -> Any:
        if req.event == "echo":
            return req.payload
        if req.event == "raise":
            raise ValueError("raised on purpose")
        if req.event == "async":
            async def later() -> Any:
                await trio.sleep(0)
                return req.payload
            return later()
        if req.event == "stream":
            async def items() -> Any:
                for i in range(3):
                    yield i
                    await trio.sleep(0)
            return Stream(items())
        if req.event == "upload":
            async def count() -> int:
                assert req.chunks is not None
                return len([c async for c in req.chunks])
            return count()
        if req.event == "hang":
            return trio.sleep_forever()
        deferred = Deferred()
        if req.event == "defer-soon":
            async def settle() -> None:
                await trio.sleep(0)
                deferred.resolve(req.payload)
            nursery.start_soon(settle)
        return deferred   # defer-never: settled by nobody; a CANCEL or the client leaving ends it
    return handler


# -- what the client sends, and what the model expects ---------------------------------------

@dataclass
class Plan:
    frames: list[bytes] = field(default_factory=list)
    must_answer: set[int] = field(default_factory=set)   # exactly once, if no violation
    requests: Counter[int] = field(default_factory=Counter)
    violation: str | None = None                          # the first, if any
    in_flight: set[int] = field(default_factory=set)      # hang / defer-never, not cancelled


payloads = st.none() | st.integers(-5, 5) | st.text(max_size=5) | st.binary(max_size=5)
OPS = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(FINISHING + NEVER), payloads),
    st.tuples(st.just("upload"), st.integers(0, 10), payloads),
    st.tuples(st.just("bad-shape"), st.sampled_from([None, [], ["t"], ["t", 5, None], "x", ["t", "e"]]),
              payloads),
    st.tuples(st.just("cancel"), st.integers(0, 30), payloads),
    st.tuples(st.just("reuse"), st.integers(0, 30), payloads),
    st.tuples(st.just("stray-chunk"), st.integers(0, 30), payloads),
    st.tuples(st.just("other-kind"), st.sampled_from([int(k) for k in Kind if int(k) not in CLIENT_KINDS]
                                                      + [0, 99]), payloads),
    st.tuples(st.just("garbage"), st.binary(max_size=12), payloads),
    st.tuples(st.just("bad-sid"), st.sampled_from([0, -1]), payloads),
)


def plan_of(ops: list[tuple[str, Any, Any]], cuts: list[int]) -> Plan:
    """The frames to send (envelopes batched at ``cuts``), and what must come back."""
    plan = Plan()
    sids = itertools.count(1)
    used: list[tuple[int, str]] = []   # (sid, event) of every well-formed request, in order
    batch: list[bytes] = []

    def flush() -> None:
        if batch:
            plan.frames.append(join_frame(batch))
            batch.clear()

    def violate(why: str) -> None:
        if plan.violation is None:
            plan.violation = why

    def request(sid: int, event: str, payload: Any, *, chunks: int | None = None) -> None:
        body = ["t", event, payload] + ([True] if chunks is not None else [])
        batch.append(encode_envelope(Kind.REQUEST, sid, body))
        if plan.violation is not None:
            return
        plan.requests[sid] += 1
        if sid <= 0 or sid in plan.in_flight:
            violate(f"request id {sid} in flight or not > 0")
            return
        used.append((sid, event))
        if event in NEVER:
            plan.in_flight.add(sid)
        else:
            plan.must_answer.add(sid)

    for i, (op, arg, payload) in enumerate(ops):
        if i in cuts:
            flush()
        if op == "request":
            request(next(sids), arg, payload)
        elif op == "upload":
            sid = next(sids)
            request(sid, "upload", payload, chunks=arg)
            batch.extend(encode_envelope(Kind.CHUNK, sid, n) for n in range(arg))
            batch.append(encode_envelope(Kind.CHOKE, sid, None))
        elif op == "bad-shape":   # answered bad-message on its sid; the connection lives
            sid = next(sids)
            batch.append(encode_envelope(Kind.REQUEST, sid, arg))
            if plan.violation is None:
                plan.requests[sid] += 1
                plan.must_answer.add(sid)
        elif op == "cancel":      # of anything, or of nothing: never an answer of its own
            target, event = used[arg % len(used)] if used else (arg, "")
            batch.append(encode_envelope(Kind.CANCEL, target, None))
            if plan.violation is None:
                plan.in_flight.discard(target)  # (a hang's worker ends later: not reused below)
                if event not in ("echo", "raise"):   # (those are answered as they arrive)
                    plan.must_answer.discard(target)  # cancelled before or after its answer
        elif op == "reuse" and used:   # a request id used before: a violation only if in flight
            sid, event = used[arg % len(used)]
            if event == "echo" or sid in plan.in_flight:   # answered at once, or surely in flight
                request(sid, "echo" if sid not in plan.in_flight else event, payload)
        elif op == "stray-chunk" and used:   # a chunk for a request that takes none
            sid, event = used[arg % len(used)]
            if sid in plan.in_flight:        # (of a finished one it is dropped: timing decides)
                batch.append(encode_envelope(Kind.CHUNK, sid, payload))
                violate(f"a chunk for request {sid}, which takes none")
        elif op == "other-kind":
            batch.append(encode_envelope(arg, 1, payload))
            violate(f"kind {arg}")
        elif op == "garbage":
            try:
                decode_lists(arg)
            except CodecError:
                flush()
                plan.frames.append(arg)
                violate("an unreadable frame")
            # (else it is a frame after all: the other ops cover what may be in one)
        elif op == "bad-sid":
            request(arg, "echo", payload)
    flush()
    return plan


# -- the run -----------------------------------------------------------------------------------

async def exchange(address: str, plan: Plan) -> tuple[Counter[int], list[list[Any]], bool]:
    """Send the plan's frames; read until every answer it must get has come (and a
    sentinel request after them), or the server closes the connection.  The finals per
    sid, the last frame's envelopes, and whether the server closed."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    finals: Counter[int] = Counter()
    last: list[list[Any]] = []
    sentinel = 1_000_000
    stream = FramedStream(await trio.open_tcp_stream(host, int(port)))
    try:
        try:
            for frame in plan.frames:
                await stream.send(frame)
        except Closed:
            pass   # closed on already: what it said is still to be read
        sent_sentinel = False
        with trio.fail_after(10):
            while True:
                if not sent_sentinel and plan.violation is None and plan.must_answer <= set(finals):
                    # everything came: one more request, so that whatever else the server
                    # would send for these requests comes before its answer
                    await stream.send(join_frame([encode_envelope(Kind.REQUEST, sentinel, ["t", "echo", 0])]))
                    sent_sentinel = True
                try:
                    frames = await stream.recv_many()
                except Closed:
                    # The last frame before the end, one ERROR, is the server's reason
                    # for closing (on the offending sid): not an answer to a request.
                    if len(last) == 1 and last[0][0] == Kind.ERROR:
                        finals[last[0][1]] -= 1
                    return +finals, last, True
                for frame in frames:
                    last = decode_lists(frame)
                    for kind, sid, _ in last:
                        if kind in FINAL:
                            finals[sid] += 1
                if finals[sentinel]:
                    del finals[sentinel]
                    return finals, last, False
    finally:
        stream.close()


def run_plan(plan: Plan) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = RpcServer("tcp://127.0.0.1:0", make_handler(nursery))
            await nursery.start(server.run)
            assert server.address is not None
            finals, last, closed = await exchange(server.address, plan)
            twice = {sid: n for sid, n in finals.items() if n > max(plan.requests[sid], 1)}
            assert not twice, f"answered more often than asked: {twice}"
            if plan.violation is None:
                assert not closed, "a client that kept to the protocol was closed on"
                missing = sorted(plan.must_answer - set(finals))
                assert not missing, f"requests never answered: {missing}"
                once = {sid: finals[sid] for sid in plan.must_answer if finals[sid] != plan.requests[sid]}
                assert not once, f"requests not answered exactly once: {once}"
            else:
                assert closed, f"the connection stayed open after {plan.violation}"
                assert last and last[-1][0] == Kind.ERROR and last[-1][2]["code"] == "bad-message", \
                    f"closed after {plan.violation} without saying why: {last}"
            await wait_until(lambda: server.inflight == 0 and server.connections == 0,
                             "the client's requests and connection are gone from the server")
            # ... and the next client is served as if nothing happened.
            after = Plan(frames=[join_frame([encode_envelope(Kind.REQUEST, 7, ["t", "echo", "x"])])],
                         must_answer={7}, requests=Counter({7: 1}))
            finals, _, closed = await exchange(server.address, after)
            assert finals == Counter({7: 1}) and not closed
            nursery.cancel_scope.cancel()

    trio.run(main)


@settings(max_examples=max(10, settings.default.max_examples // 2), deadline=None)
@given(st.lists(OPS, max_size=14), st.sets(st.integers(1, 13), max_size=5))
@example([("request", "hang", 1), ("reuse", 0, 2)], set())            # a request id in flight, reused
@example([("request", "defer-never", 1), ("reuse", 0, 2)], {1})       # ... in the next frame
@example([("request", "defer-never", 1), ("cancel", 0, None)], set())  # a Deferred cancelled
@example([("request", "echo", 1), ("garbage", b"\xc1", None)], set())
@example([("upload", 3, None), ("request", "stream", None), ("request", "defer-soon", 5)], {1, 2})
def test_the_server_answers_each_request_once_or_closes_and_forgets_the_client(ops, cuts):
    plan = plan_of(ops, cuts)
    event(f"violation: {plan.violation.split(' ')[0] if plan.violation else 'none'}")
    event(f"requests to answer: {min(len(plan.must_answer), 5)}{'+' if len(plan.must_answer) > 5 else ''}")
    run_plan(plan)
