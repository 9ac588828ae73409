"""What a cote user relies on (issue #15), component by component, on loopback:
environments, configuration from the environment, errors that carry data, handlers
added after start, and unmatched events and requests made visible."""
from __future__ import annotations

import logging

import pytest
import trio

from support import wait_until
from transport import Publisher, Requester, Responder, Subscriber
from transport.errors import Rejected, TimeoutError_, UnknownEvent, body_to_error, error_to_body
from transport.mesh.peers import Beacon

pytestmark = pytest.mark.e2e


def test_an_error_body_carries_its_data_both_ways():
    body = error_to_body(Rejected({"reason": "out of stock", "left": 0}))
    assert body["code"] == "rejected" and body["data"] == {"reason": "out of stock", "left": 0}
    back = body_to_error(body)
    assert isinstance(back, Rejected) and back.data == {"reason": "out of stock", "left": 0}
    assert "data" not in error_to_body(UnknownEvent("x"))       # only when there is some


def test_environment_is_part_of_a_beacons_scope():
    a = Beacon(id="a", name="a", role="requester", environment="staging")
    b = Beacon(id="b", name="b", role="responder", environment="staging")
    c = Beacon(id="c", name="c", role="responder")
    assert a.same_scope(b) and not a.same_scope(c)
    assert Beacon.from_wire(b.to_wire()) == b
    assert "env" not in c.to_wire()            # the default environment: older beacons agree


async def test_environments_separate_deployments_on_one_network(disco):
    """Two deployments (staging, prod) on the same discovery port and namespace: each
    Requester reaches only its own environment's Responder."""
    async def answer_as(env):
        rep = Responder(f"rep-{env}", responds_to=["who"], environment=env, discovery=disco)

        @rep.on("who")
        def who(req):
            return env
        return rep

    async with await answer_as("staging"), await answer_as("prod"), \
            Requester("rq-s", requests=["who"], environment="staging", discovery=disco) as rq_s, \
            Requester("rq-p", requests=["who"], environment="prod", discovery=disco,
                      timeout=5) as rq_p:
        with trio.fail_after(10):
            assert {await rq_s.send({"type": "who"}) for _ in range(10)} == {"staging"}
            assert {await rq_p.send({"type": "who"}) for _ in range(10)} == {"prod"}


async def test_configuration_comes_from_the_environment_and_arguments_win(disco, monkeypatch):
    monkeypatch.setenv("COTE_ENV", "from-cote")
    monkeypatch.setenv("MESH_KEY", "k1")
    monkeypatch.setenv("MESH_NAMESPACE", "ns1")
    monkeypatch.setenv("MESH_TIMEOUT", "0.5")
    rq = Requester("rq", discovery=disco)
    assert (rq.environment, rq.key, rq.namespace, rq.timeout) == ("from-cote", "k1", "ns1", 0.5)
    monkeypatch.setenv("MESH_ENVIRONMENT", "mine")
    assert Requester("rq", discovery=disco).environment == "mine"     # ours before cote's
    explicit = Requester("rq", discovery=disco, environment="", key="", timeout=3)
    assert (explicit.environment, explicit.key, explicit.timeout) == ("", "", 3)
    # a request with nobody of its environment serving it times out (MESH_TIMEOUT)
    async with Requester("lonely", discovery=disco) as lonely:
        with trio.fail_after(5), pytest.raises(TimeoutError_):
            await lonely.send({"type": "anything"})


async def test_a_handler_rejecting_with_a_value_gives_the_caller_that_value(disco):
    rep = Responder("shop", responds_to=["buy"], discovery=disco)

    @rep.on("buy")
    async def buy(req):
        raise Rejected({"reason": "out of stock", "item": req["item"]})

    async with rep, Requester("rq", requests=["buy"], discovery=disco) as rq:
        with trio.fail_after(5), pytest.raises(Rejected) as err:
            await rq.send({"type": "buy", "item": "hat"})
    assert err.value.data == {"reason": "out of stock", "item": "hat"}


async def test_handlers_and_broadcasts_added_after_start_are_advertised_at_once(disco):
    rep = Responder("late", responds_to=["a"], discovery=disco)

    @rep.on("a")
    def a(req):
        return "a"

    async with rep, Requester("rq", discovery=disco, timeout=5) as rq:
        with trio.fail_after(10):
            assert await rq.send({"type": "a"}) == "a"

            @rep.on("b")                       # after start
            def b(req):
                return "b"
            assert await rq.send({"type": "b"}) == "b"   # would time out if not advertised

    async with Publisher("pub", broadcasts=["x.one"], discovery=disco) as pub, \
            Subscriber("sub", subscribes_to=["y.*"], discovery=disco) as sub:
        with trio.fail_after(10):
            async def publish_until_heard():
                while True:
                    pub.publish("y.two", {"n": 1})     # a type it did not declare
                    await trio.sleep(0.05)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_until_heard)
                event = await sub.receive()
                nursery.cancel_scope.cancel()
    assert event.topic == "y.two" and "y.two" in pub.advertised()


