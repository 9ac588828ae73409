"""The verbs every node answers on its control endpoint (``REQUEST ["", verb, args]``).

A verb is ``async def verb(node, args)``: ``args`` is the request's payload, and the
return value (or a :class:`transport.rpc.Stream`) is the reply; raising answers with
the error, by type name.  Each :class:`~engine.node.node.Node` owns its table of verbs,
built from :func:`base_verbs` when it is made: a node started in a cluster gets the
cluster's verbs too (:class:`engine.node.clustering.NodeCluster`), and what a plain
node answers never depends on what else the process imported.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Protocol

from transport.errors import BadMessage

from engine.drivers.mesh_publisher import mesh_publish_verb
from engine.drivers.scheduler import schedule_verb
from engine.manifest import MANIFEST_FILE, AppManifest, load_manifest, parse_manifest

if TYPE_CHECKING:
    from engine.app import App


class NodeApi(Protocol):
    """What a verb may use of its node (:class:`engine.node.node.Node`)."""

    @property
    def apps(self) -> Mapping[str, App]: ...

    def get(self, name: str) -> App: ...

    def list(self) -> dict[str, Any]: ...

    def info(self) -> dict[str, Any]: ...

    async def deploy(self, manifest: AppManifest | str | Path, *, name: str | None = None,
                     replace: bool = False) -> App: ...

    async def undeploy(self, name: str, timeout: float | None = None) -> None: ...


VerbFn = Callable[[NodeApi, Any], Awaitable[Any]]
Verbs = Mapping[str, VerbFn]


def app_arg(args: Any) -> str:
    """Verbs about one app accept ``"name"`` or ``{"app": "name"}``."""
    if isinstance(args, str) and args:
        return args
    if isinstance(args, dict) and isinstance(args.get("app"), str) and args["app"]:
        return args["app"]
    raise BadMessage(f"expected an app name or {{\"app\": name}}, got {args!r:.100}")


def drain_arg(args: Any) -> float | None:
    """``undeploy``'s optional ``"drain"``: seconds to let in-flight jobs finish."""
    drain = args.get("drain") if isinstance(args, dict) else None
    if drain is not None and (not isinstance(drain, (int, float)) or isinstance(drain, bool)
                              or not 0 <= drain < math.inf):  # (NaN fails too)
        raise BadMessage(f"undeploy: drain must be a non-negative number of seconds, got {drain!r:.60}")
    return drain


async def list_apps(node: NodeApi, args: Any) -> Any:
    return node.list()


async def info(node: NodeApi, args: Any) -> Any:
    if args is None or args == {} or (isinstance(args, dict) and args.get("app") is None):
        return node.info()
    return node.get(app_arg(args)).info()


async def crashlog(node: NodeApi, args: Any) -> Any:
    return node.get(app_arg(args)).crashlog()


def deploy_manifest(args: Any) -> AppManifest:
    """``deploy``'s manifest, parsed before anything runs: ``{"path": "/abs/manifest.json"}``
    or ``{"manifest": {...}, "base_dir": "/abs"}``, optionally with ``"name"``
    (ManifestError, or BadMessage for arguments of another shape)."""
    if not isinstance(args, dict):
        raise BadMessage("deploy expects {\"path\": ...} or {\"manifest\": {...}, \"base_dir\": ...}")
    name = args.get("name")
    if name is not None and not isinstance(name, str):
        raise BadMessage(f"deploy: name must be a string, got {name!r:.60}")
    if isinstance(args.get("path"), str):
        return load_manifest(args["path"], name=name)
    if "manifest" in args and isinstance(args.get("base_dir"), str):
        return parse_manifest(args["manifest"], source=Path(args["base_dir"]) / MANIFEST_FILE,
                              name=name)
    raise BadMessage("deploy expects {\"path\": ...} or {\"manifest\": {...}, \"base_dir\": ...}")


async def deploy(node: NodeApi, args: Any) -> Any:
    """:func:`deploy_manifest`'s app, started; a running app of that name is redeployed
    (the new version takes over once it runs, nothing lost). ManifestError, DriverError
    and RedeployFailed reach the caller by type name."""
    manifest = deploy_manifest(args)
    redeploy = manifest.name in node.apps
    app = await node.deploy(manifest, replace=True)
    return {"app": app.name, "manifest": str(app.manifest.source), "state": app.state,
            "redeployed": redeploy}


async def reload(node: NodeApi, args: Any) -> Any:
    """Redeploy a running app from its manifest file as it is now (its code and
    manifest edited in place): ``engine reload APP``."""
    app = node.get(app_arg(args))
    manifest = load_manifest(app.manifest.source, name=app.name)
    await node.deploy(manifest, replace=True)
    return {"app": app.name, "manifest": str(manifest.source), "state": app.state,
            "redeployed": True}


async def undeploy(node: NodeApi, args: Any) -> Any:
    name = app_arg(args)
    await node.undeploy(name, drain_arg(args))
    return {"app": name, "state": "stopped"}


async def not_in_a_cluster(node: NodeApi, args: Any) -> Any:
    """``nodes`` on a node started without a cluster: say why there is no answer."""
    raise BadMessage("this node is not in a cluster (start it with --cluster NAME "
                     "or ENGINE_CLUSTER=NAME)")


def base_verbs() -> dict[str, VerbFn]:
    """A fresh table of the verbs of a node outside any cluster."""
    return {
        "list": list_apps,
        "info": info,
        "deploy": deploy,
        "undeploy": undeploy,
        "reload": reload,
        "crashlog": crashlog,
        "schedule": schedule_verb,   # the manual-scheduler driver's (engine.drivers.scheduler)
        "mesh-publish": mesh_publish_verb,   # engine.publish from a handler (mesh-publisher)
        "nodes": not_in_a_cluster,
    }
