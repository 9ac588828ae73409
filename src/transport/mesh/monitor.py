"""Monitor: the ``top`` of the mesh.  Sees every component, whatever its namespace/key."""
from __future__ import annotations

from typing import Any

import trio

from transport.mesh.discovery import Discovery
from transport.mesh.component import Component


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

    def rows(self) -> list[dict[str, Any]]:
        """One row per component seen (none before the monitor runs)."""
        if self.discovery is None:
            return []
        now = trio.current_time()
        table = self.discovery.table
        out = []
        for b in table.peers():
            if b.role == "monitor":
                continue
            out.append({"name": b.name, "role": b.role, "namespace": b.namespace, "key": b.key,
                        "types": list(b.types), "endpoint": b.endpoint, "host": b.host,
                        "pid": b.pid, "id": b.id,
                        "last_seen": round(now - (table.last_seen(b.id) or now), 2)})
        out.sort(key=lambda r: (r["namespace"], r["role"], r["name"], r["id"]))
        return out
