"""Where a cluster's nodes learn who is in it and what it runs.

Two implementations meet at :class:`Registry`:

- :class:`engine.cluster.lan.LanRegistry` (the default, the seed's zero-config promise):
  UDP beacons (:class:`transport.mesh.discovery.Discovery`) for membership; the catalog
  travels node to node with the load reports (each report carries the sender's
  :meth:`~engine.cluster.catalog.Catalog.fingerprint`, catalogs are exchanged when it
  differs), so :meth:`Registry.publish` has nothing to do.  Every node talks to every
  node: O(N) messages per node per second, fine for tens of nodes on one LAN.
- :class:`engine.cluster.etcd_registry.EtcdRegistry` (``--cluster-registry
  etcd://HOST:PORT``): membership by leased keys, the catalog as keys every node watches,
  changes written with a compare-and-swap that keeps the greater record.  A node talks
  to etcd and to the few peers it exchanges load with or forwards to, so its background
  traffic does not grow with N.

The cluster service (:mod:`engine.cluster.service`) holds the node's
:class:`~engine.cluster.catalog.Catalog`; a registry feeds it records through the
``on_records`` callback it is made with, and the service calls :meth:`Registry.publish`
for every change made on this node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import trio

from engine.cluster.catalog import AppRecord

RecordSink = Callable[[Sequence[AppRecord]], None]


@dataclass(frozen=True)
class Member:
    """This node, as the registry announces it."""

    id: str
    control: str            # the control endpoint peers dial (tcp://HOST:PORT)
    cluster: str
    key: str = ""


class RegistryError(Exception):
    """The registry cannot be used (unreachable, refused, bad address): raised from
    :meth:`Registry.run` before ``started()`` stops the node from starting."""


class Registry(Protocol):
    @property
    def kind(self) -> str:
        """``"lan"`` or ``"etcd"`` (shown by ``engine nodes``)."""
        ...

    @property
    def samples_load(self) -> bool:
        """True: exchange load reports with a few peers at a time (the registry carries
        membership and the catalog); False: with every peer (LAN gossip)."""
        ...

    def peers(self) -> Mapping[str, str]:
        """Live peers (not this node): node id -> control endpoint."""
        ...

    async def wait_change(self, seen: int) -> int:
        """Wait until membership changed since ``seen`` (start with -1); the new mark."""
        ...

    async def publish(self, record: AppRecord) -> None:
        """Make a change made on this node known cluster-wide (the service has merged
        it locally already)."""
        ...

    def problems(self) -> list[str]:
        """What keeps this node from its peers right now (shown by ``engine nodes``
        and logged): e.g. "multicast join failed on 10.0.0.4: ENODEV"."""
        ...

    def describe(self) -> dict[str, Any]:
        """Registry facts for ``engine nodes`` (kind, address, counters)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce this node and follow the others until cancelled; ``started()`` once
        announced.  Raise :class:`RegistryError` before ``started()`` when the registry
        cannot be used at all."""
        ...
