"""Clusters of in-process nodes on loopback, for tests: members of one LAN cluster that
report and expire quickly, and the wait for them to see each other."""
from __future__ import annotations

from pathlib import Path

from engine.cluster.service import ClusterOptions
from engine.cluster.verbs import in_cluster
from engine.node.node import Node
from transport.mesh.discovery import DiscoveryConfig


def lan_member(state_dir: Path, name: str, port: int, secret: str) -> Node:
    """A node of cluster ``name`` (discovery on UDP ``port`` of 127.0.0.1), with its
    state in ``state_dir``; run it with ``nursery.start(node.run)``."""
    return Node(control="tcp://127.0.0.1:0", cluster=in_cluster(ClusterOptions(
        name=name, secret=secret, state_dir=state_dir, report_interval=0.2, expiry=2,
        discovery=DiscoveryConfig(port=port, interface="127.0.0.1", hello_interval=0.2,
                                  expiry=2))))


async def sees_all(client, n: int) -> bool:
    """The node behind ``client`` lists ``n`` nodes, all connected."""
    nodes = (await client.verb("nodes"))["nodes"]
    return len(nodes) == n and all(node["connected"] for node in nodes)
