"""The mesh against an attacker on loopback (issue 12, items 8, 10 and 11).

- replay: a sealed request captured on the wire and sent again on a connection of the
  attacker's own is refused (it ran once, it does not run again); a signed beacon of a
  component that left, replayed, does not bring it back;
- confidentiality: a stranger who dials a Publisher of a secret mesh directly reads
  nothing of its events;
- a fake publisher cannot poison a subscriber's ``dropped`` counter;
- a flood of fake Responder beacons leaves a requester's table and links bounded, and
  its real requests answered.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import uuid

import msgpack
import pynng
import pytest
import trio

from support import free_udp_port, wait_until
from transport import DiscoveryConfig, Publisher, Requester, Responder, Subscriber
from transport._links import connect_stream
from transport.codec import Kind, encode_one
from transport.mesh.peers import Beacon, encode_datagram
from transport.mesh.dialing import MAX_DIALING
from transport.sockets import bound_address

pytestmark = pytest.mark.e2e

SECRET = "s3cret"


def echo_responder(disco, served, **kw):
    rep = Responder("rep", responds_to=["transfer"], discovery=disco, **kw)

    @rep.on("transfer")
    def transfer(req):
        served.append(req)
        return {"done": req["n"]}
    return rep


class Tap:
    """Wraps a server's frame guard to keep what came off the wire, as an eavesdropper
    on the link sees it (the bytes before the guard opens them)."""

    def __init__(self, inner):
        self.inner = inner
        self.frames: list[bytes] = []

    def seal(self, frame: bytes) -> bytes:
        return self.inner.seal(frame)

    def open(self, frame: bytes) -> bytes:
        self.frames.append(frame)
        return self.inner.open(frame)


async def test_a_captured_request_replayed_does_not_run_again(disco):
    served: list = []
    async with echo_responder(disco, served, secret=SECRET) as rep:
        tap = Tap(rep.server.guard)
        rep.server.guard = tap  # before any client connects: every frame passes the tap
        async with Requester("req", requests=["transfer"], secret=SECRET, discovery=disco) as rq:
            with trio.fail_after(5):
                assert await rq.send({"type": "transfer", "n": 1}) == {"done": 1}
        assert len(served) == 1 and len(tap.frames) == 1
        [captured] = tap.frames
        # The attacker sends it three times, on connections of its own.
        for _ in range(3):
            raw = await connect_stream(rep.address)
            await raw.send(captured)
            raw.close()
        await wait_until(lambda: len(served) - 1 + rep.server.bad_frames >= 3,
                         "the three replays are run or refused")
        assert len(served) == 1, "a replayed request ran again"
        assert b"transfer" not in captured, "the request was readable on the wire"


async def test_a_stranger_dialing_a_publisher_reads_nothing(disco):
    async with Publisher("pub", broadcasts=["pay"], secret=SECRET, discovery=disco) as pub:
        stranger = pynng.Sub0(recv_timeout=100)
        stranger.subscribe(b"")
        try:
            stranger.dial(pub.address, block=False)
            await wait_until(lambda: pub.subscribers == 1, "the stranger is connected")
            frames: list[bytes] = []

            def got_one() -> bool:
                pub.publish("pay", {"card": "4111-1111-1111-1111"})
                try:
                    frames.append(stranger.recv(block=False))
                except pynng.TryAgain:
                    pass
                return bool(frames)
            await wait_until(got_one, "the stranger receives a frame")
        finally:
            stranger.close()
    frame = frames[0]
    assert b"4111" not in frame and b"card" not in frame and b"pay" not in frame, frame


def _sniffer(disco: DiscoveryConfig) -> socket.socket:
    """A socket on the discovery port, joined to the group: what anyone on the LAN hears."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("", disco.port))
    mreq = socket.inet_aton(disco.multicast_group) + socket.inet_aton(disco.interface)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.setblocking(False)
    return s


async def test_a_replayed_beacon_does_not_bring_back_a_component(disco):
    captured: list[bytes] = []
    with _sniffer(disco) as sniffer:
        async with Requester("req", requests=["transfer"], secret=SECRET, discovery=disco) as rq:
            async with echo_responder(disco, [], secret=SECRET) as rep:
                await wait_until(lambda: [b.id for b in rq.peers()] == [rep.id], "it is found")

                def sniff() -> bool:
                    try:
                        while True:
                            data, _ = sniffer.recvfrom(65536)
                            if rep.id.encode() in data and b"hello" in data:
                                captured.append(data)
                    except BlockingIOError:
                        return bool(captured)
                await wait_until(sniff, "the responder's hello is captured")
            await wait_until(lambda: rq.peers() == [], "its bye drops it")
            before = rq.discovery.stats["received"]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                             socket.inet_aton(disco.interface))
                for data in captured:
                    s.sendto(data, (disco.multicast_group, disco.port))
            await wait_until(lambda: rq.discovery.stats["received"] >= before + len(captured),
                             "the replayed hellos reach the requester")
            assert rq.peers() == [], "a replayed beacon brought a component that left back"
            assert rq.discovery.stats["replayed"] >= len(captured)


