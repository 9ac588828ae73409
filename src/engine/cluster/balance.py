"""Which node of the cluster should run a request: pure, no I/O, no trio.

Driven by :mod:`engine.cluster`.  A :class:`BalanceTable` holds the latest
:class:`NodeReport` of every node (the local one included), drops a node whose reports
stop (``expiry`` seconds after the last one), and answers :meth:`BalanceTable.pick`:
the least-loaded node hosting the app in a serving state.

A node's load for an app is its *pressure*, ``(queued + running) / capacity`` (capacity:
pool-limit x concurrency, so 1.0 means every slave slot is busy), corrected by what this
node knows better than the report, plus ``cpu_weight`` x its CPU use (0..1).  Reports
from peers are a gossip interval old.  The forwards this node had in flight to the peer
when its report came are taken to be inside the report's figures; they are replaced by
the forwards in flight *now*: a burst does not all land on the peer that looked idle a
moment ago, and a peer whose forwarded job just finished is not counted busy until its
next report (at 3 requests across 3 nodes that left peers idle a third of the time).

A record in the cluster's catalog names the content an app must run at; ``pick(...,
digest=)`` only considers nodes reporting that digest, so two versions of one app never
answer requests side by side.

Local is preferred with hysteresis, so traffic does not flap between nodes whose loads
are close: an app starts offloading only when the local load exceeds the best peer's by
more than ``offload_above``, and keeps offloading until the gap falls to
``return_below`` or less.  With ``0 <= return_below <= offload_above``, a local node
that is strictly least loaded is always picked.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

SERVING = "running"


@dataclass(frozen=True)
class AppLoad:
    """One app's load on one node, as reported."""

    state: str = SERVING        # the pool's: running | broken | draining (or the app's stopping...)
    queue: int = 0              # jobs waiting for a slave
    running: int = 0            # jobs on slaves
    slaves: int = 0
    capacity: int = 1           # pool-limit x concurrency
    jobs_per_s: float = 0.0     # completed jobs per second, recently
    digest: str = ""            # of the app's manifest and files (for sync)

    def __post_init__(self) -> None:
        for name in ("queue", "running", "slaves", "capacity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"app load {name} must be a non-negative int, got {value!r}")
        if self.capacity < 1:
            raise ValueError("app load capacity must be at least 1")
        if not isinstance(self.state, str) or not isinstance(self.digest, str):
            raise ValueError("app load state and digest must be strings")

    @property
    def serving(self) -> bool:
        return self.state == SERVING

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state, "queue": self.queue, "running": self.running,
                "slaves": self.slaves, "capacity": self.capacity,
                "jobs_per_s": self.jobs_per_s, "digest": self.digest}

    @classmethod
    def from_wire(cls, d: Any) -> "AppLoad":
        if not isinstance(d, dict):
            raise ValueError("app load must be a map")
        try:
            return cls(state=d["state"], queue=d["queue"], running=d["running"],
                       slaves=d.get("slaves", 0), capacity=d.get("capacity", 1),
                       jobs_per_s=float(d.get("jobs_per_s", 0.0)), digest=d.get("digest", ""))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad app load: {exc}") from None


@dataclass(frozen=True)
class NodeReport:
    """What one node says about itself.  ``seq`` grows with every report of one node
    process (a restarted node has a new id), so a late report never overwrites a newer."""

    id: str
    control: str
    apps: Mapping[str, AppLoad] = field(default_factory=dict)
    cpu: float = 0.0            # 0..1
    seq: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("node id must be a non-empty string")
        if not isinstance(self.control, str):
            raise ValueError("node control address must be a string")
        if not isinstance(self.cpu, (int, float)) or not 0.0 <= self.cpu <= 1.0:
            raise ValueError(f"node cpu must be within 0..1, got {self.cpu!r}")
        if not isinstance(self.seq, int) or isinstance(self.seq, bool):
            raise ValueError("node report seq must be an int")

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "control": self.control, "cpu": self.cpu, "seq": self.seq,
                "apps": {name: load.to_wire() for name, load in self.apps.items()}}

    @classmethod
    def from_wire(cls, d: Any) -> "NodeReport":
        """Parse a report off the wire; raises ValueError only."""
        if not isinstance(d, dict) or not isinstance(d.get("apps", {}), dict):
            raise ValueError("node report must be a map with an 'apps' map")
        try:
            apps = {str(k): AppLoad.from_wire(v) for k, v in d.get("apps", {}).items()}
            return cls(id=d["id"], control=d["control"], apps=apps,
                       cpu=float(d.get("cpu", 0.0)), seq=d.get("seq", 0))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad node report: {exc}") from None


@dataclass
class _Known:
    report: NodeReport
    seen: float


