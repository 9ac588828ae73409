"""What ``python -m engine nodes`` shows of a cluster: one node's view, read-only.

Every node it knows (its load table: itself and the peers it exchanges reports with,
with each app's figures, version and whether it runs the catalog's content), the
registry's members beyond those (with etcd, the nodes outside this node's sample), the
catalog, this node's divergence from it, the registry's problems and the counters.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

import trio

from transport.rpc import RpcClient

from engine.cluster.apps import ClusterApps
from engine.cluster.balance import BalanceTable, NodeReport
from engine.cluster.forwarding import Forwarding
from engine.cluster.registry import Registry


class ViewedCluster(Protocol):
    """What the view reads of the cluster service (:class:`engine.cluster.service.Cluster`)."""

    id: str
    table: BalanceTable
    apps: ClusterApps
    forwarding: Forwarding
    registry: Registry | None
    stats: dict[str, int]

    @property
    def name(self) -> str: ...

    @property
    def secret(self) -> bytes | None: ...

    def links(self) -> Mapping[str, RpcClient]: ...

    def local_report(self) -> NodeReport: ...


def cluster_view(cluster: ViewedCluster) -> dict[str, Any]:
    now = trio.current_time()
    cluster.local_report()                     # this node's figures, fresh
    catalog = cluster.apps.catalog
    links = cluster.links()
    nodes = []
    for report, age in cluster.table.nodes(now, cluster.id):
        me = report.id == cluster.id
        client = links.get(report.id)
        figures = {}
        for name, load in sorted(report.apps.items()):
            entry = load.to_wire()
            record = catalog.get(name)
            if record is not None and record.deployed and load.digest == record.digest:
                entry["version"] = record.version
                entry["in_line"] = True
            else:
                entry["in_line"] = record is None and bool(load.digest)
            figures[name] = entry
        nodes.append({"id": report.id, "control": report.control, "self": me,
                      "connected": me or bool(client and client.connected),
                      "linked": me or client is not None,
                      "age": round(age, 3), "cpu": round(report.cpu, 3), "apps": figures})
    listed = {n["id"] for n in nodes}
    registry = cluster.registry
    members = registry.peers() if registry is not None else {}
    for pid, control in sorted(members.items()):     # (etcd: beyond this node's sample)
        if pid not in listed:
            nodes.append({"id": pid, "control": control, "self": False, "connected": False,
                          "linked": False, "age": None, "cpu": None, "apps": {}})
    apps = cluster.apps
    return {"cluster": cluster.name, "self": cluster.id, "nodes": nodes,
            "secure": cluster.secret is not None,
            "registry": registry.describe() if registry is not None else {},
            "problems": registry.problems() if registry is not None else [],
            "catalog": {r.name: {"state": r.label, "generation": r.generation,
                                 "version": r.version, "digest": r.digest,
                                 "origin": r.origin} for r in catalog.records()},
            "divergence": apps.divergence(),
            "stats": {**cluster.stats, **apps.stats,
                      "forwarding": dict(cluster.forwarding.stats)},
            "tombstones": sorted(r.name for r in catalog.records() if not r.deployed),
            "sync_failed": {f"{a}@{d[:12]}": why for (a, d), why in apps.sync_failed.items()}}