async def test_unmatched_events_and_requests_are_counted_and_logged_once(disco, caplog):
    caplog.set_level(logging.WARNING, logger="transport.mesh.component")
    sub = Subscriber("picky", subscribes_to=["t.*"], discovery=disco)
    got = []

    @sub.on("t.wanted")
    async def wanted(data):
        got.append(data)

    rep = Responder("rep", responds_to=["q.*"], discovery=disco)

    @rep.on("q.known")
    def known(req):
        return "ok"

    async with Publisher("pub", broadcasts=["t.*"], discovery=disco) as pub, sub, rep, \
            Requester("rq", discovery=disco, timeout=5) as rq:
        with trio.fail_after(10):
            async def publish():
                while True:
                    pub.publish("t.other", 1)
                    pub.publish("t.wanted", 2)
                    await trio.sleep(0.02)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish)
                await wait_until(lambda: len(got) >= 3 and sub.unmatched.get("t.other", 0) >= 3,
                                 "handled and unmatched events arrive")
                nursery.cancel_scope.cancel()
            for _ in range(3):
                with pytest.raises(UnknownEvent):
                    await rq.send({"type": "q.unknown"})
    assert sub.stats["unmatched"] >= 3 and rep.unmatched == {"q.unknown": 3}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("'t.other'" in line for line in lines) == 1          # once per type
    assert sum("'q.unknown'" in line for line in lines) == 1


async def test_a_live_connection_outlives_its_responders_beacon_gap(disco):
    """The Responder's beacons stop (a busy host, lost datagrams) while it runs a
    request: it expires from discovery, but its connection works, so the Requester keeps
    it: the running handler is not cut off (it runs once and is answered) and new
    requests still reach it.  Beacons decide whom to dial; the connection, when it is
    dead."""
    release, runs = trio.Event(), []
    rep = Responder("busy", responds_to=["job"], discovery=disco)

    @rep.on("job")
    async def job(req):
        runs.append(req["n"])
        await release.wait()
        return "done"

    async with rep, Requester("rq", requests=["job"], discovery=disco, timeout=20) as rq:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                answers = []

                async def ask():
                    answers.append(await rq.send({"type": "job", "n": 1}))
                nursery.start_soon(ask)
                await wait_until(lambda: runs == [1], "the handler runs")
                rep.discovery.me = None             # its beacons stop: it expires
                await wait_until(lambda: not rq.peers(), "the requester stops hearing it")
                # (the keeper reconciles in a task of its own, maybe after this one)
                await wait_until(lambda: rep.id in rq._keeper.silent, "its link is kept")
                assert rep.id in rq.links
                release.set()
            assert answers == ["done"] and runs == [1]
            assert await rq.send({"type": "job", "n": 2}) == "done"    # still served
            assert runs == [1, 2]


async def test_draining_a_responder_loses_no_request(disco):
    def serving(name):
        rep = Responder(name, responds_to=["job"], discovery=disco)

        @rep.on("job")
        async def job(req):
            await trio.sleep(0.01)
            return name
        return rep

    a, b = serving("a"), serving("b")
    async with a, b, Requester("rq", requests=["job"], discovery=disco, timeout=10) as rq:
        with trio.fail_after(30):
            while sum(1 for link in rq.links.values() if link.client.connected) < 2:
                await trio.sleep(0.01)
            answers: list[str] = []
            drained = trio.Event()

            async def caller():
                while not drained.is_set() or answers.count("b") < 20:
                    answers.append(await rq.send({"type": "job"}))
                    if drained.is_set():
                        break
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(caller)
                await wait_until(lambda: answers.count("a") >= 10, "a serves")
                await a.drain(timeout=5)
                drained.set()
            after = [await rq.send({"type": "job"}) for _ in range(10)]
    assert set(after) == {"b"}                 # new work goes to the one left
    assert rq.stats["failed"] == 0             # nothing was lost on the way


def test_discovery_reads_ours_then_cotes_variables():
    from transport import DiscoveryConfig

    cote = DiscoveryConfig.from_env({"COTE_HELLO_INTERVAL": "500", "COTE_NODE_TIMEOUT": "3000",
                                     "COTE_MULTICAST_ADDRESS": "239.1.2.3",
                                     "COTE_IGNORE_PROCESS": "true"})
    assert (cote.hello_interval, cote.expiry, cote.multicast_group, cote.ignore_process) == (
        0.5, 3.0, "239.1.2.3", True)
    ours = DiscoveryConfig.from_env({"MESH_HELLO_INTERVAL": "0.2", "COTE_HELLO_INTERVAL": "900",
                                     "MESH_EXPIRY": "1", "MESH_GROUP": ""})
    assert (ours.hello_interval, ours.expiry, ours.multicast_group) == (0.2, 1.0, None)
    assert DiscoveryConfig.from_env({}, hello_interval=0.3).hello_interval == 0.3


async def test_ignore_process_hides_the_components_of_this_process(disco, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("COTE_REQUEST_TIMEOUT", "400")       # ms, as cote says it
    hidden = replace(disco, ignore_process=True)
    rep = Responder("here", responds_to=["x"], discovery=disco)

    @rep.on("x")
    def x(req):
        return "seen"

    async with rep, Requester("sees", requests=["x"], discovery=disco) as rq, \
            Requester("blind", requests=["x"], discovery=hidden) as blind:
        assert blind.timeout == 0.4
        with trio.fail_after(10):
            assert await rq.send({"type": "x"}) == "seen"
            with pytest.raises(TimeoutError_):
                await blind.send({"type": "x"})
        assert not blind.peers()


async def test_a_request_queued_past_its_deadline_is_never_delivered_late(disco):
    seen = []
    async with Requester("rq", requests=["late"], discovery=disco, max_pending=2) as rq:
        with trio.fail_after(10):
            with pytest.raises(TimeoutError_):          # nobody serves it: it waits, then goes
                await rq.send({"type": "late", "n": 1}, timeout=0.3)
            rep = Responder("rep", responds_to=["late"], discovery=disco)

            @rep.on("late")
            def late(req):
                seen.append(req["n"])
                return "ok"

            async with rep:
                while not any(link.client.connected for link in rq.links.values()):
                    await trio.sleep(0.01)
                assert await rq.send({"type": "late", "n": 2}) == "ok"
    assert seen == [2]                                   # the expired one never arrived
