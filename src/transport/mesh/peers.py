"""The mesh's discovery table: pure, no I/O, no trio (driven by transport/discovery.py).

A component announces itself with a :class:`Beacon`.  A :class:`PeerTable` holds the
beacons a component has heard, drops a peer that stops announcing (``expiry`` seconds
after its last beacon) or says goodbye, and answers the two questions the components
ask: *who may I see* (same namespace and key) and *who serves this event type*
(advertised types, with cote's wildcards), choosing round-robin among the latter.
It is bounded (``max_peers``, ``max_per_source``): on an open mesh anyone may send
beacons, and a flood of fake ones must cost a fixed amount of memory, not a table entry
each.

The datagram format (``encode_datagram``/``decode_datagram``) lives here too, so the
parser that faces the network is a pure function that raises only :class:`BadDatagram`.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Iterable

import msgpack

ROLES = ("requester", "responder", "publisher", "subscriber", "monitor")
# Which role serves which: a requester talks to responders, a subscriber to publishers.
SERVED_BY = {"requester": "responder", "subscriber": "publisher"}

MAGIC = b"ETMB"        # engine-trio mesh beacon
VERSION = 1
FLAG_SIGNED = 1
TAG_SIZE = 32          # HMAC-SHA256
MAX_DATAGRAM = 8192    # beacons are small; anything bigger is not ours
# A beacon's links (who a Requester sends to, who feeds a Subscriber): at most this many
# pairs, of peer ids at most this long, so a beacon with all of them stays far below
# MAX_DATAGRAM (64 x (64 + 9 + 3) bytes: ~4.9 KB) whatever its peers call themselves.
MAX_LINKS = 64
MAX_LINK_ID = 64
MAX_COUNT = 2**63 - 1


class BadDatagram(ValueError):
    """Bytes that are not a valid beacon datagram (or fail authentication)."""


@dataclass(frozen=True)
class Beacon:
    """What a component says about itself.  ``id`` is unique per component instance."""

    id: str
    name: str
    role: str
    namespace: str = ""
    key: str = ""
    types: tuple[str, ...] = ()      # advertised event types (may be wildcards)
    endpoint: str = ""               # nng url to dial ("" for roles that only dial)
    host: str = ""
    pid: int = 0
    environment: str = ""            # cote's environment: whole deployments apart on one network
    subset: str = ""                 # a Responder's subset: requests may ask for one (cote)
    # (peer id, count): a Requester's Responders and the requests it sent each, a
    # Subscriber's Publishers and the events it received from each (the monitor's graph)
    links: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name, value in (("id", self.id), ("name", self.name), ("namespace", self.namespace),
                            ("key", self.key), ("endpoint", self.endpoint), ("host", self.host),
                            ("environment", self.environment), ("subset", self.subset)):
            if not isinstance(value, str):
                raise ValueError(f"beacon {name} must be a string")
        if not self.id:
            raise ValueError("beacon id must not be empty")
        if not isinstance(self.pid, int) or isinstance(self.pid, bool):
            raise ValueError("beacon pid must be an int")
        if not isinstance(self.types, tuple) or not all(isinstance(t, str) for t in self.types):
            raise ValueError("beacon types must be a tuple of strings")
        if self.links:
            check_links(self.links)

    def to_wire(self) -> dict[str, Any]:
        wire = {"id": self.id, "n": self.name, "r": self.role, "ns": self.namespace,
                "k": self.key, "t": list(self.types), "e": self.endpoint, "h": self.host,
                "p": self.pid}
        if self.environment:     # (absent: the default environment, as older beacons say)
            wire["env"] = self.environment
        if self.subset:
            wire["s"] = self.subset
        if self.links:           # (absent: no links, as older beacons say)
            wire["l"] = [[peer, count] for peer, count in self.links]
        return wire

    @classmethod
    def from_wire(cls, d: Any) -> "Beacon":
        if not isinstance(d, dict):
            raise BadDatagram("beacon must be a map")
        try:
            types = d.get("t", [])
            if not isinstance(types, list):
                raise ValueError("types must be a list")
            links = d.get("l", [])
            if not isinstance(links, list) or not all(
                    isinstance(pair, list) and len(pair) == 2 for pair in links):
                raise ValueError("links must be a list of [id, count] pairs")
            return cls(id=d["id"], name=d["n"], role=d["r"], namespace=d.get("ns", ""),
                       key=d.get("k", ""), types=tuple(types), endpoint=d.get("e", ""),
                       host=d.get("h", ""), pid=d.get("p", 0), environment=d.get("env", ""),
                       subset=d.get("s", ""), links=tuple((p, c) for p, c in links))
        except (KeyError, ValueError, TypeError) as exc:
            raise BadDatagram(f"bad beacon: {exc}") from None

    def same_scope(self, other: "Beacon") -> bool:
        """Environment, namespace and key all equal: the only peers a component may see."""
        return (self.namespace == other.namespace and self.key == other.key
                and self.environment == other.environment)


def check_links(links: Any) -> None:
    """Raise ValueError unless ``links`` is a tuple of at most MAX_LINKS (peer id,
    count) pairs: ids non-empty strings of at most MAX_LINK_ID characters, counts ints
    in 0..MAX_COUNT (they come from the network: Beacon.from_wire)."""
    if not isinstance(links, tuple) or len(links) > MAX_LINKS:
        raise ValueError(f"beacon links must be a tuple of at most {MAX_LINKS} pairs")
    for pair in links:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError("a beacon link is a (peer id, count) pair")
        peer, count = pair
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_LINK_ID:
            raise ValueError(f"a link's peer id must be a string of 1..{MAX_LINK_ID} characters")
        if type(count) is not int or not 0 <= count <= MAX_COUNT:
            raise ValueError("a link's count must be a non-negative int")


def links_of(counts: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """What a beacon's ``links`` say of ``counts`` ((peer id, count), e.g. a Requester's
    links): ids too long for a beacon left out, the MAX_LINKS busiest kept, sorted by id
    (so the same counts make the same beacon)."""
    kept = [(peer, min(max(count, 0), MAX_COUNT)) for peer, count in counts
            if 0 < len(peer) <= MAX_LINK_ID]
    if len(kept) > MAX_LINKS:
        kept.sort(key=lambda pair: (-pair[1], pair[0]))
        del kept[MAX_LINKS:]
    kept.sort()
    return tuple(kept)


# -- wildcards ---------------------------------------------------------------------

@lru_cache(maxsize=4096)
def _split(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


@lru_cache(maxsize=8192)
def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    if not a and not b:
        return True
    if a and a[0] == "**":
        return _overlap(a[1:], b) or (bool(b) and _overlap(a, b[1:]))
    if b and b[0] == "**":
        return _overlap(a, b[1:]) or (bool(a) and _overlap(a[1:], b))
    if not a or not b:
        return False
    if a[0] == "*" or b[0] == "*" or a[0] == b[0]:
        return _overlap(a[1:], b[1:])
    return False


def matches(a: str, b: str) -> bool:
    """Whether two event names/patterns can name the same event.

    Names are dot-separated segments, as in cote (EventEmitter2): ``*`` stands for
    exactly one segment (``user.*`` matches ``user.created``), ``**`` for any number
    (``**`` matches everything).  Either side may be a pattern, so a subscriber to
    ``user.*`` matches a publisher advertising ``user.created`` and vice versa.
    """
    if a == b:
        return True
    return _overlap(_split(a), _split(b))


def any_match(patterns: Iterable[str], name: str) -> bool:
    return any(matches(p, name) for p in patterns)


# -- the table ---------------------------------------------------------------------

Source = tuple[str, int]   # the (address, port) a beacon came from

MAX_PEERS = 1024           # a table's default size: peers beyond it wait for room
MAX_PER_SOURCE = 8         # peers one source address may speak for (a component: 1)


@dataclass
class _Entry:
    beacon: Beacon
    last_seen: float
    source: Source | None = None


@dataclass
class PeerTable:
    """Peers heard recently.  ``me`` (when given) scopes what is kept: only peers in
    the same namespace and key, never oneself.  A table without ``me`` keeps everyone
    (the monitor).

    Bounded, because on an open mesh anyone may send beacons: at most ``max_peers``
    peers (a newcomer to a full table is refused, counted in ``refused``, until a peer
    leaves or expires; the peers already known keep refreshing), and at most
    ``max_per_source`` of them announced from one source address.  Every component
    sends its beacons from a socket of its own, so a real source speaks for one peer
    (two across a restart on the same port); a flood from one socket gets
    ``max_per_source`` entries, not thousands."""

    expiry: float = 4.0
    me: Beacon | None = None
    max_peers: int = MAX_PEERS
    max_per_source: int = MAX_PER_SOURCE
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _turn: dict[str, int] = field(default_factory=dict)
    _sources: dict[Source, int] = field(default_factory=dict)
    ignored: int = 0   # beacons heard from another scope
    refused: int = 0   # beacons of new peers turned away (table or source full)

    def __post_init__(self) -> None:
        if self.max_peers < 1 or self.max_per_source < 1:
            raise ValueError("need max_peers >= 1 and max_per_source >= 1")

    def observe(self, beacon: Beacon, now: float, source: Source | None = None) -> str | None:
        """Record a beacon heard from ``source``.  Returns "added", "changed" (same id,
        new details), or None for a plain refresh or an ignored or refused beacon.  New
        ``links`` alone are kept but are no change: they move with every request a
        Requester sends, and only the monitor reads them (no component re-plans its own
        links each second because a peer's counts moved)."""
        if self.me is not None:
            if beacon.id == self.me.id:
                return None
            if not self.me.same_scope(beacon):
                self.ignored += 1
                return None
        entry = self._entries.get(beacon.id)
        if entry is None:
            if len(self._entries) >= self.max_peers or (
                    source is not None and self._sources.get(source, 0) >= self.max_per_source):
                self.refused += 1
                return None
            self._entries[beacon.id] = _Entry(beacon, now, source)
            self._count_source(source, 1)
            return "added"
        entry.last_seen = max(entry.last_seen, now)
        if source is not None and entry.source != source:  # e.g. a NAT rebound its port
            self._count_source(entry.source, -1)
            entry.source = source
            self._count_source(source, 1)
        if entry.beacon != beacon:
            counts_only = entry.beacon.links != beacon.links and \
                replace(entry.beacon, links=beacon.links) == beacon
            entry.beacon = beacon
            return None if counts_only else "changed"
        return None

    def _count_source(self, source: Source | None, delta: int) -> None:
        if source is None:
            return
        n = self._sources.get(source, 0) + delta
        if n > 0:
            self._sources[source] = n
        else:
            self._sources.pop(source, None)

    def _drop(self, peer_id: str) -> Beacon:
        entry = self._entries.pop(peer_id)
        self._count_source(entry.source, -1)
        return entry.beacon

    def forget(self, peer_id: str) -> Beacon | None:
        return self._drop(peer_id) if peer_id in self._entries else None

    def expire(self, now: float) -> list[Beacon]:
        """Drop peers silent for longer than ``expiry``; return them."""
        gone = [pid for pid, e in self._entries.items() if now - e.last_seen > self.expiry]
        return [self._drop(pid) for pid in gone]

    @property
    def sources(self) -> int:
        """Source addresses the peers were heard from (bounded by ``max_peers``)."""
        return len(self._sources)

    def next_expiry(self) -> float | None:
        """When the next peer would expire if it stays silent (for the shell's sleep)."""
        if not self._entries:
            return None
        return min(e.last_seen for e in self._entries.values()) + self.expiry

    def peers(self) -> list[Beacon]:
        """Every peer, the longest known first."""
        return [e.beacon for e in self._entries.values()]

    def last_seen(self, peer_id: str) -> float | None:
        entry = self._entries.get(peer_id)
        return entry.last_seen if entry else None

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # -- matching --------------------------------------------------------------
    def serving(self, role: str, event: str) -> list[Beacon]:
        """Peers of ``role`` that advertise ``event`` (an empty advertisement means
        "everything", as a cote Publisher without ``broadcasts``), in a stable order."""
        out = [e.beacon for e in self._entries.values()
               if e.beacon.role == role and (not e.beacon.types or any_match(e.beacon.types, event))]
        out.sort(key=lambda b: b.id)
        return out

    def interesting(self, role: str, wanted: Iterable[str]) -> list[Beacon]:
        """Peers of ``role`` advertising anything that overlaps ``wanted`` (for a
        subscriber choosing publishers to connect to), the longest known first."""
        wanted = tuple(wanted) or ("**",)
        return [e.beacon for e in self._entries.values()
                if e.beacon.role == role
                and (not e.beacon.types or any(matches(w, t) for w in wanted
                                               for t in e.beacon.types))]

    def choose(self, role: str, event: str, *, exclude: Iterable[str] = ()) -> Beacon | None:
        """Round-robin over the peers serving ``event``, skipping ``exclude`` (ids the
        caller has ruled out: open circuit breakers, a peer that just failed)."""
        excluded = set(exclude)
        candidates = [b for b in self.serving(role, event) if b.id not in excluded]
        if not candidates:
            return None
        turn = self._turn.get(event, 0)
        self._turn[event] = turn + 1
        return candidates[turn % len(candidates)]


# -- datagrams ---------------------------------------------------------------------

@dataclass(frozen=True)
class Datagram:
    op: str              # "hello" or "bye"
    beacon: Beacon
    ask: bool = False    # a newcomer asking everyone to answer at once
    signed: bool = False
    verified: bool = False
    seq: int = 0         # the sender's datagram counter (signed datagrams: >= 1)
    at: float = 0.0      # when it was sent, by the sender's wall clock (seconds)


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def encode_datagram(op: str, beacon: Beacon, *, ask: bool = False,
                    secret: bytes | None = None, seq: int = 0, at: float = 0.0) -> bytes:
    """The datagram of ``op`` about ``beacon``.  ``seq`` (growing per sender) and ``at``
    (the wall clock) let receivers refuse a signed datagram replayed (replay.py);
    a signed datagram must carry both."""
    wire: dict[str, Any] = {"op": op, "ask": ask, "b": beacon.to_wire()}
    if seq:
        wire["sq"] = seq
        wire["ts"] = int(at * 1000)
    body: bytes = msgpack.packb(wire, use_bin_type=True)
    flags = FLAG_SIGNED if secret else 0
    head = MAGIC + bytes((VERSION, flags))
    data = head + body
    return data + _tag(secret, data) if secret else data


def decode_datagram(data: bytes, *, secret: bytes | None = None,
                    require_auth: bool = True) -> Datagram:
    """Parse and (with ``secret``) authenticate a datagram.  Raises BadDatagram only.

    With a secret, an unsigned or wrongly signed datagram is rejected; without one, a
    signed datagram is rejected too (it belongs to a private mesh) unless
    ``require_auth`` is False (the monitor shows everyone, marked unverified).
    """
    if len(data) > MAX_DATAGRAM or len(data) < len(MAGIC) + 2 or not data.startswith(MAGIC):
        raise BadDatagram("not a mesh beacon")
    version, flags = data[len(MAGIC)], data[len(MAGIC) + 1]
    if version != VERSION:
        raise BadDatagram(f"unsupported beacon version {version}")
    signed = bool(flags & FLAG_SIGNED)
    verified = False
    if signed:
        if len(data) < len(MAGIC) + 2 + TAG_SIZE:
            raise BadDatagram("truncated signature")
        data, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if secret is not None:
            verified = hmac.compare_digest(_tag(secret, data), tag)
            if not verified:
                raise BadDatagram("bad signature")
        elif require_auth:
            raise BadDatagram("signed by a mesh whose secret we do not hold")
    elif secret is not None and require_auth:
        raise BadDatagram("unsigned beacon in a mesh with a secret")
    try:
        d = msgpack.unpackb(data[len(MAGIC) + 2:], raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types for garbage
        raise BadDatagram(f"undecodable beacon: {exc.__class__.__name__}") from None
    if not isinstance(d, dict) or d.get("op") not in ("hello", "bye"):
        raise BadDatagram("beacon must be a map with op hello|bye")
    ask = d.get("ask", False)
    if not isinstance(ask, bool):
        raise BadDatagram("ask must be a bool")
    seq, ms = d.get("sq", 0), d.get("ts", 0)
    if type(seq) is not int or type(ms) is not int or not 0 <= seq < 2**63:
        raise BadDatagram("sq and ts must be ints")
    if signed and seq < 1:
        raise BadDatagram("a signed beacon must carry sq >= 1 and ts (replay protection)")
    return Datagram(d["op"], Beacon.from_wire(d.get("b")), ask, signed, verified, seq, ms / 1000)


def with_host(beacon: Beacon, source_ip: str) -> Beacon:
    """Make a wildcard-bound endpoint dialable: ``tcp://0.0.0.0:port`` becomes the
    address the beacon came from (cote advertises only a port for the same reason)."""
    ep = beacon.endpoint
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://:"):
        if ep.startswith(wildcard):
            return replace(beacon, endpoint=f"tcp://{source_ip}:{ep[len(wildcard):]}")
    return beacon
