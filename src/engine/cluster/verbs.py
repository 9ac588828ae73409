"""The cluster's node verbs and CLI commands (docs/cluster.md).

Node verbs (``REQUEST ["", verb, args]`` on the control endpoint):

- ``nodes``: the cluster as this node sees it (nodes, their apps and load);
- ``cluster.status`` / ``cluster.fetch`` / ``cluster.deploy`` / ``cluster.undeploy``:
  between nodes, sealed messages (:meth:`Cluster.seal`);
- ``cluster.run`` ``{"app", "event", "payload"}``: run a forwarded request here, never
  forwarding it again (one hop at most);
- ``deploy`` and ``undeploy`` are wrapped: on a clustered node they also reach every
  peer, and the reply gains ``"peers": {node id: outcome}``.

CLI: ``python -m engine nodes [--node ADDR] [--json]``, and ``run`` gains
``--cluster NAME --state-dir DIR`` (and the key, secret and discovery options).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import trio

from transport.mesh.discovery import DiscoveryConfig
from transport.errors import BadMessage

from engine.cli.commands import COMMANDS, EXIT_OK, command, connect_node, node_options, to_json
from engine.cluster.service import ClusterOptions
from engine.node.control import _app_arg, _drain_arg, answer, verb
from engine.node.control import deploy as plain_deploy
from engine.node.control import undeploy as plain_undeploy
from engine.errors import AppNotFound


def _cluster_of(node: Any):
    cluster = getattr(node, "cluster", None)
    if cluster is None:
        raise BadMessage("this node is not in a cluster (start it with --cluster NAME "
                         "or ENGINE_CLUSTER=NAME)")
    return cluster


# -- verbs ---------------------------------------------------------------------------------

@verb("nodes")
async def nodes_verb(node, args: Any) -> Any:
    return _cluster_of(node).describe()


@verb("cluster.status")
async def status_verb(node, args: Any) -> Any:
    from engine.cluster.balance import NodeReport

    cluster = _cluster_of(node)
    try:
        report = NodeReport.from_wire(cluster.open(args))
    except ValueError as exc:
        raise BadMessage(f"cluster.status: {exc}") from None
    cluster.heard(report)
    return cluster.seal(cluster.local_report().to_wire())


@verb("cluster.fetch")
async def fetch_verb(node, args: Any) -> Any:
    from engine.cluster.bundle import make_bundle

    cluster = _cluster_of(node)
    name = _app_arg(cluster.open(args))
    app = node.get(name)
    bundle = await trio.to_thread.run_sync(
        lambda: make_bundle(app.manifest, name, limit=cluster.options.max_bundle))
    return cluster.seal(bundle)


@verb("cluster.deploy")
async def cluster_deploy_verb(node, args: Any) -> Any:
    cluster = _cluster_of(node)
    bundle = cluster.open(args)
    if isinstance(bundle, dict) and isinstance(bundle.get("name"), str):
        cluster.tombstones.discard(bundle["name"])
    return await cluster.install(bundle)


@verb("cluster.undeploy")
async def cluster_undeploy_verb(node, args: Any) -> Any:
    cluster = _cluster_of(node)
    body = cluster.open(args)
    name = _app_arg(body)
    cluster.tombstones.add(name)
    if name not in node.apps:
        return "not here"
    await node.undeploy(name, body.get("drain"))
    return "undeployed"


@verb("cluster.run")
async def run_verb(node, args: Any) -> Any:
    if not (isinstance(args, dict) and isinstance(args.get("app"), str)
            and isinstance(args.get("event"), str)):
        raise BadMessage("cluster.run expects {\"app\", \"event\", \"payload\"}")
    cluster = getattr(node, "cluster", None)
    if cluster is not None:
        cluster.stats["served_for_peers"] += 1
    job = node.get(args["app"]).submit(args["event"], args.get("payload"))
    return await answer(job)


@verb("deploy")
async def deploy_everywhere(node, args: Any) -> Any:
    result = await plain_deploy(node, args)
    cluster = getattr(node, "cluster", None)
    if cluster is not None:
        result["peers"] = await cluster.share(result["app"])
    return result


@verb("undeploy")
async def undeploy_everywhere(node, args: Any) -> Any:
    cluster = getattr(node, "cluster", None)
    if cluster is None:
        return await plain_undeploy(node, args)
    name = _app_arg(args)
    drain = _drain_arg(args)
    peers: dict[str, str] = {}

    async def to_peers() -> None:
        peers.update(await cluster.unshare(name, drain))

    missing = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(to_peers)
        try:
            result = await plain_undeploy(node, args)
        except AppNotFound:
            missing = True
            cluster.tombstones.add(name)
            result = {"app": name, "state": "not here"}
    if missing and not any(outcome == "undeployed" for outcome in peers.values()):
        raise AppNotFound(f"no app named {name!r} on any node of cluster {cluster.options.name}")
    result["peers"] = peers
    return result


# -- CLI -------------------------------------------------------------------------------------

@command("nodes", "list the cluster's nodes with their apps and load")
def nodes_command(p: argparse.ArgumentParser):
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


_run_help, _plain_run_setup = COMMANDS["run"]


@command("run", _run_help)
def run_command(p: argparse.ArgumentParser):
    plain = _plain_run_setup(p)
    g = p.add_argument_group("cluster (default: from ENGINE_CLUSTER, ENGINE_STATE_DIR, MESH_*)")
    g.add_argument("--cluster", metavar="NAME", help="join the cluster NAME (zero-config discovery)")
    g.add_argument("--cluster-key", metavar="KEY", help="separates clusters of one name on a LAN")
    g.add_argument("--cluster-secret", metavar="SECRET",
                   help="sign beacons and cluster messages (default ENGINE_CLUSTER_SECRET)")
    g.add_argument("--state-dir", metavar="DIR", help="where apps received from peers are written")
    g.add_argument("--discovery-port", type=int, metavar="PORT", help="UDP discovery port")
    g.add_argument("--discovery-interface", metavar="IP", help="IPv4 of the interface to beacon on")

    async def run(args: argparse.Namespace) -> int:
        from engine.node.node import serve

        disco = DiscoveryConfig.from_env(**{k: v for k, v in (
            ("port", args.discovery_port), ("interface", args.discovery_interface)) if v is not None})
        options = ClusterOptions.from_env(
            name=args.cluster, key=args.cluster_key, secret=args.cluster_secret,
            state_dir=Path(args.state_dir) if args.state_dir else None, discovery=disco)
        if options is None:
            return await plain(args)
        logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return await serve(args.paths, control=args.control, cluster=options)
    return run

