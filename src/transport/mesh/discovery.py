"""Zero-config discovery over UDP beacons: the trio shell around :mod:`transport.mesh.peers`.

Protocol (docs/mesh.md has the bytes): every component sends a ``hello`` datagram when
it starts and every ``hello_interval`` seconds, to the multicast group, to the broadcast
address when enabled (or when multicast cannot be set up), to every static peer, and to
every peer it learned by unicast.  A newcomer's first hellos carry ``ask``: whoever hears
one answers at once with its own hello, sent straight back to the asker, so discovery
takes one round trip in either start order instead of a hello interval.  A component
leaving says ``bye``; one that dies is dropped ``expiry`` seconds after its last hello.

Two sockets: a listener bound to the discovery port (shared by every component on the
host, SO_REUSEPORT) that joins the group, and a sender on an ephemeral port, so unicast
answers reach exactly the component that asked.

With a secret, datagrams are signed and carry a sequence number and the time; an
authentic one seen before (or too far from this host's clock) is refused
(:class:`~transport.mesh.replay.ReplayWindow`), so a captured beacon cannot be sent
again to keep a departed component alive or bring it back.  The table is bounded
(``DiscoveryConfig.max_peers``, ``max_per_source``); a beacon it has no room for is
neither learned nor answered.

Failing silently would leave a node running alone with nothing said: a multicast group
that cannot be joined is a WARNING (naming the interface, the group and the errno) and
a destination beacons keep failing to is one WARNING when it starts and one INFO when it
recovers (:mod:`transport.mesh.beacon_health`); :meth:`Discovery.problems` lists what is
wrong now, and ``stats`` counts it.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import trio

from transport.mesh.beacon_health import BeaconHealth, describe_errno, errno_name
# (re-exported: where the engine looks for it beside DiscoveryConfig)
from transport.mesh.interfaces import interface_for_endpoint as interface_for_endpoint
from transport.mesh.peers import (
    MAX_PEERS, MAX_PER_SOURCE, BadDatagram, Beacon, PeerTable, decode_datagram, encode_datagram,
    with_host,
)
from transport.mesh.replay import DEFAULT_MAX_SKEW, STALE, ReplayWindow

DEFAULT_PORT = 47474
DEFAULT_GROUP = "239.255.74.74"
ASK_SCHEDULE = (0.0, 0.05, 0.2)     # a newcomer's asking hellos, in case UDP loses one
MAX_LEARNED = 1024                  # unicast return addresses kept (one per peer)
IP_MULTICAST_ALL = 49               # Linux: deliver only groups this socket joined
log = logging.getLogger(__name__)


def _udp_socket() -> socket.socket:
    """A new UDP socket (a seam: tests put a failing socket layer here)."""
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _now() -> float:
    """trio's clock in trio (a test's MockClock included), else a monotonic one."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


