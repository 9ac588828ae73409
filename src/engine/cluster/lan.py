"""The zero-config registry: UDP beacons on one LAN (the seed's promise).

Membership comes from a :class:`transport.mesh.discovery.Discovery` beacon in the
namespace ``engine-cluster:NAME`` whose endpoint is the node's control address.  The
catalog travels with the load reports (:mod:`engine.cluster.service`), so
:meth:`LanRegistry.publish` has nothing to do.  Every node exchanges reports with every
peer: O(N) messages per node per second (docs/cluster.md has the measured table).

The beacon interface defaults to the one the node's control endpoint binds
(``tcp://10.0.0.4:9300`` beacons on 10.0.0.4): left to the routing table, a host whose
routes do not cover the multicast group beaconed nowhere.  When beacons cannot be sent
or multicast cannot be joined, :meth:`LanRegistry.problems` says so (and the discovery
logs it), rather than the node running alone in silence.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import Any, Mapping

import trio

from transport.mesh.discovery import Discovery, DiscoveryConfig
from transport.mesh.interfaces import interface_for_endpoint
from transport.mesh.peers import Beacon

from engine.cluster.catalog import AppRecord
from engine.cluster.registry import Member

NAMESPACE_PREFIX = "engine-cluster:"


class LanRegistry:
    kind = "lan"
    samples_load = False

    def __init__(self, member: Member, config: DiscoveryConfig, *, secret: bytes | None):
        derived = interface_for_endpoint(member.control)
        if config.interface == "0.0.0.0" and derived is not None:
            config = replace(config, interface=derived)
        me = Beacon(id=member.id, name=member.id, role="responder",
                    namespace=NAMESPACE_PREFIX + member.cluster, key=member.key,
                    endpoint=member.control, host=socket.gethostname(), pid=os.getpid())
        self.config = config
        self.discovery = Discovery(me, config, secret=secret)

    def peers(self) -> Mapping[str, str]:
        return {b.id: b.endpoint for b in self.discovery.peers() if b.endpoint}

    async def wait_change(self, seen: int) -> int:
        return await self.discovery.wait_change(seen)

    async def publish(self, record: AppRecord) -> None:
        return None     # the catalog travels with the reports

    def problems(self) -> list[str]:
        return self.discovery.problems()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "port": self.config.port,
                "interface": self.config.interface, "beacons": dict(self.discovery.stats)}

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await self.discovery.run(task_status=task_status)
