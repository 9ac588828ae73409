"""Monitor: the ``top`` of the mesh.  Sees every component, whatever its namespace/key.

Besides who is there (:meth:`Monitor.rows`) it shows who talks to whom
(:meth:`Monitor.graph`): each Requester's and Subscriber's beacon carries its links
(peer id, count: the requests it sent each Responder, the events it received from each
Publisher), brought up to date once per hello.
"""
from __future__ import annotations

from typing import Any

import trio

from transport.mesh.discovery import Discovery
from transport.mesh.component import Component
from transport.mesh.peers import SERVED_BY, Beacon

# What a link of a component of this role is: a Requester's carry requests, a
# Subscriber's events.
EDGE_KIND = {"requester": "request", "subscriber": "event"}


class Monitor(Component):
    role = "monitor"

    def __init__(self, name: str = "monitor", **kw: Any) -> None:
        super().__init__(name, **kw)

    async def _serve(self, nursery: trio.Nursery) -> None:
        # Announcing (with ask) makes every component answer at once instead of at its
        # next hello; monitor=True keeps peers of every namespace and key.
        self.discovery = Discovery(self.beacon(), self.discovery_config, secret=self.secret,
                                   monitor=True)
        await nursery.start(self.discovery.run)

    def _components(self) -> list[Beacon]:
        if self.discovery is None:
            return []
        return [b for b in self.discovery.table.peers() if b.role != "monitor"]

    def rows(self) -> list[dict[str, Any]]:
        """One row per component seen (none before the monitor runs), with its links:
        ``{"to": peer id, "to_name": its name or None when the monitor does not see it,
        "count": requests sent or events received}``."""
        if self.discovery is None:
            return []
        now = trio.current_time()
        table = self.discovery.table
        seen = self._components()
        names = {b.id: b.name for b in seen}
        out = []
        for b in seen:
            out.append({"name": b.name, "role": b.role, "namespace": b.namespace, "key": b.key,
                        "environment": b.environment,
                        "types": list(b.types), "endpoint": b.endpoint, "host": b.host,
                        "pid": b.pid, "id": b.id,
                        "last_seen": round(now - (table.last_seen(b.id) or now), 2),
                        "links": [{"to": peer, "to_name": names.get(peer), "count": count}
                                  for peer, count in b.links]})
        out.sort(key=lambda r: (r["environment"], r["namespace"], r["role"], r["name"], r["id"]))
        return out

    def graph(self) -> dict[str, list[dict[str, Any]]]:
        """The components seen and who talks to whom: ``{"nodes": [...], "edges":
        [{"from": id, "to": id, "count": n, "kind": "request" | "event"}]}``, an edge
        from each Requester to the Responders it sends to and from each Subscriber to
        the Publishers feeding it, only between components the monitor sees (and of those
        roles: a beacon claiming another link is not drawn)."""
        seen = self._components()
        roles = {b.id: b.role for b in seen}
        nodes = [{"id": b.id, "name": b.name, "role": b.role, "namespace": b.namespace,
                  "environment": b.environment, "host": b.host, "pid": b.pid,
                  "types": list(b.types)} for b in seen]
        nodes.sort(key=lambda n: (n["environment"], n["namespace"], n["role"], n["name"],
                                  n["id"]))
        edges = [{"from": b.id, "to": peer, "count": count, "kind": EDGE_KIND[b.role]}
                 for b in seen if b.role in EDGE_KIND
                 for peer, count in b.links if roles.get(peer) == SERVED_BY[b.role]]
        edges.sort(key=lambda e: (e["from"], e["to"]))
        return {"nodes": nodes, "edges": edges}