def _parse_peer(spec: str, default_port: int) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep:
        return spec, default_port
    if not port.isdigit() or not host:
        raise ValueError(f"static peer must be host or host:port, got {spec!r}")
    return host, int(port)


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where beacons go.  The defaults work on a LAN with multicast; tests confine
    discovery to loopback with ``interface="127.0.0.1"`` and a free ``port``."""

    port: int = DEFAULT_PORT
    multicast_group: str | None = DEFAULT_GROUP
    broadcast: str | None = None        # e.g. "255.255.255.255"; the fallback without multicast
    interface: str = "0.0.0.0"          # IPv4 address of the interface to use
    peers: tuple[str, ...] = ()         # static seeds: "host" or "host:port"
    hello_interval: float = 1.0
    expiry: float = 4.0
    ttl: int = 1
    # Bounds (docs/mesh.md): peers a component keeps, peers one source address may
    # speak for, and how far apart (s) the clocks of a mesh with a secret may be.
    max_peers: int = MAX_PEERS
    max_per_source: int = MAX_PER_SOURCE
    max_skew: float = DEFAULT_MAX_SKEW
    static_targets: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0 < self.port < 65536):
            raise ValueError(f"discovery port must be 1..65535, got {self.port}")
        if self.hello_interval <= 0 or self.expiry <= self.hello_interval:
            raise ValueError("need 0 < hello_interval < expiry")
        if self.max_peers < 1 or self.max_per_source < 1 or self.max_skew <= 0:
            raise ValueError("need max_peers >= 1, max_per_source >= 1 and max_skew > 0")
        peers = (self.peers,) if isinstance(self.peers, str) else tuple(self.peers)
        object.__setattr__(self, "peers", peers)
        object.__setattr__(self, "static_targets",
                           tuple(_parse_peer(p, self.port) for p in peers))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DiscoveryConfig:
        """Read MESH_PORT, MESH_GROUP ("" disables multicast), MESH_BROADCAST,
        MESH_INTERFACE and MESH_PEERS (comma-separated): the container recipe."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        if env.get("MESH_PORT"):
            kw["port"] = int(env["MESH_PORT"])
        if "MESH_GROUP" in env:
            kw["multicast_group"] = env["MESH_GROUP"] or None
        if env.get("MESH_BROADCAST"):
            kw["broadcast"] = env["MESH_BROADCAST"]
        if env.get("MESH_INTERFACE"):
            kw["interface"] = env["MESH_INTERFACE"]
        if env.get("MESH_PEERS"):
            kw["peers"] = tuple(p.strip() for p in env["MESH_PEERS"].split(",") if p.strip())
        if env.get("MESH_MAX_SKEW"):
            kw["max_skew"] = float(env["MESH_MAX_SKEW"])
        kw.update(overrides)
        return cls(**kw)


