"""What a node started in a cluster gains: its part in the cluster, and the verbs it adds.

``Node(cluster=in_cluster(options))`` (what ``python -m engine run --cluster NAME``
does) gives the node a :class:`ClusterMember`: the :class:`Cluster` service, run beside
the apps, through which app requests are balanced, and these verbs
(``REQUEST ["", verb, args]`` on the control endpoint; docs/cluster.md):

- ``nodes``: the cluster as this node sees it (nodes, their apps and load);
- ``cluster.status`` / ``cluster.fetch`` / ``cluster.deploy`` / ``cluster.undeploy``:
  between nodes, sealed messages (:meth:`Cluster.seal`);
- ``cluster.run`` ``{"app", "event", "payload"}``: run a forwarded request here, never
  forwarding it again (one hop at most);
- ``deploy`` and ``undeploy`` wrap the node's own: they also reach every peer, and the
  reply gains ``"peers": {node id: outcome}``.

Only the nodes made so have them: importing this module changes nothing elsewhere.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import trio

from transport.errors import BadMessage

from engine.cluster.balance import NodeReport
from engine.cluster.bundle import make_bundle
from engine.cluster.service import Cluster, ClusterOptions
from engine.errors import AppNotFound
from engine.node.clustering import NodeCluster
from engine.node.control import answer
from engine.node.verbs import NodeApi, VerbFn, Verbs, app_arg, drain_arg

if TYPE_CHECKING:
    from engine.node.node import Node


class ClusterMember(NodeCluster):
    """A node's part in a cluster (the :class:`~engine.node.clustering.NodeCluster`
    the node is made with): the :class:`Cluster` service and the verbs it adds."""

    def __init__(self, node: Node, options: ClusterOptions):
        self.cluster = Cluster(node, options)

    @property
    def has_peers(self) -> bool:
        return self.cluster.has_peers

    @property
    def peer_secret(self) -> bytes | None:
        return self.cluster.secret

    def verbs(self, plain: Verbs) -> Verbs:
        return cluster_verbs(self.cluster, plain)

    async def serve(self, app: str, event: str, payload: Any) -> Any:
        return await self.cluster.serve(app, event, payload)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await self.cluster.run(task_status=task_status)


def in_cluster(options: ClusterOptions) -> Callable[[Node], ClusterMember]:
    """The ``cluster`` argument of :class:`~engine.node.node.Node` for a node in the
    cluster ``options`` describes."""
    return partial(ClusterMember, options=options)


def cluster_verbs(cluster: Cluster, plain: Verbs) -> dict[str, VerbFn]:
    """The verbs ``cluster`` adds to its node; ``plain``: the node's own, for
    ``deploy``/``undeploy``, which reach every peer after (or beside) the node's."""
    plain_deploy, plain_undeploy = plain["deploy"], plain["undeploy"]

    async def nodes(node: NodeApi, args: Any) -> Any:
        return cluster.describe()

    async def status(node: NodeApi, args: Any) -> Any:
        try:
            report = NodeReport.from_wire(cluster.open(args))
        except ValueError as exc:
            raise BadMessage(f"cluster.status: {exc}") from None
        cluster.heard(report)
        return cluster.seal(cluster.local_report().to_wire())

    async def fetch(node: NodeApi, args: Any) -> Any:
        name = app_arg(cluster.open(args))
        app = node.get(name)
        bundle = await trio.to_thread.run_sync(
            lambda: make_bundle(app.manifest, name, limit=cluster.options.max_bundle))
        return cluster.seal(bundle)

    async def deploy_here(node: NodeApi, args: Any) -> Any:
        bundle = cluster.open(args)
        if isinstance(bundle, dict) and isinstance(bundle.get("name"), str):
            cluster.tombstones.discard(bundle["name"])
        return await cluster.install(bundle)

    async def undeploy_here(node: NodeApi, args: Any) -> Any:
        body = cluster.open(args)
        name = app_arg(body)
        cluster.tombstones.add(name)
        if name not in node.apps:
            return "not here"
        await node.undeploy(name, drain_arg(body))   # (body may be the bare name)
        return "undeployed"

    async def run_here(node: NodeApi, args: Any) -> Any:
        if not (isinstance(args, dict) and isinstance(args.get("app"), str)
                and isinstance(args.get("event"), str)):
            raise BadMessage("cluster.run expects {\"app\", \"event\", \"payload\"}")
        cluster.stats["served_for_peers"] += 1
        job = node.get(args["app"]).submit(args["event"], args.get("payload"))
        return await answer(job)

    async def deploy_everywhere(node: NodeApi, args: Any) -> Any:
        result = await plain_deploy(node, args)
        result["peers"] = await cluster.share(result["app"])
        return result

    async def undeploy_everywhere(node: NodeApi, args: Any) -> Any:
        name = app_arg(args)
        drain = drain_arg(args)
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

    return {
        "nodes": nodes,
        "cluster.status": status,
        "cluster.fetch": fetch,
        "cluster.deploy": deploy_here,
        "cluster.undeploy": undeploy_here,
        "cluster.run": run_here,
        "deploy": deploy_everywhere,
        "undeploy": undeploy_everywhere,
    }
