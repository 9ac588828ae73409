"""The cluster on the command line (docs/cluster.md): ``python -m engine nodes``, and the
options with which ``run`` starts a node in a cluster (``--cluster NAME ...``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli.common import EXIT_OK, Runner, command, connect_node, node_options, to_json

if TYPE_CHECKING:
    from engine.cluster.service import ClusterOptions


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """``run``'s cluster options (read back by :func:`cluster_options`)."""
    g = p.add_argument_group("cluster (default: from ENGINE_CLUSTER, ENGINE_STATE_DIR, MESH_*)")
    g.add_argument("--cluster", metavar="NAME", help="join the cluster NAME (zero-config discovery)")
    g.add_argument("--cluster-key", metavar="KEY", help="separates clusters of one name on a LAN")
    g.add_argument("--cluster-secret", metavar="SECRET",
                   help="sign beacons and cluster messages (default ENGINE_CLUSTER_SECRET)")
    g.add_argument("--state-dir", metavar="DIR", help="where apps received from peers are written")
    g.add_argument("--discovery-port", type=int, metavar="PORT", help="UDP discovery port")
    g.add_argument("--discovery-interface", metavar="IP", help="IPv4 of the interface to beacon on")


def cluster_options(args: argparse.Namespace) -> ClusterOptions | None:
    """The cluster ``run``'s node joins: from the options, else the environment;
    None when neither names one."""
    from transport.mesh.discovery import DiscoveryConfig

    from engine.cluster.service import ClusterOptions

    disco = DiscoveryConfig.from_env(**{k: v for k, v in (
        ("port", args.discovery_port), ("interface", args.discovery_interface)) if v is not None})
    return ClusterOptions.from_env(
        name=args.cluster, key=args.cluster_key, secret=args.cluster_secret,
        state_dir=Path(args.state_dir) if args.state_dir else None, discovery=disco)


@command("nodes", "list the cluster's nodes with their apps and load")
def nodes_command(p: argparse.ArgumentParser) -> Runner:
    node_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            view = await node.verb("nodes")
        if args.json:
            print(to_json(view, indent=2))
            return EXIT_OK
        print(f"cluster {view['cluster']}: {len(view['nodes'])} node(s)")
        for n in view["nodes"]:
            mark = " (this node)" if n["self"] else f"  seen {n['age']:.1f}s ago"
            if not n.get("connected", True):
                mark += " (not connected: not routed to)"
            print(f"{n['id']}  {n['control']}  cpu {n['cpu'] * 100:.0f}%{mark}")
            for name, a in n["apps"].items():
                print(f"  {name}\t{a['state']}\tqueue {a['queue']}\trunning {a['running']}"
                      f"/{a['capacity']}\tslaves {a['slaves']}\t{a['jobs_per_s']:g} jobs/s")
        return EXIT_OK
    return run