class Discovery:
    """Announce ``me`` and keep a :class:`PeerTable` of what is heard.

    ``me=None`` or ``monitor=True`` keeps every peer regardless of namespace and key
    (and, without a secret, shows signed peers as unverified instead of rejecting them).
    Components wait for changes with :meth:`wait_change` and reconcile with
    :meth:`peers` (level-triggered: nothing is lost if several changes coalesce).
    """

    def __init__(self, me: Beacon | None, config: DiscoveryConfig | None = None, *,
                 secret: bytes | None = None, monitor: bool = False):
        self.me = me
        self.config = config or DiscoveryConfig()
        self.secret = secret
        self.monitor = monitor or me is None
        cfg = self.config
        self.table = PeerTable(expiry=cfg.expiry, me=None if self.monitor else me,
                               max_peers=cfg.max_peers, max_per_source=cfg.max_per_source)
        # Signed beacons seen, per sender id: a captured one sent again is refused.
        self._replay: ReplayWindow[str] = ReplayWindow(max_skew=cfg.max_skew,
                                                       max_senders=cfg.max_peers * 4)
        self._seq = 0
        self.version = 0
        self._changed = trio.Event()
        self._learned: dict[str, tuple[str, int]] = {}  # peer id -> its sender address
        self._listen: socket.socket | None = None
        self._send: socket.socket | None = None
        self._destinations: list[tuple[str, int]] = []
        self.multicast_ok = False
        self._multicast_problem: str | None = None  # why multicast is off, if it failed
        self._health = BeaconHealth()  # beacon destinations failing now
        # bad: not a (valid, authentic) beacon; replayed/stale: authentic but sent
        # before, or outside the clock window; refused: a new peer there was no room
        # for (the table full, or its source speaks for too many peers already);
        # multicast_errors: failed attempts to set multicast up (joining the group).
        self.stats = {"received": 0, "bad": 0, "replayed": 0, "stale": 0, "refused": 0,
                      "sent": 0, "send_errors": 0, "answered": 0, "multicast_errors": 0}
        self.started = trio.Event()

    # -- what components use ------------------------------------------------------
    def peers(self) -> list[Beacon]:
        return self.table.peers()

    def problems(self) -> list[str]:
        """What is wrong now, for people (``info``, a status page): why multicast is
        off, and each beacon destination failing (with its errno and since when).
        Empty when healthy."""
        out = [self._multicast_problem] if self._multicast_problem else []
        return out + self._health.problems(_now())

    async def wait_change(self, seen: int) -> int:
        """Return the current version once it differs from ``seen``."""
        while self.version == seen:
            await self._changed.wait()
        return self.version

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    # -- sockets --------------------------------------------------------------------
    def _open_sockets(self) -> tuple[socket.socket, socket.socket]:
        """The listening and the sending socket, bound (also kept for announce)."""
        cfg = self.config
        self._multicast_problem, self._health = None, BeaconHealth()  # (a run anew)
        listen = _udp_socket()
        send = _udp_socket()
        try:
            listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listen.bind(("", cfg.port))
            if cfg.multicast_group:
                try:
                    mreq = socket.inet_aton(cfg.multicast_group) + socket.inet_aton(cfg.interface)
                    listen.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                    try:
                        listen.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
                    except OSError:
                        pass  # not Linux: the port alone separates meshes
                    send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                                    socket.inet_aton(cfg.interface))
                    send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, cfg.ttl)
                    send.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
                    self.multicast_ok = True
                except OSError as exc:
                    self.multicast_ok = False  # no multicast here: fall back to broadcast
                    self._multicast_failed(exc)
            send.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            send.bind((cfg.interface if cfg.interface != "0.0.0.0" else "", 0))
            for s in (listen, send):
                s.setblocking(False)
        except BaseException:
            listen.close()
            send.close()
            raise
        self._listen, self._send = listen, send
        dests: list[tuple[str, int]] = []
        if self.multicast_ok and cfg.multicast_group:
            dests.append((cfg.multicast_group, cfg.port))
        bcast = cfg.broadcast or (None if self.multicast_ok else "255.255.255.255")
        if bcast:
            dests.append((bcast, cfg.port))
        dests.extend(cfg.static_targets)
        self._destinations = dests
        return listen, send

    def _multicast_failed(self, exc: OSError) -> None:
        """Say why multicast is off (once: sockets are opened once per run)."""
        cfg = self.config
        self.stats["multicast_errors"] += 1
        iface = cfg.interface if cfg.interface != "0.0.0.0" else "the default interface (0.0.0.0)"
        if exc.errno == errno.ENODEV:
            hint = (f"no route for {cfg.multicast_group}" if cfg.interface == "0.0.0.0"
                    else f"no interface has the address {cfg.interface}")
        else:
            hint = os.strerror(exc.errno) if exc.errno else str(exc)
        fallback = cfg.broadcast or "255.255.255.255"
        self._multicast_problem = (
            f"multicast join on {iface} failed: {errno_name(exc.errno)} ({hint}); "
            f"using broadcast {fallback}:{cfg.port}")
        log.warning("discovery: multicast group %s:%d cannot be joined on %s: %s (%s); "
                    "beaconing by broadcast to %s instead (set MESH_INTERFACE to the "
                    "interface peers are on, or MESH_PEERS)", cfg.multicast_group, cfg.port,
                    iface, errno_name(exc.errno), hint, fallback)

    # -- sending ----------------------------------------------------------------------
    def _sendto(self, data: bytes, addr: tuple[str, int], *, beacon: bool = False) -> None:
        """Send one datagram; a failure costs only it.  ``beacon``: ``addr`` is one of
        the destinations beacons go to, whose health is tracked (answers to askers go
        to any address: only counted)."""
        send = self._send
        if send is None:  # not running (a datagram fed by a test): nothing to send through
            return
        try:
            send.sendto(data, addr)
        except OSError as exc:
            # A full buffer or an unreachable seed costs one beacon, never the component.
            if exc.errno not in (errno.EAGAIN, errno.ENETUNREACH, errno.EHOSTUNREACH,
                                 errno.ECONNREFUSED, errno.EACCES, errno.EADDRNOTAVAIL,
                                 errno.EINVAL, errno.ENOBUFS, errno.ENODEV):
                raise
            self.stats["send_errors"] += 1
            if beacon and self._health.failed(addr, exc.errno, _now()):
                log.warning("discovery: beacons to %s:%d not sent: %s; peers there cannot "
                            "see this node (further failures alike are only counted, in "
                            "Discovery.stats['send_errors'])", addr[0], addr[1],
                            describe_errno(exc.errno))
            return
        self.stats["sent"] += 1
        if beacon and self._health:
            ended = self._health.sent(addr)
            if ended is not None:
                log.info("discovery: beacons to %s:%d sent again, after %.0f s of %s "
                         "(%d failed)", addr[0], addr[1], _now() - ended.since,
                         errno_name(ended.errno), ended.count)

    def _datagram(self, op: str, me: Beacon, ask: bool = False) -> bytes:
        """A datagram with the next sequence number and the time (signed ones must
        have both: they are how receivers refuse replays)."""
        self._seq += 1
        return encode_datagram(op, me, ask=ask, secret=self.secret, seq=self._seq,
                               at=time.time())

    def announce(self, op: str = "hello", *, ask: bool = False) -> None:
        if self.me is None or self._send is None:
            return
        targets = list(self._destinations)
        targets.extend(a for a in self._learned.values() if a not in targets)
        if self._health:
            self._health.keep(set(targets))  # a peer gone: its address is no problem
        data = self._datagram(op, self.me, ask)
        for addr in targets:
            # Signed: one datagram per target, each with its own number: a peer reached
            # both by the group and by unicast gets two different ones, and neither
            # looks like a replay of the other.
            self._sendto(data, addr, beacon=True)
            if self.secret:
                data = self._datagram(op, self.me, ask)

    # -- receiving ----------------------------------------------------------------------
    def handle_datagram(self, data: bytes, src: tuple[str, int], now: float) -> None:
        """Apply one datagram (public so tests can feed garbage without a socket)."""
        self.stats["received"] += 1
        try:
            dgram = decode_datagram(data, secret=self.secret, require_auth=not self.monitor
                                    or self.secret is not None)
        except BadDatagram:
            self.stats["bad"] += 1
            return
        beacon = dgram.beacon
        if self.me is not None and beacon.id == self.me.id:
            return  # our own multicast, looped back
        if dgram.verified:
            verdict = self._replay.accept(beacon.id, dgram.seq, dgram.at, time.time())
            if verdict is not None:
                self.stats["stale" if verdict == STALE else "replayed"] += 1
                return
        if dgram.op == "bye":
            self._learned.pop(beacon.id, None)
            if self.table.forget(beacon.id) is not None:
                self._bump()
            return
        beacon = with_host(beacon, src[0])
        if self.monitor and dgram.signed and not dgram.verified:
            beacon = _mark_unverified(beacon)
        refused = self.table.refused
        change = self.table.observe(beacon, now, src)
        if self.table.refused != refused:
            self.stats["refused"] += 1
            return  # no room for a newcomer: not learned, not answered
        if beacon.id in self.table and src not in self._destinations:
            if beacon.id in self._learned or len(self._learned) < MAX_LEARNED:
                self._learned[beacon.id] = src
        if change is not None:
            self._bump()
        if dgram.ask and self.me is not None:  # (a monitor of any scope asks too)
            self._sendto(self._datagram("hello", self.me), src)
            self.stats["answered"] += 1

    async def _receive_loop(self, sock: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, src = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    # e.g. ICMP port unreachable reported on the sender socket
                    self.stats["send_errors"] += 1
                    continue
                self.handle_datagram(data, src, trio.current_time())
            await trio.lowlevel.checkpoint()

    async def _announce_loop(self) -> None:
        start = trio.current_time()
        for offset in ASK_SCHEDULE:
            await trio.sleep_until(start + offset)
            self.announce(ask=True)
        while True:
            await trio.sleep(self.config.hello_interval)
            self.announce()

    async def _expiry_loop(self) -> None:
        while True:
            due = self.table.next_expiry()
            if due is None:
                await trio.sleep(self.config.expiry)
                continue
            await trio.sleep_until(due + 0.001)
            gone = self.table.expire(trio.current_time())
            for b in gone:
                self._learned.pop(b.id, None)
            if gone:
                self._bump()

    async def run(self, *, task_status: trio.TaskStatus[Discovery] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listen, send = self._open_sockets()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, listen)
                nursery.start_soon(self._receive_loop, send)
                nursery.start_soon(self._expiry_loop)
                nursery.start_soon(self._announce_loop)
                self.started.set()
                task_status.started(self)
        finally:
            try:
                self.announce("bye")  # let peers drop us now rather than after expiry
            except OSError:
                pass
            for s in (self._listen, self._send):
                if s is not None:
                    trio.lowlevel.notify_closing(s)
                    s.close()


def _mark_unverified(beacon: Beacon) -> Beacon:
    return replace(beacon, name=beacon.name + " (signed, unverified)")
