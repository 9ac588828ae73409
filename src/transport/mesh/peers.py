"""The mesh's discovery table: pure, no I/O, no trio (driven by transport/discovery.py).

A component announces itself with a :class:`Beacon`.  A :class:`PeerTable` holds the
beacons a component has heard, drops a peer that stops announcing (``expiry`` seconds
after its last beacon) or says goodbye, and answers the two questions the components
ask: *who may I see* (same namespace and key) and *who serves this event type*
(advertised types, with cote's wildcards), choosing round-robin among the latter.

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

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name, value in (("id", self.id), ("name", self.name), ("namespace", self.namespace),
                            ("key", self.key), ("endpoint", self.endpoint), ("host", self.host)):
            if not isinstance(value, str):
                raise ValueError(f"beacon {name} must be a string")
        if not self.id:
            raise ValueError("beacon id must not be empty")
        if not isinstance(self.pid, int) or isinstance(self.pid, bool):
            raise ValueError("beacon pid must be an int")
        if not isinstance(self.types, tuple) or not all(isinstance(t, str) for t in self.types):
            raise ValueError("beacon types must be a tuple of strings")

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "n": self.name, "r": self.role, "ns": self.namespace,
                "k": self.key, "t": list(self.types), "e": self.endpoint, "h": self.host,
                "p": self.pid}

    @classmethod
    def from_wire(cls, d: Any) -> "Beacon":
        if not isinstance(d, dict):
            raise BadDatagram("beacon must be a map")
        try:
            types = d.get("t", [])
            if not isinstance(types, list):
                raise ValueError("types must be a list")
            return cls(id=d["id"], name=d["n"], role=d["r"], namespace=d.get("ns", ""),
                       key=d.get("k", ""), types=tuple(types), endpoint=d.get("e", ""),
                       host=d.get("h", ""), pid=d.get("p", 0))
        except (KeyError, ValueError, TypeError) as exc:
            raise BadDatagram(f"bad beacon: {exc}") from None

    def same_scope(self, other: "Beacon") -> bool:
        """Namespace and key both equal: the only peers a component may see."""
        return self.namespace == other.namespace and self.key == other.key


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

@dataclass
class _Entry:
    beacon: Beacon
    last_seen: float


@dataclass
class PeerTable:
    """Peers heard recently.  ``me`` (when given) scopes what is kept: only peers in
    the same namespace and key, never oneself.  A table without ``me`` keeps everyone
    (the monitor)."""

    expiry: float = 4.0
    me: Beacon | None = None
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _turn: dict[str, int] = field(default_factory=dict)
    ignored: int = 0   # beacons heard from another scope

    def observe(self, beacon: Beacon, now: float) -> str | None:
        """Record a beacon.  Returns "added", "changed" (same id, new details), or None
        for a plain refresh or an ignored beacon."""
        if self.me is not None:
            if beacon.id == self.me.id:
                return None
            if not self.me.same_scope(beacon):
                self.ignored += 1
                return None
        entry = self._entries.get(beacon.id)
        if entry is None:
            self._entries[beacon.id] = _Entry(beacon, now)
            return "added"
        entry.last_seen = max(entry.last_seen, now)
        if entry.beacon != beacon:
            entry.beacon = beacon
            return "changed"
        return None

    def forget(self, peer_id: str) -> Beacon | None:
        entry = self._entries.pop(peer_id, None)
        return entry.beacon if entry else None

    def expire(self, now: float) -> list[Beacon]:
        """Drop peers silent for longer than ``expiry``; return them."""
        gone = [pid for pid, e in self._entries.items() if now - e.last_seen > self.expiry]
        return [self._entries.pop(pid).beacon for pid in gone]

    def next_expiry(self) -> float | None:
        """When the next peer would expire if it stays silent (for the shell's sleep)."""
        if not self._entries:
            return None
        return min(e.last_seen for e in self._entries.values()) + self.expiry

    def peers(self) -> list[Beacon]:
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
        subscriber choosing publishers to connect to)."""
        wanted = tuple(wanted) or ("**",)
        return sorted((e.beacon for e in self._entries.values()
                       if e.beacon.role == role
                       and (not e.beacon.types or any(matches(w, t) for w in wanted
                                                      for t in e.beacon.types))),
                      key=lambda b: b.id)

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


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def encode_datagram(op: str, beacon: Beacon, *, ask: bool = False,
                    secret: bytes | None = None) -> bytes:
    body: bytes = msgpack.packb({"op": op, "ask": ask, "b": beacon.to_wire()}, use_bin_type=True)
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
    return Datagram(d["op"], Beacon.from_wire(d.get("b")), ask, signed, verified)


def with_host(beacon: Beacon, source_ip: str) -> Beacon:
    """Make a wildcard-bound endpoint dialable: ``tcp://0.0.0.0:port`` becomes the
    address the beacon came from (cote advertises only a port for the same reason)."""
    ep = beacon.endpoint
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://:"):
        if ep.startswith(wildcard):
            return replace(beacon, endpoint=f"tcp://{source_ip}:{ep[len(wildcard):]}")
    return beacon