class BalanceTable:
    """The latest report of every node, and the choice of a node per request."""

    def __init__(self, *, expiry: float = 3.0, cpu_weight: float = 0.5,
                 offload_above: float = 0.5, return_below: float = 0.1):
        if expiry <= 0:
            raise ValueError("expiry must be positive")
        if not 0.0 <= return_below <= offload_above:
            raise ValueError("need 0 <= return_below <= offload_above")
        self.expiry = expiry
        self.cpu_weight = cpu_weight
        self.offload_above = offload_above
        self.return_below = return_below
        self._nodes: dict[str, _Known] = {}
        self._in_flight: dict[tuple[str, str], int] = {}   # (node, app) -> forwards pending
        self._in_report: dict[tuple[str, str], int] = {}   # of those, pending at its last report
        self._offloading: set[str] = set()                  # apps currently sent away

    # -- reports ----------------------------------------------------------------------
    def update(self, report: NodeReport, now: float) -> bool:
        """Record a report; False (ignored) if an equal or newer one is already known."""
        known = self._nodes.get(report.id)
        if known is not None and report.seq <= known.report.seq:
            if report.seq == known.report.seq:
                known.seen = max(known.seen, now)
            return False
        self._nodes[report.id] = _Known(report, now)
        for key in [k for k in self._in_report if k[0] == report.id]:
            del self._in_report[key]
        for (nid, app), count in self._in_flight.items():
            if nid == report.id:
                self._in_report[(nid, app)] = count
        return True

    def set_app_load(self, node_id: str, app: str, load: AppLoad | None, now: float) -> None:
        """Replace one app's figures in a node's report (the local node's, fresh for
        every request; ``None``: it does not host the app)."""
        known = self._nodes.get(node_id)
        if known is None:
            if load is None:
                return
            known = self._nodes[node_id] = _Known(NodeReport(node_id, ""), now)
        apps = dict(known.report.apps)
        if load is None:
            if apps.pop(app, None) is None:
                return
        else:
            apps[app] = load
        known.report = replace(known.report, apps=apps)
        known.seen = max(known.seen, now)

    def ids(self) -> list[str]:
        return list(self._nodes)

    def touch(self, node_id: str, now: float) -> None:
        """The node is alive (e.g. it answered) even if its report did not change."""
        known = self._nodes.get(node_id)
        if known is not None:
            known.seen = max(known.seen, now)

    def forget(self, node_id: str) -> NodeReport | None:
        known = self._nodes.pop(node_id, None)
        for table in (self._in_flight, self._in_report):
            for key in [k for k in table if k[0] == node_id]:
                del table[key]
        return known.report if known else None

    def expire(self, now: float, *, keep: str | None = None) -> list[str]:
        """Drop nodes whose last report is older than ``expiry`` (never ``keep``: us)."""
        gone = [nid for nid, k in self._nodes.items()
                if nid != keep and now - k.seen > self.expiry]
        for nid in gone:
            self.forget(nid)
        return gone

    def live(self, node_id: str, now: float, local_id: str | None = None) -> bool:
        known = self._nodes.get(node_id)
        if known is None:
            return False
        return node_id == local_id or now - known.seen <= self.expiry

    def nodes(self, now: float, local_id: str | None = None) -> list[tuple[NodeReport, float]]:
        """Live reports with their age in seconds, sorted by node id."""
        return [(k.report, max(0.0, now - k.seen)) for nid, k in sorted(self._nodes.items())
                if self.live(nid, now, local_id)]

    def get(self, node_id: str) -> NodeReport | None:
        known = self._nodes.get(node_id)
        return known.report if known else None

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    # -- forwards in flight ----------------------------------------------------------------
    def note_sent(self, node_id: str, app: str) -> None:
        key = (node_id, app)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def note_done(self, node_id: str, app: str) -> None:
        """A forward to the node was answered (or failed): its slot there is free now."""
        key = (node_id, app)
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def in_flight(self, node_id: str, app: str) -> int:
        return self._in_flight.get((node_id, app), 0)

    # -- choosing ---------------------------------------------------------------------------
    def score(self, node_id: str, app: str, digest: str | None = None) -> float | None:
        """The node's load for ``app``, or None if it does not serve it (at ``digest``,
        when given)."""
        known = self._nodes.get(node_id)
        if known is None:
            return None
        load = known.report.apps.get(app)
        if load is None or not load.serving or (digest is not None and load.digest != digest):
            return None
        reported = max(0, load.queue + load.running - self._in_report.get((node_id, app), 0))
        return ((reported + self.in_flight(node_id, app)) / load.capacity
                + self.cpu_weight * known.report.cpu)

    def candidates(self, app: str, now: float, local_id: str | None = None,
                   exclude: Iterable[str] = (), digest: str | None = None) -> list[tuple[float, str]]:
        """(score, node id) of every live node serving ``app`` (at ``digest``, when
        given), least loaded first."""
        excluded = set(exclude)
        out = []
        for nid in self._nodes:
            if nid in excluded or not self.live(nid, now, local_id):
                continue
            s = self.score(nid, app, digest)
            if s is not None:
                out.append((s, nid))
        out.sort()
        return out

    def pick(self, app: str, local_id: str, now: float, *,
             exclude: Iterable[str] = (), digest: str | None = None) -> str | None:
        """The node to run a request for ``app``, or None if no live node serves it
        (at ``digest``, when given)."""
        ranked = self.candidates(app, now, local_id, exclude, digest)
        if not ranked:
            self._offloading.discard(app)
            return None
        local = next((s for s, nid in ranked if nid == local_id), None)
        remote = next(((s, nid) for s, nid in ranked if nid != local_id), None)
        if local is None:
            return None if remote is None else remote[1]  # (ranked is not empty: remote is set)
        if remote is None:
            self._offloading.discard(app)
            return local_id
        gap = local - remote[0]
        if app in self._offloading:
            if gap <= self.return_below:
                self._offloading.discard(app)
                return local_id
            return remote[1]
        if gap > self.offload_above:
            self._offloading.add(app)
            return remote[1]
        return local_id

    def offloading(self, app: str) -> bool:
        return app in self._offloading
