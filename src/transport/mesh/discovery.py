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

Where multicast does not pass (Docker overlay networks, Kubernetes), two more sources
(docs/mesh.md): DNS seeds (:mod:`transport.mesh.dns_seeds`: names re-resolved every
``dns_interval``, each address a beacon destination like a static peer) and a Redis
registry (:mod:`transport.mesh.redis_registry`: each component's datagram kept under a
TTL, everyone's read back and fed to :meth:`Discovery.handle_datagram`).  Once started,
discovery logs one INFO line saying which methods work and which failed.
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
from transport.mesh.dns_seeds import DnsSeeds
# (re-exported: where the engine looks for it beside DiscoveryConfig)
from transport.mesh.interfaces import interface_for_endpoint as interface_for_endpoint
from transport.mesh.peers import (
    MAX_PEERS, MAX_PER_SOURCE, BadDatagram, Beacon, PeerTable, decode_datagram, encode_datagram,
    with_host,
)
from transport.mesh.redis_registry import RedisRegistry
from transport.mesh.redis_wire import parse_redis_url
from transport.mesh.replay import DEFAULT_MAX_SKEW, STALE, ReplayWindow
from transport.mesh.seeds import Change, parse_seed

DEFAULT_PORT = 47474
DEFAULT_GROUP = "239.255.74.74"
ASK_SCHEDULE = (0.0, 0.05, 0.2)     # a newcomer's asking hellos, in case UDP loses one
MAX_LEARNED = 1024                  # unicast return addresses kept (one per peer)
MAX_DEPARTED = 4096                 # ids of peers that said bye, remembered (oldest dropped)
IP_MULTICAST_ALL = 49               # Linux: deliver only groups this socket joined
DEFAULT_DNS_INTERVAL = 10.0         # seconds between two resolutions of the DNS seeds
REPORT_WAIT = 3.0                   # the start-up line waits this long for slow sources
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
    # cote's ignoreProcess: components of this same process do not see each other
    ignore_process: bool = False
    # Without multicast (docs/mesh.md): names re-resolved every dns_interval seconds,
    # each address a destination ("host" or "host:port"), and a Redis registry's URL
    # (redis://[[user]:password@]host[:port][/db]).
    dns_seeds: tuple[str, ...] = ()
    dns_interval: float = DEFAULT_DNS_INTERVAL
    redis: str | None = None
    static_targets: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False)
    dns_targets: tuple[tuple[str, int], ...] = field(init=False, repr=False, compare=False)

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
        seeds = (self.dns_seeds,) if isinstance(self.dns_seeds, str) else tuple(self.dns_seeds)
        object.__setattr__(self, "dns_seeds", seeds)
        object.__setattr__(self, "dns_targets", tuple(parse_seed(s, self.port) for s in seeds))
        if not self.dns_interval > 0:
            raise ValueError(f"dns_interval must be > 0, got {self.dns_interval}")
        if self.redis == "":
            object.__setattr__(self, "redis", None)
        if self.redis is not None:
            parse_redis_url(self.redis)  # a bad URL fails here, not at start

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> DiscoveryConfig:
        """Read MESH_PORT, MESH_GROUP ("" disables multicast), MESH_BROADCAST,
        MESH_INTERFACE and MESH_PEERS (comma-separated): the container recipe; and
        MESH_DNS_SEEDS (comma-separated), MESH_DNS_INTERVAL (s) and MESH_REDIS (a URL);
        MESH_HELLO_INTERVAL and MESH_EXPIRY (s), MESH_IGNORE_PROCESS; and cote's
        COTE_HELLO_INTERVAL, COTE_NODE_TIMEOUT (ms), COTE_MULTICAST_ADDRESS,
        COTE_BROADCAST_ADDRESS and COTE_IGNORE_PROCESS where ours are not set
        (docs/mesh.md has the table)."""
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
        if env.get("MESH_DNS_SEEDS"):
            kw["dns_seeds"] = tuple(s.strip() for s in env["MESH_DNS_SEEDS"].split(",")
                                    if s.strip())
        if env.get("MESH_DNS_INTERVAL"):
            kw["dns_interval"] = float(env["MESH_DNS_INTERVAL"])
        if env.get("MESH_REDIS"):
            kw["redis"] = env["MESH_REDIS"]
        # timing: ours in seconds, else cote's in milliseconds
        if env.get("MESH_HELLO_INTERVAL"):
            kw["hello_interval"] = float(env["MESH_HELLO_INTERVAL"])
        elif env.get("COTE_HELLO_INTERVAL"):
            kw["hello_interval"] = float(env["COTE_HELLO_INTERVAL"]) / 1000
        if env.get("MESH_EXPIRY"):
            kw["expiry"] = float(env["MESH_EXPIRY"])
        elif env.get("COTE_NODE_TIMEOUT"):
            kw["expiry"] = float(env["COTE_NODE_TIMEOUT"]) / 1000
        if "multicast_group" not in kw and env.get("COTE_MULTICAST_ADDRESS"):
            kw["multicast_group"] = env["COTE_MULTICAST_ADDRESS"]
        if "broadcast" not in kw and env.get("COTE_BROADCAST_ADDRESS"):
            kw["broadcast"] = env["COTE_BROADCAST_ADDRESS"]
        flag = env.get("MESH_IGNORE_PROCESS", env.get("COTE_IGNORE_PROCESS", ""))
        if flag:
            kw["ignore_process"] = flag.strip().lower() in ("1", "true", "yes", "on")
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
        # peers that said bye (left on purpose), against those merely not heard for a
        # while: a component keeps a working connection to the latter (dialing.py)
        self.departed: dict[str, float] = {}
        self._listen: socket.socket | None = None
        self._send: socket.socket | None = None
        self._destinations: list[tuple[str, int]] = []
        self.multicast_ok = False
        self._multicast_problem: str | None = None  # why multicast is off, if it failed
        self._multicast_error: str | None = None    # its errno's name, for the start-up line
        # The sources beside the sockets (made by run; None when not configured).
        self.dns: DnsSeeds | None = None
        self.redis: RedisRegistry | None = None
        self.startup_report: str | None = None      # the start-up line, once logged
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
        off, each beacon destination failing (with its errno and since when), each DNS
        seed that does not resolve, Redis unreachable.  Empty when healthy."""
        now = _now()
        out = [self._multicast_problem] if self._multicast_problem else []
        out += self._health.problems(now)
        if self.dns is not None:
            out += self.dns.problems()
        if self.redis is not None:
            out += self.redis.problems(now)
        return out

    def _said_bye(self, peer_id: str) -> None:
        departed = self.departed
        departed.pop(peer_id, None)
        if len(departed) >= MAX_DEPARTED:
            del departed[next(iter(departed))]   # the oldest goes
        departed[peer_id] = _now()

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
        self._multicast_error = None
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
        self._multicast_error = errno_name(exc.errno)
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
        if self.dns is not None:
            targets.extend(a for a in sorted(self.dns.targets()) if a not in targets)
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
    def handle_datagram(self, data: bytes, src: tuple[str, int], now: float, *,
                        unicast: bool = True) -> None:
        """Apply one datagram (public so tests can feed garbage without a socket).

        ``unicast=False``: ``src`` is no UDP address but names where the datagram was
        read (a Redis entry): it is not beaconed to, asks are not answered there, and a
        wildcard endpoint is not rewritten to it (the writer did that itself)."""
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
        if self.config.ignore_process and self.me is not None \
                and beacon.pid == self.me.pid and beacon.host == self.me.host:
            return  # (ignore_process) a component of this very process
        if dgram.verified:
            verdict = self._replay.accept(beacon.id, dgram.seq, dgram.at, time.time())
            if verdict is not None:
                self.stats["stale" if verdict == STALE else "replayed"] += 1
                return
        if dgram.op == "bye":
            self._learned.pop(beacon.id, None)
            self._said_bye(beacon.id)
            if self.table.forget(beacon.id) is not None:
                self._bump()
            return
        if self.departed:
            self.departed.pop(beacon.id, None)   # back (a hello after its bye)
        if unicast:
            beacon = with_host(beacon, src[0])
        if self.monitor and dgram.signed and not dgram.verified:
            beacon = _mark_unverified(beacon)
        refused = self.table.refused
        change = self.table.observe(beacon, now, src)
        if self.table.refused != refused:
            self.stats["refused"] += 1
            return  # no room for a newcomer: not learned, not answered
        if unicast and beacon.id in self.table and src not in self._destinations:
            if beacon.id in self._learned or len(self._learned) < MAX_LEARNED:
                self._learned[beacon.id] = src
        if change is not None:
            self._bump()
        if unicast and dgram.ask and self.me is not None:  # (a monitor of any scope asks too)
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

    # -- the sources beside the sockets: DNS seeds, the Redis registry ---------------------
    def _make_sources(self) -> None:
        cfg = self.config
        self.dns = (DnsSeeds(cfg.dns_targets, cfg.dns_interval, self._dns_changed)
                    if cfg.dns_targets else None)
        self.redis = None
        if cfg.redis is not None:
            me = self.me
            self.redis = RedisRegistry(
                cfg.redis, me_id=me.id if me is not None else None,
                environment=me.environment if me is not None else "",
                read_all=self.monitor, hello_interval=cfg.hello_interval, expiry=cfg.expiry,
                max_entries=cfg.max_peers * 2, entry=self._redis_entry,
                deliver=self._redis_delivered)

    def _dns_changed(self, change: Change) -> None:
        """A DNS seed's answer changed: new addresses are asked at once (as a newcomer
        asks), so a pod that appears is found in a round trip, not a hello interval."""
        if self.me is None or self._send is None:
            return
        for addr in sorted(change.added):
            if addr not in self._destinations:
                self._sendto(self._datagram("hello", self.me, ask=True), addr, beacon=True)

    def _redis_entry(self, op: str, host: str) -> bytes | None:
        """The datagram stored in Redis: the beacon's wildcard endpoint made dialable
        with this end's address as Redis sees it (a reader has no source address)."""
        if self.me is None:
            return None
        return self._datagram(op, with_host(self.me, host))

    def _redis_delivered(self, data: bytes, source: tuple[str, int]) -> None:
        self.handle_datagram(data, source, _now(), unicast=False)

    def describe(self) -> str:
        """Each discovery method and its state, in one line (what start-up logs)."""
        cfg = self.config
        iface = cfg.interface
        if not cfg.multicast_group:
            parts = ["multicast off"]
        elif self.multicast_ok:
            parts = [f"multicast {cfg.multicast_group}:{cfg.port} on {iface} ok"]
        else:
            parts = [f"multicast {cfg.multicast_group}:{cfg.port} on {iface} failed "
                     f"({self._multicast_error or 'not joined'})"]
        bcast = cfg.broadcast or (None if self.multicast_ok else "255.255.255.255")
        if bcast is None:
            parts.append("broadcast off")
        else:
            parts.append(f"broadcast {bcast}:{cfg.port}"
                         + ("" if cfg.broadcast else " (the fallback)"))
        n = len(cfg.static_targets)
        parts.append(f"static peers {n}" if n else "static peers off")
        parts.append(self.dns.describe() if self.dns is not None else "dns seeds off")
        parts.append(self.redis.describe() if self.redis is not None else "redis off")
        failing = self._health.problems(_now())
        if failing:
            parts.append("failing: " + ", ".join(failing))
        return "; ".join(parts)

    async def _report_start(self) -> None:
        """Log the start-up line once every source has tried once, or after
        REPORT_WAIT seconds (a DNS server that does not answer must not hide the line:
        such a source shows as "resolving" or "connecting")."""
        with trio.move_on_after(REPORT_WAIT):
            for source in (self.dns, self.redis):
                if source is not None:
                    await source.first_attempt.wait()
        self.startup_report = self.describe()
        log.info("discovery: %s", self.startup_report)

    async def run(self, *, task_status: trio.TaskStatus[Discovery] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        listen, send = self._open_sockets()
        self._make_sources()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive_loop, listen)
                nursery.start_soon(self._receive_loop, send)
                nursery.start_soon(self._expiry_loop)
                nursery.start_soon(self._announce_loop)
                if self.dns is not None:
                    nursery.start_soon(self.dns.run)
                if self.redis is not None:
                    nursery.start_soon(self.redis.run)
                nursery.start_soon(self._report_start)
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
