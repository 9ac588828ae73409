"""Discovery sources beside the beacons' own sockets, their pure part: no I/O, no trio.

Driven by :mod:`transport.mesh.dns_seeds` (names re-resolved periodically, as a
Kubernetes headless service answers with one address per pod) and
:mod:`transport.mesh.redis_registry` (beacons kept in Redis with a TTL).  Here:

- :func:`parse_seed`: ``host`` or ``host:port``, as ``MESH_DNS_SEEDS`` lists them;
- :func:`diff_addresses` and :class:`SeedSet`: which beacon destinations a new answer
  adds and removes (the union over every name: an address two names share stays while
  either gives it);
- :class:`Outage`: one WARNING when a source starts failing, one INFO when it works
  again, never a line per attempt (the same promise as
  :mod:`transport.mesh.beacon_health` for beacon destinations).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

Address = tuple[str, int]


def parse_seed(spec: str, default_port: int) -> Address:
    """``"mesh.ns.svc"`` -> ``("mesh.ns.svc", default_port)``; ``"mesh:4747"`` -> port 4747.

    IPv4 only (discovery's sockets are), so a ``:`` is always the port's."""
    if not isinstance(spec, str):
        raise ValueError(f"dns seed must be a string, got {spec!r}")
    spec = spec.strip()
    host, sep, port = spec.rpartition(":")
    if not sep:
        host, port = spec, ""
    elif not port.isdigit() or not (0 < int(port) < 65536):
        raise ValueError(f"dns seed must be host or host:port (port 1..65535), got {spec!r}")
    if not host or any(c.isspace() for c in host) or ":" in host or "/" in host:
        raise ValueError(f"dns seed must be host or host:port, got {spec!r}")
    return host, int(port) if port else default_port


def diff_addresses(old: Iterable[Address], new: Iterable[Address]
                   ) -> tuple[frozenset[Address], frozenset[Address]]:
    """``(added, removed)`` going from ``old`` to ``new``."""
    before, after = frozenset(old), frozenset(new)
    return after - before, before - after


@dataclass(frozen=True)
class Change:
    """What one resolution of one name changed: destinations to add and to drop (of
    the union over all names), and what to say about the name."""

    added: frozenset[Address] = frozenset()
    removed: frozenset[Address] = frozenset()
    warn: bool = False          # the name started failing (say so once)
    recovered: bool = False     # it resolves again after failing (say so once)


@dataclass
class Seed:
    """One name and what it resolved to last (``error``: why its last try failed)."""

    host: str
    port: int
    addresses: frozenset[Address] = frozenset()
    error: str | None = None
    tried: bool = False

    @property
    def spec(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class SeedSet:
    """The names discovery re-resolves, and the union of their answers: every address
    a beacon destination (like a static peer), added and removed as answers change."""

    seeds: list[Seed] = field(default_factory=list)

    @classmethod
    def of(cls, targets: Iterable[Address]) -> SeedSet:
        return cls([Seed(host, port) for host, port in dict.fromkeys(targets)])

    def targets(self) -> frozenset[Address]:
        return frozenset(a for s in self.seeds for a in s.addresses)

    def _apply(self, seed: Seed, addresses: frozenset[Address], error: str | None) -> Change:
        before = self.targets()
        was_failing = seed.error is not None
        seed.addresses, seed.error, seed.tried = addresses, error, True
        added, removed = diff_addresses(before, self.targets())
        return Change(added, removed, warn=error is not None and not was_failing,
                      recovered=error is None and was_failing)

    def resolved(self, seed: Seed, ips: Iterable[str]) -> Change:
        """``seed`` resolved to ``ips`` (each reached on the seed's port)."""
        return self._apply(seed, frozenset((ip, seed.port) for ip in ips), None)

    def failed(self, seed: Seed, error: str, *, keep: bool) -> Change:
        """``seed`` did not resolve.  ``keep``: the failure says nothing about the name
        (a DNS server timing out, EAI_AGAIN), so its last addresses stay; otherwise (no
        such name: a headless service without ready pods) they go."""
        return self._apply(seed, seed.addresses if keep else frozenset(), error)

    def problems(self) -> list[str]:
        return [f"dns seed {s.host} does not resolve: {s.error}"
                + (f" (keeping its {len(s.addresses)} last address(es))" if s.addresses else "")
                for s in self.seeds if s.error is not None]

    def describe(self) -> str:
        """For the start-up line: ``dns seeds a.svc (3 addresses) ok, b.svc failed (...)``."""
        if not self.seeds:
            return "dns seeds off"
        parts = []
        for s in self.seeds:
            n = len(s.addresses)
            count = f"{n} address{'es' if n != 1 else ''}"
            if not s.tried:
                parts.append(f"{s.host} resolving")
            elif s.error is None:
                parts.append(f"{s.host} ({count}) ok")
            else:
                parts.append(f"{s.host} failed ({s.error})"
                             + (f", keeping {count}" if n else ""))
        return "dns seeds " + ", ".join(parts)


@dataclass
class Outage:
    """A source failing since ``since`` with ``error`` (``count`` failures in a row),
    or working (``since`` None).  Pure: fed attempts with the time."""

    since: float | None = None
    error: str = ""
    count: int = 0

    def failed(self, error: str, now: float) -> bool:
        """Record a failure; True when it starts an outage (the one to warn about)."""
        self.error = error
        self.count += 1
        if self.since is None:
            self.since = now
            return True
        return False

    def ok(self) -> tuple[float, int] | None:
        """Record a success; ``(since, failures)`` when it ends an outage (say so)."""
        if self.since is None:
            return None
        ended = (self.since, self.count)
        self.since, self.error, self.count = None, "", 0
        return ended

    def __bool__(self) -> bool:
        return self.since is not None
