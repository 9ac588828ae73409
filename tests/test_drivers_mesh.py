"""The engine on the mesh: ``mesh-responder``, ``mesh-subscriber``, ``mesh-publisher``
(with ``engine.api.publish``) and ``nng-subscriber`` (alias ``zeromq-subscriber``).

First each driver against a :class:`~engine.drivers.testing.FakeApp` with real mesh
components in this process, then end to end through real node processes: a cote-style
Requester bursting at an app whose pool grows, two nodes as two Responders, a two-app
publishing chain, and an app subscribed to another app's maintenance channel.  Every
test has a discovery port of its own (the ``disco`` fixture), on loopback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgpack
import pynng
import pytest
import trio
from hypothesis import example, given, settings, strategies as st
from transport import DiscoveryConfig, Publisher, Requester, Subscriber
from transport.errors import BadMessage, HandlerError, QueueFull, TimeoutError_, UnknownEvent
from transport.rpc import RpcClient
from transport.sockets import bound_address

from engine.client import connect
from engine.drivers import registry
from engine.drivers.mesh_publisher import MeshPublisher, mesh_publish_verb
from engine.drivers.mesh_responder import MeshResponder
from engine.drivers.mesh_subscriber import MeshSubscriber
from engine.drivers.nng_subscriber import NngSubscriber
from engine.drivers.options import DriverSpec, OptionContext
from engine.drivers.testing import FakeApp
from engine.errors import ManifestError
from engine.node.maintenance import frame
from support import free_tcp_port, wait_until

CTX = OptionContext(file="m.json", path="drivers.m", base_dir=Path("."))
ROOT = Path(__file__).resolve().parent.parent


def discovery_options(disco: DiscoveryConfig) -> dict[str, Any]:
    """The manifest's ``discovery`` for the test's own discovery settings."""
    return {"port": disco.port, "interface": disco.interface,
            "hello-interval": disco.hello_interval, "expiry": disco.expiry}


def make(cls, disco: DiscoveryConfig | None = None, emit: str = "work", **raw):
    if disco is not None:
        raw.setdefault("discovery", discovery_options(disco))
    return cls(DriverSpec("m", cls.type_name, emit, cls.parse_options(raw, CTX)))


# -- options (no sockets) -------------------------------------------------------------------

def test_the_types_are_registered_with_their_alias():
    assert registry.get("mesh-responder") is MeshResponder
    assert registry.get("mesh-subscriber") is MeshSubscriber
    assert registry.get("mesh-publisher") is MeshPublisher
    assert registry.get("nng-subscriber") is registry.get("zeromq-subscriber") is NngSubscriber
    assert registry.canonical("zeromq-subscriber") == "nng-subscriber"


def test_options_parse_with_defaults_and_name_their_field_when_wrong():
    opts = MeshResponder.parse_options({}, CTX)
    assert opts.events is None and opts.place.namespace == "" and opts.place.bind == "127.0.0.1"
    opts = MeshResponder.parse_options({"events": {"user.*": "users"}, "namespace": "n", "key": "k",
                                        "discovery": {"port": 40000, "peers": "10.0.0.1, 10.0.0.2:1"},
                                        "max-inflight": 5, "idle-timeout": None}, CTX)
    assert opts.events == (("user.*", "users"),) and opts.max_inflight == 5
    assert dict(opts.place.discovery) == {"port": 40000, "peers": ("10.0.0.1", "10.0.0.2:1")}
    assert opts.limits.idle_timeout is None
    assert MeshSubscriber.parse_options({"types": "a.*"}, CTX).types == (("a.*", None),)
    subscriber = MeshSubscriber.parse_options({"types": ["a.*", "b.x"], "payload": "data"}, CTX)
    assert subscriber.types == (("a.*", None), ("b.x", None)) and subscriber.payload == "data"
    nng = NngSubscriber.parse_options({"endpoint": "tcp://127.0.0.1:9", "topics": "state"}, CTX)
    assert nng.topics == ("state",) and nng.mode == "dial" and nng.payload == "event"
    assert MeshPublisher.parse_options({"broadcasts": ["a.*"]}, CTX).broadcasts == ("a.*",)

    wrong = [
        (MeshResponder, {"events": []}, "drivers.m.events"),
        (MeshResponder, {"events": {"a": 1}}, "drivers.m.events"),
        (MeshResponder, {"namespace": 3}, "drivers.m.namespace"),
        (MeshResponder, {"discovery": {"port": 0}}, "drivers.m.discovery"),
        (MeshResponder, {"discovery": {"prot": 1}}, "drivers.m.discovery.prot"),
        (MeshResponder, {"discovery": {"hello-interval": 5, "expiry": 1}}, "drivers.m.discovery"),
        (MeshResponder, {"secret": "s", "secret-env": "S"}, "drivers.m.secret-env"),
        (MeshResponder, {"max-inflight": 0}, "drivers.m.max-inflight"),
        (MeshResponder, {"respondsTo": ["a"]}, "drivers.m.respondsTo"),
        (MeshSubscriber, {}, "drivers.m.types"),
        (MeshSubscriber, {"types": ["a"], "payload": "all"}, "drivers.m.payload"),
        (MeshSubscriber, {"types": ["a"], "buffer": 0}, "drivers.m.buffer"),
        (MeshPublisher, {"broadcasts": [""]}, "drivers.m.broadcasts"),
        (NngSubscriber, {}, "drivers.m.endpoint"),
        (NngSubscriber, {"endpoint": "http://x"}, "drivers.m.endpoint"),
        (NngSubscriber, {"endpoint": "tcp://127.0.0.1:1", "topics": []}, "drivers.m.topics"),
        (NngSubscriber, {"endpoint": "tcp://127.0.0.1:1", "mode": "bind"}, "drivers.m.mode"),
    ]
    for cls, raw, path in wrong:
        with pytest.raises(ManifestError) as info:
            cls.parse_options(raw, CTX)
        assert info.value.path == path, (raw, info.value)


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**1100) | st.floats() | st.text(max_size=6),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3), max_leaves=6)
_KEYS = ["events", "types", "topics", "broadcasts", "name", "namespace", "key", "secret", "secret-env", "bind",
         "discovery", "payload", "mode", "endpoint", "publish", "buffer", "nng-buffer", "max-links",
         "dial-timeout", "max-message", "max-inflight", "spin", "high-water", "idle-timeout"]
_DISCOVERY = ["port", "multicast-group", "broadcast", "interface", "peers", "hello-interval", "expiry", "ttl",
              "max-peers", "max-per-source", "max-skew"]
_options = st.dictionaries(st.sampled_from(_KEYS), _json | st.sampled_from(
    ["a.*", ["a.*"], {"a.*": "ev"}, "tcp://127.0.0.1:1", "listen", "data", "127.0.0.1"]), max_size=5)
_discovery = st.dictionaries(st.sampled_from(_DISCOVERY), _json | st.sampled_from(
    [1, 47474, 0.5, "127.0.0.1", "10.0.0.1:99999", ["h:1"], None]), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([MeshResponder, MeshSubscriber, MeshPublisher, NngSubscriber]), _options,
       st.none() | _discovery)
# Found by this test: an OverflowError out of native.parse_limits (a float of a huge int).
@example(MeshResponder, {"idle-timeout": 2**1100}, None)
@example(MeshSubscriber, {"types": ["a"], "dial-timeout": 2**1100}, {"hello-interval": 2**1100})
def test_any_options_parse_or_fail_with_a_manifest_error(cls, raw, discovery):
    if discovery is not None:
        raw = {**raw, "discovery": discovery}
    try:
        options = cls.parse_options(raw, CTX)
    except ManifestError:
        return
    driver = cls(DriverSpec("m", cls.type_name, "ev", options))
    assert driver.info()["type"] == cls.type_name
    place = getattr(options, "place", None)
    if place is not None and place.secret_env is None:
        place.component_kwargs("app")   # what the driver builds its component from


async def test_the_publish_verb_answers_typed_errors_without_a_publisher():
    class Node:
        def get(self, name):
            class App:
                drivers = {"pub": make(MeshPublisher, broadcasts=["a.*"])}
            return App()

    with pytest.raises(BadMessage):
        await mesh_publish_verb(Node(), {"app": "x"})
    with pytest.raises(BadMessage):
        await mesh_publish_verb(Node(), {"app": "x", "type": "a.*"})       # no wildcard
    with pytest.raises(UnknownEvent):
        await mesh_publish_verb(Node(), {"app": "x", "type": "b.done"})    # not broadcast
    with pytest.raises(BadMessage):
        await mesh_publish_verb(Node(), {"app": "x", "type": "b.done", "driver": "pub"})
    with pytest.raises(UnknownEvent):
        await mesh_publish_verb(Node(), {"app": "x", "type": "a.done", "driver": "nope"})
    with pytest.raises(Exception, match="not running"):   # (Unreachable: retryable)
        await mesh_publish_verb(Node(), {"app": "x", "type": "a.done"})


# -- each driver against a fake app, with real mesh components -------------------------------

@pytest.mark.e2e
async def test_mesh_responder_answers_streams_and_types_its_errors(disco):
    release = trio.Event()

    async def handler(event, payload):
        if event == "boom":
            raise ValueError(f"boom {payload['n']}")
        if event == "hold":
            await release.wait()
        return {"event": event, "request": payload}

    app = FakeApp(handler, queue_limit=1)
    driver = make(MeshResponder, disco, events={"user.*": "users", "boom": "boom", "hold": "hold"},
                  namespace="ns")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        assert address.startswith("tcp://127.0.0.1:")
        async with Requester("rq", namespace="ns", requests=["user.created", "boom", "hold"],
                             retries=0, discovery=disco) as rq:
            with trio.fail_after(15):
                request = {"type": "user.created", "name": "ada"}
                assert await rq.send(request) == {"event": "users", "request": request}
                with pytest.raises(HandlerError) as err:
                    await rq.send({"type": "boom", "n": 3})
                assert err.value.type == "ValueError" and "boom 3" in str(err.value)
                # queue-full (the fake app holds one job) reaches the Requester typed
                nursery.start_soon(rq.send, {"type": "hold"})
                await wait_until(lambda: app.in_flight == 1, "the held job runs")
                with pytest.raises(QueueFull):
                    await rq.send({"type": "user.created"})
                release.set()
                await wait_until(lambda: app.in_flight == 0, "the held job ends")
        info = driver.info()
        assert info["type"] == "mesh-responder" and info["namespace"] == "ns"
        assert info["done"] == 2 and info["errors"] == 1 and info["skipped"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.e2e
async def test_mesh_responder_takes_an_environment_and_a_subset(disco):
    """An app's Responder in environment "staging", subset "eu": only a Requester of
    that environment reaches it, and requests directed to subset "eu" do."""
    async def handler(event, payload):
        return "eu-app"

    app = FakeApp(handler)
    driver = make(MeshResponder, disco, events=["job"], environment="staging", subset="eu")
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        async with Requester("rq", requests=["job"], environment="staging", discovery=disco,
                             timeout=5) as rq, \
                Requester("other", requests=["job"], environment="prod", discovery=disco,
                          timeout=0.5) as other:
            with trio.fail_after(15):
                assert await rq.send({"type": "job"}, subset="eu") == "eu-app"
                with pytest.raises(TimeoutError_):
                    await other.send({"type": "job"})
        nursery.cancel_scope.cancel()


@pytest.mark.e2e
async def test_mesh_responder_list_form_and_streamed_replies(disco):
    async def streamed(event, payload):
        for i in range(payload["n"]):
            yield {"event": event, "i": i}

    app = FakeApp(streamed)
    driver = make(MeshResponder, disco, events=["count", "stats.*"])
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        async with Requester("rq", requests=["count", "stats.daily"], discovery=disco) as rq:
            with trio.fail_after(15):
                # a streamed reply reaches send() as the list of its chunks
                assert await rq.send({"type": "count", "n": 3}) == [
                    {"event": "count", "i": 0}, {"event": "count", "i": 1}, {"event": "count", "i": 2}]
                # a pattern of the list gives the job the request's own type
                assert await rq.send({"type": "stats.daily", "n": 1}) == [{"event": "stats.daily", "i": 0}]
                # A client that is not a Requester cannot reach an event the manifest did not
                # list by routing on a listed type and naming another inside.
                async with RpcClient(address, timeout=10) as client:
                    with pytest.raises(BadMessage):
                        await client.call("", "stats.daily", {"type": "admin.drop", "n": 1})
                    with pytest.raises(BadMessage):
                        await client.call("", "stats.daily", {"type": "stats.*", "n": 1})
        nursery.cancel_scope.cancel()
    assert [job.event for job in app.submitted] == ["count", "stats.daily"]


@pytest.mark.e2e
async def test_mesh_subscriber_turns_events_into_jobs_and_holds_when_full(disco):
    release = trio.Event()

    async def handler(event, payload):
        await release.wait()
        return payload

    app = FakeApp(handler, queue_limit=1)
    driver = make(MeshSubscriber, disco, emit="got", types={"a.*": "from_a", "b.x": "bx"},
                  namespace="ns", publish=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        async with Publisher("pub", namespace="ns", broadcasts=["a.*", "b.x"], discovery=disco) as pub:
            with trio.fail_after(15):
                await wait_until(lambda: pub.subscribers >= 1, "the driver's Subscriber is linked")
                for i in range(20):
                    pub.publish("a.one" if i % 2 else "b.x", {"i": i})
                pub.publish("c.other", "not subscribed")
                await pub.flush()
                # The pool (one job at a time here) is full: the driver waits for room.
                await wait_until(lambda: driver.stats.held >= 1, "the driver holds")
                release.set()
                await wait_until(lambda: driver.stats.done == 20, "every event ran as a job")
        nursery.cancel_scope.cancel()
    got = [(job.event, job.payload) for job in app.submitted]
    assert got == [("from_a" if i % 2 else "bx",
                    {"type": "a.one" if i % 2 else "b.x", "data": {"i": i}, "publisher": "pub"})
                   for i in range(20)]
    assert len(app.published) == 20 and app.published[0][0] == "result.m"
    info = driver.info()
    assert info["received"] == 20 and info["dropped"] == 0 and info["types"] == {"a.*": "from_a", "b.x": "bx"}


@pytest.mark.e2e
async def test_mesh_publisher_publishes_what_the_verb_asks(disco):
    driver = make(MeshPublisher, disco, broadcasts=["a.*"], namespace="ns", name="a-out")

    class Node:
        def get(self, name):
            assert name == "a"
            class App:
                drivers = {"m": driver}
            return App()

    app = FakeApp(name="a")
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        async with Subscriber("sub", namespace="ns", subscribes_to=["a.*"], discovery=disco) as sub:
            with trio.fail_after(15):
                await wait_until(lambda: driver.publisher.subscribers >= 1, "the subscriber is linked")
                reply = await mesh_publish_verb(Node(), {"app": "a", "type": "a.done", "data": {"x": 1}})
                assert reply == {"driver": "m", "subscribers": 1}
                event = await sub.receive()
                assert (event.topic, event.data, event.publisher) == ("a.done", {"x": 1}, "a-out")
                info = driver.info()
                assert info["subscribers"] == 1 and info["published"] == 1 and info["done"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.e2e
async def test_nng_subscriber_filters_by_prefix_and_counts_bad_messages():
    release = trio.Event()

    async def handler(event, payload):
        await release.wait()
        return payload

    app = FakeApp(handler, queue_limit=1)
    with pynng.Pub0(listen="tcp://127.0.0.1:0", send_buffer_size=64) as pub:
        driver = make(NngSubscriber, emit="seen", endpoint=bound_address(pub), topics=["x.", "state\0"])
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run, app)
            with trio.fail_after(15):
                await wait_until(lambda: len(pub.pipes) >= 1, "the driver dialed the Pub socket")
                for i in range(10):
                    pub.send(frame("x.one", i))
                    pub.send(frame("y.one", i))      # another prefix: nng filters it out
                pub.send(frame("states", 0))         # "state\0" is the topic state alone
                pub.send(frame("state", {"app": "a"}))
                pub.send(b"x.no separator")
                pub.send(b"x.bad\0\xc1")             # not msgpack
                await wait_until(lambda: driver.stats.held >= 1, "the driver holds while the pool is full")
                release.set()
                await wait_until(lambda: driver.stats.done == 11 and driver.stats.errors == 2,
                                 "the good messages ran and the bad were counted")
            nursery.cancel_scope.cancel()
    assert [job.payload for job in app.submitted] == [{"topic": "x.one", "data": i} for i in range(10)] + [
        {"topic": "state", "data": {"app": "a"}}]
    assert {job.event for job in app.submitted} == {"seen"}


@pytest.mark.e2e
async def test_nng_subscriber_listens_and_hands_over_the_data_alone():
    app = FakeApp()
    driver = make(NngSubscriber, emit="seen", endpoint="tcp://127.0.0.1:0", mode="listen", payload="data")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(driver.run, app)
        with pynng.Pub0(dial=address, send_buffer_size=64) as pub, trio.fail_after(15):
            await wait_until(lambda: len(pub.pipes) >= 1, "the Pub socket is connected")
            for i in range(3):
                pub.send(frame("t", {"i": i}))
            await wait_until(lambda: driver.stats.done == 3, "the three messages ran")
        nursery.cancel_scope.cancel()
    assert [job.payload for job in app.submitted] == [{"i": 0}, {"i": 1}, {"i": 2}]


# -- end to end: real nodes, real slaves -------------------------------------------------------

WORKER = '''
import os, time
from engine import on

@on("work")
def work(req):
    time.sleep(0.02)
    return {"i": req["i"], "pid": os.getpid()}

@on("boom")
def boom(req):
    raise ValueError("boom %s" % req["i"])

@on("slow")
def slow(req):
    time.sleep(req["s"])
    return "slept"

@on("upload")
async def upload(req, chunks):
    size = 0
    async for chunk in chunks:
        size += len(chunk)
    return {"name": req["name"], "bytes": size}
'''


def write_app(root: Path, name: str, code: str, drivers: dict, engine: dict | None = None,
              **extra: Any) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(code)
    (folder / "manifest.json").write_text(json.dumps({
        "name": name, "args": "app.py", "drivers": drivers,
        "engine": {"heartbeat-timeout": 20, **(engine or {})}, **extra}))
    return folder


def connected_links(requester: Requester) -> int:
    return sum(1 for link in requester.links.values() if link.client.connected)


def lines(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.e2e
async def test_a_requester_bursts_at_an_app_whose_pool_grows(tmp_path, start_node, disco):
    mesh = {"type": "mesh-responder", "namespace": "engine", "discovery": discovery_options(disco)}
    burst = write_app(tmp_path, "burst", WORKER, {"mesh": {**mesh, "events": ["work", "boom", "upload"]}},
                      {"pool-limit": 4, "queue-limit": 500})
    tiny = write_app(tmp_path, "tiny", WORKER, {"mesh": {**mesh, "events": {"tiny.slow": "slow"}}},
                     {"pool-limit": 1, "queue-limit": 1, "prefetch": 0})
    node = await start_node(burst, tiny)
    async with Requester("cote-style", namespace="engine", requests=["work", "boom", "upload", "tiny.slow"],
                         retries=0, discovery=disco) as rq, connect(node.address, timeout=30) as client:
        with trio.fail_after(60):
            # (send_many sends a request that finds no link yet on its own, after the one
            # before it: linked first, the 200 leave at once)
            await wait_until(lambda: connected_links(rq) >= 2, "the requester is linked to both apps",
                             timeout=20)
            # 200 requests in one burst (one frame): every one answered, in order
            answers = [a async for a in rq.send_many([{"type": "work", "i": i} for i in range(200)],
                                                      window=200, timeout=30)]
            assert [a["i"] for a in answers] == list(range(200))
            info = await client.info("burst")
            assert len(info["pool"]["slaves"]) > 1, info["pool"]
            assert len({a["pid"] for a in answers}) > 1
            assert info["drivers"]["mesh"]["done"] == 200 and info["drivers"]["mesh"]["address"]
            # a handler's error arrives typed
            with pytest.raises(HandlerError) as err:
                await rq.send({"type": "boom", "i": 7})
            assert err.value.type == "ValueError" and "boom 7" in str(err.value)
            # a chunked request's chunks reach the handler
            assert await rq.send({"type": "upload", "name": "f"}, chunks=[b"x" * 1000] * 50) == {
                "name": "f", "bytes": 50_000}
            # so does queue-full: one slave, one job queued, five asked at once
            outcomes: list[Any] = []

            async def one() -> None:
                try:
                    outcomes.append(await rq.send({"type": "tiny.slow", "s": 1.0}, timeout=20))
                except QueueFull as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as calls:
                for _ in range(5):
                    calls.start_soon(one)
            assert outcomes.count("slept") >= 1
            assert sum(isinstance(o, QueueFull) for o in outcomes) >= 1, outcomes
            assert (await client.info("tiny"))["drivers"]["mesh"]["skipped"] >= 1


@pytest.mark.e2e
async def test_two_nodes_hosting_an_app_are_two_responders(tmp_path, start_node, disco):
    mesh = {"type": "mesh-responder", "events": ["work"], "discovery": discovery_options(disco)}
    app = write_app(tmp_path, "burst", WORKER, {"mesh": mesh}, {"pool-limit": 2, "queue-limit": 100})
    first = await start_node(app)
    second = await start_node(app)
    async with Requester("rq", requests=["work"], discovery=disco) as rq:
        with trio.fail_after(60):
            await wait_until(lambda: connected_links(rq) >= 2,
                             "the requester is linked to both nodes' Responders", timeout=20)
            answers = [a async for a in rq.send_many([{"type": "work", "i": i} for i in range(40)],
                                                      window=4)]
    assert [a["i"] for a in answers] == list(range(40))
    by_node = [{a["pid"] for a in answers} & {p.pid for p in node.descendants()} for node in (first, second)]
    assert all(by_node), f"both nodes' slaves answered: {by_node}"


CHAIN_A = '''
from engine import on
from engine import publish, apublish

@on("a.work")
def work(req):
    return publish("a.done", {"i": req["i"]})

@on("a.awork")
async def awork(req):
    return await apublish("a.done", {"i": req["i"], "async": True})
'''

CHAIN_B = '''
import json
from engine import on

@on("got")
def got(event):
    with open(%r, "a") as log:
        log.write(json.dumps(event) + "\\n")
'''


@pytest.mark.e2e
async def test_two_apps_chain_through_pub_sub(tmp_path, start_node, disco):
    where = {"namespace": "chain", "discovery": discovery_options(disco)}
    seen = tmp_path / "b-seen.jsonl"
    a = write_app(tmp_path, "a", CHAIN_A, {
        "in": {"type": "mesh-responder", "events": ["a.work", "a.awork"], **where},
        "out": {"type": "mesh-publisher", "broadcasts": ["a.*"], **where}}, {"pool-limit": 2})
    b = write_app(tmp_path, "b", CHAIN_B % str(seen), {
        "from_a": {"type": "mesh-subscriber", "emit": "got", "types": ["a.*"], **where}},
        {"pool-limit": 2})
    node = await start_node(a, b)
    async with connect(node.address, timeout=30) as client, \
            Requester("rq", namespace="chain", requests=["a.work", "a.awork"], discovery=disco) as rq:
        with trio.fail_after(60):
            async def linked() -> bool:
                return (await client.info("a"))["drivers"]["out"]["subscribers"] >= 1
            await wait_until(linked, "b's subscriber is linked to a's publisher", timeout=20)
            requests = [{"type": "a.work", "i": i} for i in range(50)] + \
                       [{"type": "a.awork", "i": i} for i in range(50, 60)]
            replies = [r async for r in rq.send_many(requests, window=20)]
            assert all(r["driver"] == "out" and r["subscribers"] >= 1 for r in replies), replies
            await wait_until(lambda: len(lines(seen)) >= 60, "b ran a job for each of a's events")
            got = lines(seen)
            assert sorted(e["data"]["i"] for e in got) == list(range(60))
            assert {(e["type"], e["publisher"]) for e in got} == {("a.done", "a")}
            assert sum(1 for e in got if e["data"].get("async")) == 10
            info = await client.info("b")
            assert info["drivers"]["from_a"]["done"] == 60 and info["drivers"]["from_a"]["dropped"] == 0
            assert (await client.info("a"))["drivers"]["out"]["published"] == 60


CHAIN_C = '''
import json
from engine import on

@on("state")
def state(message):
    with open(%r, "a") as log:
        log.write(json.dumps({"topic": message["topic"], "app": message["data"]["app"]}) + "\\n")
'''


@pytest.mark.e2e
async def test_an_app_subscribes_to_another_apps_maintenance_channel(tmp_path, start_node):
    channel = f"tcp://127.0.0.1:{free_tcp_port()}"
    seen = tmp_path / "c-seen.jsonl"
    a = write_app(tmp_path, "a", WORKER, {}, pubsub={"endpoint": channel})
    c = write_app(tmp_path, "c", CHAIN_C % str(seen), {
        "states": {"type": "zeromq-subscriber", "emit": "state", "endpoint": channel,
                   "topics": ["state\0"]}}, {"pool-limit": 1})
    node = await start_node(c, a)   # c first: its Sub0 redials until a's channel is up
    with trio.fail_after(60):
        await wait_until(lambda: len(lines(seen)) >= 2, "c ran jobs for two of a's states", timeout=30)
    assert {(e["topic"], e["app"]) for e in lines(seen)} == {("state", "a")}
    async with connect(node.address, timeout=30) as client:
        states = (await client.info("c"))["drivers"]["states"]
    assert states["type"] == "nng-subscriber" and states["errors"] == 0 and states["done"] >= 2


def test_the_format_read_is_the_maintenance_channels():
    assert frame("state", {"a": 1}) == b"state\0" + msgpack.packb({"a": 1})


@pytest.mark.e2e
async def test_the_mesh_chain_example(tmp_path, start_node, disco, monkeypatch):
    example = tmp_path / "mesh-chain"
    shutil.copytree(ROOT / "examples" / "mesh-chain", example, ignore=shutil.ignore_patterns("__pycache__"))
    # The example takes its discovery from MESH_* (docs/mesh.md): this test's own port.
    monkeypatch.setenv("MESH_PORT", str(disco.port))
    monkeypatch.setenv("MESH_INTERFACE", disco.interface)
    node = await start_node(example)
    async with connect(node.address, timeout=30) as client, \
            Requester("shopper", namespace="shop", requests=["order.place"], discovery=disco) as rq:
        with trio.fail_after(60):
            async def linked() -> bool:
                return (await client.info("orders"))["drivers"]["events"]["subscribers"] >= 1
            await wait_until(linked, "the mailer is linked to the orders app's publisher", timeout=20)
            for qty in range(1, 6):
                placed = await rq.send({"type": "order.place", "item": "tea", "qty": qty})
                assert placed["qty"] == qty and placed["listeners"] == 1
            with pytest.raises(HandlerError, match="qty must be"):
                await rq.send({"type": "order.place", "item": "tea", "qty": 0})

            async def mailed() -> Any:
                orders = (await client.info("mailer"))["drivers"]["orders"]
                return orders if orders["done"] == 5 else None
            orders = await wait_until(mailed, "the mailer ran a job for each order")
    assert orders["errors"] == 0 and orders["received"] == 5


@pytest.mark.e2e
async def test_undeploying_an_app_drains_its_mesh_responder(tmp_path, start_node, disco):
    """An app is undeployed while a mesh request runs on it: its Responder says bye and
    answers what it holds (Driver.drain) before it goes, so the Requester gets the answer
    instead of a broken link, and the handler ran once."""
    mesh = {"type": "mesh-responder", "namespace": "engine", "discovery": discovery_options(disco),
            "events": {"job.slow": "slow"}}
    app = write_app(tmp_path, "leaving", WORKER, {"mesh": mesh},
                    {"pool-limit": 1, "termination-timeout": 10})
    node = await start_node(app)
    async with Requester("rq", namespace="engine", requests=["job.slow"], retries=0,
                         discovery=disco) as rq, connect(node.address, timeout=30) as client:
        with trio.fail_after(40):
            await wait_until(lambda: connected_links(rq) >= 1, "linked to the app", timeout=20)
            answers: list[Any] = []

            async def ask() -> None:
                answers.append(await rq.send({"type": "job.slow", "s": 1.5}, timeout=20))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await wait_until(lambda: _running(client), "the job runs")
                await client.undeploy("leaving")
            assert answers == ["slept"]
            assert rq.stats["failed"] == 0 and rq.stats["retried"] == 0


async def _running(client) -> bool:
    return (await client.info("leaving"))["pool"]["running"] == 1