async def test_a_fake_publisher_cannot_poison_dropped(disco):
    fake = pynng.Pub0()
    fake.listen("tcp://127.0.0.1:0")
    try:
        beacon = Beacon(id=uuid.uuid4().hex, name="fake", role="publisher",
                        endpoint=bound_address(fake))
        async with Subscriber("sub", discovery=disco) as sub:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                             socket.inet_aton(disco.interface))
                s.sendto(encode_datagram("hello", beacon), (disco.multicast_group, disco.port))

            def first_event() -> bool:
                fake.send(encode_one(Kind.PUBLISH, 1, ["t", 1, 1]))
                return sub.stats["received"] > 0
            await wait_until(first_event, "the subscriber hears the fake publisher")
            for seq in (2**62, 3, 2**62 + 10, 2**63 + 5):
                fake.send(encode_one(Kind.PUBLISH, seq, ["t", seq, seq]))
            fake.send(encode_one(Kind.PUBLISH, 2**62 + 11, ["t", "last", 0]))
            await wait_until(lambda: any(e.data == "last" for e in sub._buffer)
                             or sub.stats["bad_frames"] > 0, "the last event arrives")
            assert sub.stats["dropped"] < 1000, sub.stats
    finally:
        fake.close()


async def test_a_beacon_flood_leaves_table_and_links_bounded():
    # Static-peer (unicast) discovery on loopback: each side has its own port, so the
    # flood reaches the requester's listener and nobody else's.
    port_rq, port_rep = free_udp_port(), free_udp_port()
    cfg_rq = DiscoveryConfig(port=port_rq, multicast_group=None, interface="127.0.0.1",
                             peers=(f"127.0.0.1:{port_rep}",), hello_interval=0.5, expiry=2.0)
    cfg_rep = DiscoveryConfig(port=port_rep, multicast_group=None, interface="127.0.0.1",
                              peers=(f"127.0.0.1:{port_rq}",), hello_interval=0.5, expiry=2.0)
    served: list = []
    dead = []  # endpoints nobody listens on: a dial there is refused
    for _ in range(8):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead.append(s.getsockname()[1])
    async with echo_responder(cfg_rep, served), \
            Requester("req", requests=["transfer"], discovery=cfg_rq, dial_timeout=0.5) as rq:
        with trio.fail_after(5):
            assert await rq.send({"type": "transfer", "n": 0}) == {"done": 0}
        sources = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
        try:
            for s in sources:
                s.bind(("127.0.0.1", 0))
            sent = 0
            for round_ in range(25):  # 5,000 beacons, each a new "responder"
                for i, s in enumerate(sources):
                    b = Beacon(id=uuid.uuid4().hex, name=f"fake{i}", role="responder",
                               types=("transfer",),
                               endpoint=f"tcp://127.0.0.1:{dead[(i + round_) % len(dead)]}")
                    s.sendto(encode_datagram("hello", b), ("127.0.0.1", port_rq))
                    sent += 1
                await trio.sleep(0)  # let the requester read and serve meanwhile
                with trio.fail_after(5):
                    assert await rq.send({"type": "transfer", "n": sent}) == {"done": sent}
        finally:
            for s in sources:
                s.close()
        await wait_until(lambda: rq.discovery.stats["received"] >= 4000,
                         "most of the flood has been read", timeout=10)
        table, links = len(rq.discovery.table), len(rq.links)
        assert table <= 1024, table
        # Dialed lazily: the one that answers, and a few candidates at a time.
        assert links <= 1 + MAX_DIALING, links
        # The fakes never connect: dropped after the dial timeout and backed off.
        await wait_until(lambda: rq.stats["dial_failed"] >= MAX_DIALING, "fake dials expire")
        with trio.fail_after(10):
            for n in range(20):
                assert await rq.send({"type": "transfer", "n": n}) == {"done": n}
        assert len(rq.links) <= 1 + MAX_DIALING


async def test_a_requester_dials_only_the_responders_it_needs(disco):
    other = Responder("other", responds_to=["other"], discovery=disco)

    @other.on("other")
    def answer(req):
        return "other"
    async with echo_responder(disco, []) as rep, other, \
            Requester("req", requests=["transfer"], discovery=disco) as rq:
        await wait_until(lambda: len(rq.peers()) == 2, "both responders are discovered")
        await wait_until(lambda: list(rq.links) == [rep.id], "the one it needs is linked")
        with trio.fail_after(5):
            assert await rq.send({"type": "other"}) == "other"  # asked for: dialed then
        assert set(rq.links) == {rep.id, other.id}


async def test_a_publisher_flood_leaves_a_subscribers_links_bounded(disco):
    dead = []
    for _ in range(4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead.append(s.getsockname()[1])
    async with Publisher("pub", broadcasts=["tick"], discovery=disco) as pub, \
            Subscriber("sub", subscribes_to=["tick"], discovery=disco, dial_timeout=0.5) as sub:
        await wait_until(lambda: pub.subscribers == 1, "the real publisher is linked")
        sources = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]
        try:
            for s in sources:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                             socket.inet_aton(disco.interface))
                s.bind(("127.0.0.1", 0))
            for round_ in range(10):
                for i, s in enumerate(sources):
                    b = Beacon(id=uuid.uuid4().hex, name="fake", role="publisher",
                               endpoint=f"tcp://127.0.0.1:{dead[(i + round_) % len(dead)]}")
                    s.sendto(encode_datagram("hello", b), (disco.multicast_group, disco.port))
                await trio.sleep(0)
        finally:
            for s in sources:
                s.close()
        await wait_until(lambda: sub.stats["dial_failed"] >= MAX_DIALING, "fake dials expire")
        assert sub.links <= 1 + MAX_DIALING and len(sub.discovery.table) <= 1024

        def delivered() -> bool:
            pub.publish("tick", "real")
            return any(e.data == "real" for e in sub._buffer)
        await wait_until(delivered, "the real publisher's events still arrive")


def test_a_mesh_without_a_secret_does_not_load_cryptography():
    code = ("import sys, transport.mesh.requester, transport.mesh.responder, "
            "transport.mesh.pubsub, transport.mesh.monitor; "
            "assert 'cryptography' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
