"""Which apps the cluster runs, at which content: pure, no I/O, no trio.

Every node holds a :class:`Catalog`: for each app name the *winning* :class:`AppRecord`,
either "deployed at this digest" or a tombstone ("undeployed").  Records only ever merge
(:meth:`Catalog.merge`), and the merge keeps the greater record by one total order,
:meth:`AppRecord.rank`, so two nodes that have seen the same records hold the same
catalog, whatever the order they saw them in and whatever partitions lay between: that
is the whole convergence argument (the catalog is a map of last-writer-wins registers,
a state-based CRDT).

The order, most significant first:

1. ``generation``: a change made on a node takes the greatest generation that node knows
   for the name, plus one (a Lamport clock per app), so a change made after seeing
   another always wins over it: an undeploy made during a partition beats the deploy it
   undid, wherever that deploy is still running when the partition heals;
2. a tombstone beats a deploy of the same generation (two concurrent changes, one of
   them "stop it": stopping is the safe outcome);
3. the manifest's ``version`` (higher wins), then
4. the content ``digest`` (greater wins), then the ``origin`` node id: a deterministic
   tie-break, so two nodes deploying different content at once end up agreeing.

A change made through a node's control endpoint carries the caller's :class:`Grant`, an
HMAC under the cluster's secret over what was asked ("deploy app X", "undeploy app X",
when, a nonce): the node does not sign cluster-wide changes on a caller's behalf, and a
peer applies a record of generation > 0 only when its grant checks (:func:`check_grant`).
Generation-0 records are the apps a node was started with (its operator's own folder):
they lose to any later change.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import msgpack

Op = Literal["deploy", "undeploy"]
OPS: tuple[Op, ...] = ("deploy", "undeploy")
GRANT_WINDOW = 30.0           # seconds a grant stays fresh at the node it is presented to
_GRANT_CONTEXT = b"engine-cluster-grant\x00"


class GrantError(ValueError):
    """A grant that is missing, malformed, signed with another secret, or not for this
    change: the change is refused."""


@dataclass(frozen=True)
class Grant:
    """A caller's authorization of one cluster-wide change, signed with the cluster's
    secret (:func:`sign_grant`)."""

    op: Op
    app: str
    at: float               # the caller's clock (seconds since the epoch) when it signed
    nonce: str
    sig: bytes
    digest: str = ""        # deploy: the content the caller meant ("" for an app not shared)

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "app": self.app, "at": self.at, "nonce": self.nonce, "sig": self.sig,
                "digest": self.digest}

    @classmethod
    def from_wire(cls, d: Any, where: str = "grant") -> "Grant":
        if not isinstance(d, dict):
            raise GrantError(f"{where}: expected a map, got {type(d).__name__}")
        op, app, at, nonce, sig = (d.get(k) for k in ("op", "app", "at", "nonce", "sig"))
        if op not in OPS:
            raise GrantError(f"{where}.op: expected one of {', '.join(OPS)}, got {op!r}")
        if not isinstance(app, str) or not app:
            raise GrantError(f"{where}.app: expected an app name, got {app!r}")
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            raise GrantError(f"{where}.at: expected a time in seconds, got {at!r}")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64:
            raise GrantError(f"{where}.nonce: expected a string of 8 to 64 characters")
        if not isinstance(sig, bytes) or len(sig) != 32:
            raise GrantError(f"{where}.sig: expected 32 bytes")
        digest = d.get("digest", "")
        if not isinstance(digest, str) or len(digest) > 128:
            raise GrantError(f"{where}.digest: expected a content digest, got {digest!r:.80}")
        return cls(op, app, float(at), nonce, sig, digest)


def _grant_mac(secret: bytes, op: str, app: str, at: float, nonce: str, digest: str) -> bytes:
    body = msgpack.packb([op, app, at, nonce, digest], use_bin_type=True)
    return hmac.new(secret, _GRANT_CONTEXT + body, hashlib.sha256).digest()


def sign_grant(secret: bytes, op: Op, app: str, *, at: float, nonce: str | None = None,
               digest: str = "") -> Grant:
    """What a caller holding the cluster's secret sends with a cluster-wide change; a
    deploy's names the content's digest (a captured grant cannot deploy other content)."""
    nonce = nonce or secrets.token_hex(12)
    return Grant(op, app, float(at), nonce,
                 _grant_mac(secret, op, app, float(at), nonce, digest), digest)


def check_grant(secret: bytes, grant: Grant, op: Op, app: str) -> None:
    """Raise :class:`GrantError` unless ``grant`` was signed with ``secret`` for ``op``
    on ``app``.  (Freshness is the receiving node's business: :func:`check_fresh`.)"""
    if grant.op != op or grant.app != app:
        raise GrantError(f"the grant is for {grant.op} {grant.app!r}, not {op} {app!r}")
    good = _grant_mac(secret, grant.op, grant.app, grant.at, grant.nonce, grant.digest)
    if not hmac.compare_digest(good, grant.sig):
        raise GrantError("the grant is not signed with this cluster's secret")


def check_fresh(grant: Grant, now: float, window: float = GRANT_WINDOW) -> None:
    """A grant presented to a node must be recent (a captured one is useless later;
    the node also takes each nonce once)."""
    if not math.isfinite(grant.at):   # abs(now - nan) > window is False: fresh for ever
        raise GrantError(f"the grant's signing time {grant.at!r} is not a time")
    if abs(now - grant.at) > window:
        raise GrantError(f"the grant was signed {now - grant.at:+.0f} s from this node's clock "
                         f"(more than {window:g} s): check the clocks (NTP)")


@dataclass(frozen=True)
class AppRecord:
    """The cluster's word on one app: deployed at ``digest``, or a tombstone."""

    name: str
    generation: int
    deployed: bool
    version: int = 0
    digest: str = ""
    origin: str = ""            # the node that made the change (shown, and the last tie-break)
    grant: Grant | None = None  # the caller's authorization (None for generation 0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("record name: expected an app name")
        for field_name in ("generation", "version"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"record {field_name}: expected a non-negative int, got {value!r}")
        for field_name in ("digest", "origin"):
            if not isinstance(getattr(self, field_name), str):
                raise ValueError(f"record {field_name}: expected a string, "
                                 f"got {getattr(self, field_name)!r}")
        if not isinstance(self.deployed, bool):
            raise ValueError(f"record deployed: expected true or false, got {self.deployed!r}")
        if self.deployed and not self.digest:
            raise ValueError("record digest: a deployed record needs its content's digest")

    def rank(self) -> tuple[int, int, int, str, str]:
        """The total order of records of one name (module docstring)."""
        return (self.generation, 0 if self.deployed else 1, self.version, self.digest, self.origin)

    def beats(self, other: "AppRecord | None") -> bool:
        return other is None or self.rank() > other.rank()

    @property
    def label(self) -> str:
        """``v3@1a2b3c4d5e6f`` or ``undeployed``, for logs and ``engine nodes``."""
        return f"v{self.version}@{self.digest[:12]}" if self.deployed else "undeployed"

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "generation": self.generation, "deployed": self.deployed,
                "version": self.version, "digest": self.digest, "origin": self.origin,
                "grant": self.grant.to_wire() if self.grant else None}

    @classmethod
    def from_wire(cls, d: Any, where: str = "record") -> "AppRecord":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a map, got {type(d).__name__}")
        try:
            grant = d.get("grant")
            return cls(name=d["name"], generation=d["generation"], deployed=bool(d["deployed"]),
                       version=d.get("version", 0), digest=d.get("digest", ""),
                       origin=d.get("origin", ""),
                       grant=None if grant is None else Grant.from_wire(grant, f"{where}.grant"))
        except KeyError as exc:
            raise ValueError(f"{where}: missing {exc}") from None
        except (TypeError, ValueError) as exc:
            text = str(exc)
            raise ValueError(text if text.startswith(where) else f"{where}: {text}") from None

    def check(self, secret: bytes | None) -> None:
        """Raise :class:`GrantError` unless a record received from a peer may be applied:
        with a secret, every change after generation 0 carries a caller's grant for it."""
        if secret is None or self.generation == 0:
            return
        if self.grant is None:
            raise GrantError(f"record {self.name} g{self.generation}: no caller's grant")
        check_grant(secret, self.grant, "deploy" if self.deployed else "undeploy", self.name)


