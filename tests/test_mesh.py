"""Mesh components end to end on loopback (real sockets, one discovery port per test).

How fast things happen (the first answer after a late start, a publisher's rate beside a
stalled subscriber) is measured by ``python -m bench`` (bench/timing.py), not here."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from support import free_udp_port, wait_until
from transport import (
    DiscoveryConfig, HandlerError, Publisher, QueueFull, RemoteError, Requester, Responder,
    Subscriber, TimeoutError_, register_error,
)
from transport._links import connect_stream
from transport.codec import Kind, encode_one

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def responder(disco, name="rep", types=("randomRequest",), reply=None, **kw):
    rep = Responder(name, responds_to=list(types), discovery=disco, **kw)
    served = []

    for t in types:
        @rep.on(t)
        async def handle(req, _name=name):
            served.append(req)
            return reply(req) if reply else {"by": _name, "val": req.get("val")}
    rep.served = served
    return rep


async def wait_links(requester, n):
    await wait_until(lambda: sum(1 for l in requester.links.values() if l.client.connected) >= n,
                     f"the requester has {n} connected link(s)", timeout=5)


async def test_request_response(disco):
    async with responder(disco, namespace="rnd"), \
            Requester("req", namespace="rnd", requests=["randomRequest"], discovery=disco) as rq:
        with trio.fail_after(5):
            assert await rq.send({"type": "randomRequest", "val": 3}) == {"by": "rep", "val": 3}


@pytest.mark.parametrize("last", ["responder", "requester"])
async def test_first_answer_in_either_start_order(last):
    # How soon (< 300 ms) is a bench/timing.py row; here: found and answered at all.
    cfg = DiscoveryConfig(port=free_udp_port(), interface="127.0.0.1")
    rep = responder(cfg)
    rq = Requester("req", discovery=cfg)
    first, second = (rq, rep) if last == "responder" else (rep, rq)
    async with first:
        # Real time on purpose: the first one's start-up hellos (the discovery's ask
        # schedule, 0.2 s) are over before the second exists, so the second is found
        # by the late joiner's path, not by the first one's start-up.
        await trio.sleep(0.3)
        async with second:
            with trio.fail_after(5):
                assert await rq.send({"type": "randomRequest", "val": 1}) == {"by": "rep", "val": 1}


async def test_chunked_request_to_a_responder(disco):
    rep = Responder("up", responds_to=["upload"], discovery=disco)

    @rep.on("upload")
    async def upload(req, chunks):
        return {"name": req["name"], "bytes": sum([len(c) async for c in chunks])}

    async with rep, Requester("req", requests=["upload"], discovery=disco) as rq:
        with trio.fail_after(10):
            reply = await rq.send({"type": "upload", "name": "a"}, chunks=[b"x" * 1000] * 300)
    assert reply == {"name": "a", "bytes": 300_000}


async def test_round_robin(disco):
    async with responder(disco, "a") as a, responder(disco, "b") as b, \
            Requester("req", discovery=disco) as rq:
        await wait_links(rq, 2)
        with trio.fail_after(10):
            for i in range(20):
                await rq.send({"type": "randomRequest", "val": i})
        assert len(a.served) == len(b.served) == 10


async def test_requests_queue_until_a_responder_appears(disco):
    async with Requester("req", discovery=disco) as rq, trio.open_nursery() as nursery:
        results = []

        async def ask(i):
            results.append(await rq.send({"type": "randomRequest", "val": i}, timeout=5))
        for i in range(5):
            nursery.start_soon(ask, i)
        await wait_until(lambda: rq.outstanding == 5, "the five requests are outstanding")
        assert results == []   # no responder exists yet: nothing could answer
        async with responder(disco):
            await wait_until(lambda: len(results) == 5, "the late responder answers all five",
                             timeout=5)
        assert sorted(r["val"] for r in results) == list(range(5))


def hanging_responder(disco, name, started):
    rep = Responder(name, responds_to=["slow"], discovery=disco)

    @rep.on("slow")
    async def hang(req):
        started.set()
        await trio.sleep_forever()
    return rep


async def test_responder_vanishing_mid_request_fails_over(disco):
    started = trio.Event()
    async with Requester("req", discovery=disco) as rq, \
            responder(disco, "good", types=("slow",)) as good:
        hang_scope = trio.CancelScope()

        async def run_hanging():
            with hang_scope:
                await hanging_responder(disco, "hang", started).run()
        result = []

        async def ask():
            result.append(await rq.send({"type": "slow", "val": 7}, timeout=8))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_hanging)
            await wait_links(rq, 2)
            for _ in range(2):  # round robin: one of the two lands on the hanging one
                nursery.start_soon(ask)
            with trio.fail_after(5):
                await started.wait()  # its handler has the request...
            hang_scope.cancel()  # ...and the responder vanishes
        assert [r["by"] for r in result] == ["good", "good"]
        assert len(good.served) == 2


async def test_responder_vanishing_alone_gives_clear_error(disco):
    started = trio.Event()
    async with Requester("req", discovery=disco) as rq, trio.open_nursery() as nursery:
        nursery.start_soon(hanging_responder(disco, "hang", started).run)

        async def kill_when_started():
            await started.wait()
            nursery.cancel_scope.cancel()
        nursery.start_soon(kill_when_started)
        with trio.fail_after(5), pytest.raises(RemoteError) as info:
            await rq.send({"type": "slow"}, timeout=1.0)
        assert "slow" in str(info.value) and info.value.retryable


async def test_namespace_key_and_type_isolation(disco):
    async with responder(disco, namespace="a"), responder(disco, key="prod"), \
            responder(disco, "plain"), \
            Requester("req", namespace="a", discovery=disco) as sees_ns, \
            Requester("req", key="prod", discovery=disco) as sees_key, \
            Requester("req", namespace="b", discovery=disco) as rq_ns, \
            Requester("req", key="dev", discovery=disco) as rq_key, \
            Requester("req", discovery=disco) as rq_type:
        # The positive side first: each responder is found by a requester of its scope,
        # so its beacons are out and being heard by everyone on this port.
        await wait_until(lambda: sees_ns.peers() and sees_key.peers() and rq_type.peers(),
                         "every responder is found in its own scope", timeout=5)
        # Each other-scope requester has been ignoring beacons all along.
        await wait_until(lambda: rq_ns.discovery.table.ignored and rq_key.discovery.table.ignored,
                         "the other-scope requesters have heard (and ignored) beacons", timeout=5)
        # A request waits up to its timeout for a responder (the behaviour under test).
        for rq, t in [(rq_ns, "randomRequest"), (rq_key, "randomRequest"), (rq_type, "other")]:
            with pytest.raises(TimeoutError_, match="no responder advertising"):
                await rq.send({"type": t}, timeout=0.3)
        assert rq_ns.peers() == [] and rq_key.peers() == []
        assert [b.name for b in rq_type.peers() if b.role == "responder"] == ["plain"]


async def test_secret_rejects_foreign_peers_and_frames(disco):
    async with responder(disco, secret="s3cret") as rep, \
            Requester("req", secret="s3cret", discovery=disco) as good, \
            Requester("req", secret="wrong", discovery=disco) as foreign, \
            Requester("req", discovery=disco) as open_req:
        with trio.fail_after(5):
            assert (await good.send({"type": "randomRequest", "val": 1}))["val"] == 1
        for rq in (foreign, open_req):
            assert rq.peers() == []
            with pytest.raises(TimeoutError_):
                await rq.send({"type": "randomRequest"}, timeout=0.3)
        assert rep.discovery.stats["bad"] > 0
        # A foreign process that dials the data socket directly is not served either.
        raw = await connect_stream(rep.address)
        await raw.send(encode_one(Kind.REQUEST, 1, ["", "randomRequest", {"type": "randomRequest"}]))
        await wait_until(lambda: rep.server.bad_frames == 1, "the unsealed frame is refused")
        raw.close()
        assert len(rep.served) == 1   # refused as a bad frame: never reached the handler


@register_error
class Overloaded(RemoteError):
    code = "test-overloaded"
    retryable = True


async def test_retry_only_retryable_and_circuit_breaker(disco):
    calls = {"flaky": 0, "broken": 0}
    flaky = Responder("flaky", responds_to=["t"], discovery=disco)
    broken = Responder("broken", responds_to=["bad"], discovery=disco)
    good = responder(disco, "good", types=("t",))

    @flaky.on("t")
    async def overloaded(req):
        calls["flaky"] += 1
        raise Overloaded("busy")

    @broken.on("bad")
    async def raises(req):
        calls["broken"] += 1
        raise ValueError("nope")

    async with flaky, broken, good, Requester("req", discovery=disco, breaker_threshold=2,
                                              breaker_cooldown=30) as rq:
        await wait_links(rq, 3)
        with pytest.raises(HandlerError, match="nope"):
            await rq.send({"type": "bad"}, timeout=5)
        assert calls["broken"] == 1  # not retryable: raised at once, not retried
        with trio.fail_after(10):
            for i in range(20):
                assert (await rq.send({"type": "t", "val": i}))["by"] == "good"
        assert calls["flaky"] == 2  # the breaker opened after two failures
        assert rq.stats["retried"] == 2
    # With only the flaky one, retries run out and the retryable error surfaces.
    async with flaky, Requester("req", discovery=disco, retries=2) as rq:
        await wait_links(rq, 1)
        calls["flaky"] = 0
        with pytest.raises(Overloaded):
            await rq.send({"type": "t"}, timeout=5)
        assert calls["flaky"] == 3


async def test_bounded_pending_queue(disco):
    async with Requester("req", discovery=disco, max_pending=2) as rq, \
            trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(rq.send, {"type": "nobody"})
        await wait_until(lambda: rq.outstanding == 2, "two requests are outstanding")
        with pytest.raises(QueueFull, match="2 requests outstanding"):
            await rq.send({"type": "nobody"})
        assert rq.stats == {"sent": 2, "answered": 0, "failed": 0, "retried": 0, "refused": 1,
                            "dial_failed": 0}
        nursery.cancel_scope.cancel()


async def test_stats_unknown_event_zero_timeout_and_closed(disco):
    from transport.errors import Closed, UnknownEvent

    rep = responder(disco, types=("randomRequest",))
    rep.responds_to = ("randomRequest", "unhandled")  # advertised, but no handler
    async with rep, Requester("req", discovery=disco) as rq:
        await wait_links(rq, 1)
        with trio.fail_after(5):
            for i in range(3):
                assert (await rq.send({"type": "randomRequest", "val": i}))["val"] == i
            with pytest.raises(UnknownEvent, match="unhandled"):
                await rq.send({"type": "unhandled"})
        # No time at all: refused before dispatch, and the responder is not blamed.
        with pytest.raises(TimeoutError_, match="within 0 s"):
            await rq.send({"type": "randomRequest"}, timeout=0)
        [link] = rq.links.values()
        assert link.breaker.failures == 0 and link.breaker.state == "closed"
        assert rq.stats == {"sent": 5, "answered": 3, "failed": 2, "retried": 0, "refused": 0,
                            "dial_failed": 0}
        assert len(rep.served) == 3
    with pytest.raises(Closed):
        await rq.send({"type": "randomRequest"})
    assert rq.stats["sent"] == 5


async def test_pubsub_late_joiner_and_wildcards(disco):
    async with Publisher("pub", broadcasts=["user.created", "user.deleted"], discovery=disco) as pub:
        published = [0]

        async def publish_forever():
            while True:
                pub.publish("user.created", {"i": published[0]})
                pub.publish("user.deleted", {"i": published[0]})
                published[0] += 1
                await trio.sleep(0.01)   # a live publisher's pace, in real time
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_forever)
            await wait_until(lambda: published[0] >= 10, "events are published before anyone listens")
            async with Subscriber("late", subscribes_to=["user.created"], discovery=disco) as sub:
                with trio.fail_after(5):
                    events = [await sub.receive() for _ in range(5)]
            nursery.cancel_scope.cancel()
    assert {e.topic for e in events} == {"user.created"} and events[0].publisher == "pub"
    assert [e.data["i"] for e in events] == sorted(e.data["i"] for e in events)
    assert sub.stats["dropped"] == 0


async def test_slow_subscriber_does_not_stall_publisher(disco):
    n = 20_000
    async with Subscriber("slow", discovery=disco, buffer=50, nng_buffer=4) as slow, \
            Subscriber("fast", discovery=disco) as fast, \
            Publisher("pub", broadcasts=["tick"], discovery=disco, nng_buffer=32) as pub:
        await wait_until(lambda: pub.subscribers == 2, "both subscribers are connected, not just "
                         "discovered", timeout=5)
        got = 0

        async def consume_fast():
            nonlocal got
            while got < n:
                got += len(await fast.receive_many())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume_fast)
            blob = b"x" * 1000  # 20 MB in all: more than every queue between them holds
            # The slow one reads nothing until every event is out: were the publisher
            # held back by it, this would never finish.  (How fast it finishes is a
            # bench/timing.py row.)
            with trio.fail_after(30):
                for i in range(n):
                    pub.publish("tick", (i, blob))
                    if i % 200 == 0:
                        await pub.flush()
                await pub.flush()
            await wait_until(lambda: got == n, "the fast subscriber has every event")
            first = await slow.receive()
            seen, last = 1, first.data[0]
            with trio.fail_after(10):
                # Now drain the slow one up to the last event (Sub0 drops the oldest, so
                # the newest stays): what it lost on the way was dropped, and counted.
                while last < n - 1:
                    events = await slow.receive_many()
                    seen, last = seen + len(events), events[-1].data[0]
    assert got == n and fast.stats["dropped"] == 0
    # Sub0 makes room by dropping the oldest frame it holds, so under load even the
    # first events may go before the slow reader takes any; from its first event
    # on, every event is either seen or counted as dropped.
    dropped = slow.stats["dropped"]
    assert dropped > 0 and seen + dropped == n - first.data[0], (first.data[0], seen, slow.stats)


async def test_malformed_datagrams_are_counted_and_ignored(disco):
    async with responder(disco) as rep, Requester("req", discovery=disco) as rq:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for junk in [b"", b"ETMB", b"ETMB\x01\x00\xc1", b"\xff" * 100, os.urandom(500)]:
                s.sendto(junk, ("127.0.0.1", disco.port))
        with trio.fail_after(5):
            assert (await rq.send({"type": "randomRequest", "val": 2}))["val"] == 2
        # unicast to a shared (SO_REUSEPORT) port reaches one of the listeners
        await wait_until(lambda: rep.discovery.stats["bad"] + rq.discovery.stats["bad"] >= 5,
                         "all five datagrams are counted bad")


def _run(args, env, timeout=20):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT / "examples" / "mesh", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs, timeout=20):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def test_examples_run(disco):
    env = dict(os.environ, MESH_PORT=str(disco.port), MESH_INTERFACE="127.0.0.1",
               PYTHONPATH=str(ROOT / "src"))
    procs = [_run(["responder.py", "--count", "3"], env),
             _run(["requester.py", "--count", "3", "--interval", "1.0"], env)]
    monitor = _run(["monitor.py", "--json", "--wait", "1.5"], env)
    rep_out, req_out, mon_out = _finish(procs + [monitor])
    assert req_out.count("answer") == 3 and rep_out.count("answering with") == 3, (req_out, rep_out)
    roles = {row["role"] for row in json.loads(mon_out)}
    assert {"responder", "requester"} <= roles, mon_out
    procs = [_run(["subscriber.py", "--count", "3", "--namespace", "rnd"], env),
             _run(["publisher.py", "--count", "60", "--interval", "0.05", "--namespace", "rnd"], env)]
    sub_out, pub_out = _finish(procs)
    assert sub_out.count("notified of") == 3, sub_out
