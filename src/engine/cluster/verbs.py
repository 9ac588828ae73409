"""What a node started in a cluster gains: its part in the cluster, and the verbs it adds.

``Node(cluster=in_cluster(options))`` (what ``python -m engine run --cluster NAME``
does) gives the node a :class:`ClusterMember`: the :class:`Cluster` service, run beside
the apps, through which app requests are balanced, and these verbs
(``REQUEST ["", verb, args]`` on the control endpoint; docs/cluster.md):

- ``nodes``: the cluster as this node sees it (nodes, their apps and load);
- ``cluster.status`` / ``cluster.catalog`` / ``cluster.fetch`` / ``cluster.deploy`` /
  ``cluster.undeploy``: between nodes, sealed messages (:meth:`Cluster.seal`); a deploy
  or undeploy carries the catalog record it makes, with the operator's grant;
- ``cluster.run`` ``{"app", "event", "payload", "from"}``: run a forwarded request
  here, never forwarding it again (one hop at most);
- ``deploy`` and ``undeploy`` replace the node's own: a change of the cluster's catalog
  (the caller's grant checked first, :meth:`ClusterApps.authorize`), made here, pushed to
  the linked peers and published to the registry; the reply gains ``"peers": {node id:
  outcome}``.  A ``deploy`` of an app that runs here with other content replaces it.

Only the nodes made so have them: importing this module changes nothing elsewhere.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import trio


from transport.errors import BadMessage, Unauthorized

from engine.cluster.balance import NodeReport
from engine.cluster.bundle import BundleError, check_bundle, make_bundle
from engine.cluster.catalog import AppRecord
from engine.cluster.service import Cluster, ClusterOptions
from engine.errors import AppNotFound
from engine.node.clustering import NodeCluster
from engine.node.verbs import NodeApi, VerbFn, Verbs, app_arg, deploy_manifest, drain_arg

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

    def describe(self) -> dict[str, Any]:
        return self.cluster.describe()

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
    ``undeploy`` of an app that is not shared."""
    apps = cluster.apps
    plain_undeploy = plain["undeploy"]

    async def nodes(node: NodeApi, args: Any) -> Any:
        return cluster.describe()

    async def reload_refused(node: NodeApi, args: Any) -> Any:
        """A reload on one node would run code the catalog does not know of there."""
        raise BadMessage("reload: in a cluster, deploy the new version (engine deploy "
                         "MANIFEST): every node then switches to it without a lost request")

    async def status(node: NodeApi, args: Any) -> Any:
        cluster.stats["messages_in"] += 1
        try:
            report = NodeReport.from_wire(cluster.open(args))
        except ValueError as exc:
            raise BadMessage(f"cluster.status: {exc}") from None
        cluster.heard(report)
        cluster.stats["messages_out"] += 1
        return cluster.seal(cluster.status_body())

    async def catalog(node: NodeApi, args: Any) -> Any:
        cluster.stats["messages_in"] += 1
        cluster.catalog_heard(cluster.open(args), "a peer's catalog exchange")
        cluster.stats["messages_out"] += 1
        return cluster.seal({"records": apps.catalog.to_wire()})

    async def fetch(node: NodeApi, args: Any) -> Any:
        body = cluster.open(args)
        name = app_arg(body)
        app = node.get(name)
        bundle = await trio.to_thread.run_sync(
            lambda: make_bundle(app.manifest, name, limit=cluster.options.max_bundle))
        want = body.get("digest") if isinstance(body, dict) else None
        if want and bundle["digest"] != want:
            raise AppNotFound(f"app {name} runs {bundle['digest'][:12]} here, not {want[:12]}")
        return cluster.seal(bundle)

    def record_arg(body: Any, verb: str) -> AppRecord:
        try:
            return AppRecord.from_wire(body.get("record") if isinstance(body, dict) else None,
                                       f"{verb}.record")
        except ValueError as exc:
            raise BadMessage(str(exc)) from None

    async def deploy_here(node: NodeApi, args: Any) -> Any:
        body = cluster.open(args)
        record = record_arg(body, "cluster.deploy")
        bundle = check_bundle(body.get("bundle"), limit=cluster.options.max_bundle)
        if bundle["digest"] != record.digest or bundle["name"] != record.name:
            raise BadMessage("cluster.deploy: the bundle is not the record's content")
        apps.merge([record], source="a peer's deploy")   # (only a bundle that checks)
        return await apps.install(bundle)

    async def undeploy_here(node: NodeApi, args: Any) -> Any:
        body = cluster.open(args)
        record = record_arg(body, "cluster.undeploy")
        apps.merge([record], source="a peer's undeploy")
        name = record.name
        async with apps.lock(name):
            winner = apps.catalog.get(name)
            if winner is not None and winner.deployed:
                return f"superseded: the cluster runs {winner.label}"
            if name not in node.apps:
                return "not here"
            await node.undeploy(name, drain_arg(body))
        return "undeployed"

    async def run_here(node: NodeApi, args: Any) -> Any:
        if not (isinstance(args, dict) and isinstance(args.get("app"), str)
                and isinstance(args.get("event"), str)):
            raise BadMessage("cluster.run expects {\"app\", \"event\", \"payload\"}")
        origin = args.get("from")
        return await cluster.forwarding.run_for_peer(
            origin if isinstance(origin, str) else "", args["app"], args["event"],
            args.get("payload"))

    async def deploy_everywhere(node: NodeApi, args: Any) -> Any:
        manifest = deploy_manifest(args)
        name = manifest.name
        grant = apps.authorize("deploy", name, args.get("grant"))
        try:
            bundle: dict[str, Any] | None = await trio.to_thread.run_sync(
                lambda: make_bundle(manifest, name, limit=cluster.options.max_bundle))
        except (BundleError, OSError) as exc:
            bundle, not_shared = None, f"not shared: {exc}"
        content = bundle["digest"] if bundle is not None else ""
        if grant is not None and grant.digest != content:
            raise Unauthorized(f"cluster-wide deploy of {name!r} refused: the grant was signed "
                               f"for content {grant.digest[:12] or '(none)'}, this is "
                               f"{content[:12] or 'an app that is not shared'}")
        async with apps.lock(name):
            app, outcome = await apps.deploy_here(manifest, bundle)
            if bundle is None:
                return {"app": app.name, "manifest": str(app.manifest.source), "state": app.state,
                        "outcome": outcome, "peers": {pid: not_shared for pid in cluster.links()}}
            record = apps.change(name, deployed=True, grant=grant,
                                 version=manifest.version, digest=bundle["digest"])
        # Pushed to the linked peers first (with the bundle: no fetch), then published
        # for the others (with etcd they fetch it from a holder).
        peers = await cluster.to_peers("cluster.deploy", cluster.seal(
            {"bundle": bundle, "record": record.to_wire()}), timeout=60)
        await cluster.publish(record)
        return {"app": app.name, "manifest": str(app.manifest.source), "state": app.state,
                "outcome": outcome, "version": record.version, "digest": record.digest,
                "generation": record.generation, "peers": peers}

    async def undeploy_everywhere(node: NodeApi, args: Any) -> Any:
        name = app_arg(args)
        drain = drain_arg(args)
        if name not in apps.catalog:
            if name not in node.apps:
                raise AppNotFound(f"no app named {name!r} on this node or in the catalog of "
                                  f"cluster {cluster.options.name}")
            return await plain_undeploy(node, args)    # an app that is not shared
        grant = apps.authorize("undeploy", name, args.get("grant") if isinstance(args, dict) else None)
        async with apps.lock(name):
            record = apps.change(name, deployed=False, grant=grant)
            here = name in node.apps
            peers_args = cluster.seal({"record": record.to_wire(), "drain": drain})
            peers: dict[str, str] = {}

            async def to_peers() -> None:
                peers.update(await cluster.to_peers("cluster.undeploy", peers_args,
                                                    timeout=(drain or 30) + 30))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_peers)
                if here:
                    await node.undeploy(name, drain)
            await cluster.publish(record)
        return {"app": name, "state": "stopped" if here else "not here",
                "generation": record.generation, "peers": peers}

    return {
        "nodes": nodes,
        "cluster.status": status,
        "cluster.catalog": catalog,
        "cluster.fetch": fetch,
        "cluster.deploy": deploy_here,
        "cluster.undeploy": undeploy_here,
        "cluster.run": run_here,
        "deploy": deploy_everywhere,
        "undeploy": undeploy_everywhere,
        "reload": reload_refused,
    }