class Catalog:
    """Name -> winning :class:`AppRecord`; see the module docstring."""

    def __init__(self, records: Iterable[AppRecord] = ()):
        self._records: dict[str, AppRecord] = {}
        for record in records:
            self.merge(record)

    def merge(self, record: AppRecord) -> bool:
        """Keep ``record`` if it beats what is held for its name; True if it did."""
        if record.beats(self._records.get(record.name)):
            self._records[record.name] = record
            return True
        return False

    def merge_all(self, records: Iterable[AppRecord]) -> list[AppRecord]:
        """Merge many; the ones that won, in order."""
        return [r for r in records if self.merge(r)]

    def get(self, name: str) -> AppRecord | None:
        return self._records.get(name)

    def next_generation(self, name: str) -> int:
        held = self._records.get(name)
        return 1 if held is None else held.generation + 1

    def records(self) -> list[AppRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def deployed(self) -> dict[str, AppRecord]:
        return {n: r for n, r in sorted(self._records.items()) if r.deployed}

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def fingerprint(self) -> str:
        """A short digest of the whole catalog: equal on two nodes iff they agree (so
        reports carry this, and catalogs are exchanged only when it differs)."""
        h = hashlib.sha256()
        for r in self.records():
            h.update(msgpack.packb([r.name, *r.rank()], use_bin_type=True))
        return h.hexdigest()[:16]

    def to_wire(self) -> list[dict[str, Any]]:
        return [r.to_wire() for r in self.records()]

    @staticmethod
    def records_from_wire(items: Any, where: str = "catalog") -> list[AppRecord]:
        if not isinstance(items, list):
            raise ValueError(f"{where}: expected a list of records")
        return [AppRecord.from_wire(d, f"{where}[{i}]") for i, d in enumerate(items)]

    def as_map(self) -> Mapping[str, AppRecord]:
        return dict(self._records)
