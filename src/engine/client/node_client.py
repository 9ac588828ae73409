"""Python client of a node's control endpoint.

```python
from engine.client import connect

async with connect("tcp://127.0.0.1:9300") as node:
    print(await node.call("echo", "echo", {"hello": 1}, timeout=5))
    async for chunk in node.stream("echo", "count", {"n": 3}):
        print(chunk)
    print(await node.list())
```
Errors arrive as the typed :class:`transport.errors.RemoteError` subclasses the node
raised (``AppNotFound``, ``QueueFull``, ``SlaveDied``, ``HandlerError``...).

The node's token (docs/security.md) is found by itself on the node's host, as the
node's user (:mod:`engine.client.tokens`); pass ``token=`` or ``token_file=`` elsewhere.
Without it, only ``list``, ``info`` and ``nodes`` are answered (on loopback), the rest
with ``Unauthorized``.
"""
from __future__ import annotations

import builtins
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import os
import time

import trio

from transport.errors import Unreachable
from transport.rpc import ReplyStream, RpcClient
from transport.tls import TlsConfig

from engine.client.tls import client_context
from engine.client.tokens import control_guard
from engine.cluster.bundle import BundleError, make_bundle
from engine.cluster.catalog import sign_grant
from engine.cluster.secret import secret_from
from engine.manifest import MANIFEST_FILE, AppManifest, load_manifest, parse_manifest

DEFAULT_NODE = "tcp://127.0.0.1:9300"
NODE_TARGET = ""          # the target of node verbs (list, info, deploy...)


class NodeClient:
    def __init__(self, rpc: RpcClient):
        self.rpc = rpc

    @property
    def address(self) -> str:
        return self.rpc.address

    # -- app calls --------------------------------------------------------------------
    async def call(self, app: str, event: str, payload: Any = None, *,
                   timeout: float | None = None, chunks: Any = None) -> Any:
        """The reply's value, or the list of chunks of a streamed reply.  ``chunks`` (an
        iterable or async iterable) makes it a chunked request (docs/protocol.md)."""
        return await self.rpc.call(app, event, payload, timeout=timeout, chunks=chunks)

    def stream(self, app: str, event: str, payload: Any = None, *,
               timeout: float | None = None) -> ReplyStream:
        """``async for chunk in node.stream(...)``: chunks as they arrive (a single-value
        reply is one chunk). ``timeout`` bounds the wait for each chunk."""
        return self.rpc.stream(app, event, payload, timeout=timeout)

    # -- node verbs ---------------------------------------------------------------------
    async def verb(self, verb: str, args: Any = None, *, timeout: float | None = None) -> Any:
        """Any node verb by name (for verbs added by other modules, e.g. ``schedule``)."""
        return await self.rpc.call(NODE_TARGET, verb, args, timeout=timeout)

    async def list(self) -> dict[str, Any]:
        """``{"apps": {name: {"state", "manifest"}}, "rejected": {manifest: reason}}``."""
        return await self.verb("list")

    async def info(self, app: str | None = None) -> dict[str, Any]:
        """One app's info (pool: slaves, queue, done, failed, latency; drivers), or the node's."""
        return await self.verb("info", {"app": app} if app else None)

    async def deploy(self, manifest: str | Path | dict, *, base_dir: str | Path | None = None,
                     name: str | None = None, timeout: float | None = None,
                     cluster_secret: str | bytes | None = None) -> dict[str, Any]:
        """Deploy a manifest file (path resolved here, read by the node: same machine) or a
        manifest given as a dict with the folder its relative paths start from.

        On a node in a cluster the deploy is cluster-wide and must carry a grant signed
        with the cluster's secret (docs/cluster.md): ``cluster_secret``, else
        ``ENGINE_CLUSTER_SECRET`` / ``ENGINE_CLUSTER_SECRET_FILE``; none: no grant (a node
        outside a cluster, or an ``--insecure`` one, needs none)."""
        if isinstance(manifest, dict):
            if base_dir is None:
                raise ValueError("deploying a manifest dict needs base_dir")
            args: dict[str, Any] = {"manifest": manifest, "base_dir": str(Path(base_dir).absolute())}
        else:
            args = {"path": str(Path(manifest).absolute())}
        if name is not None:
            args["name"] = name
        secret = grant_secret(cluster_secret)
        if secret is not None:
            parsed = _manifest(args, name)
            digest = await trio.to_thread.run_sync(_content_digest, parsed)
            args["grant"] = sign_grant(secret, "deploy", parsed.name, at=time.time(),
                                       digest=digest).to_wire()
        return await self.verb("deploy", args, timeout=timeout)

    async def undeploy(self, app: str, *, drain: float | None = None,
                       timeout: float | None = None,
                       cluster_secret: str | bytes | None = None) -> dict[str, Any]:
        """Stop an app, draining in-flight jobs for ``drain`` seconds (default: its
        termination-timeout); in a cluster, everywhere (signed as for :meth:`deploy`)."""
        args: dict[str, Any] = {"app": app}
        if drain is not None:
            args["drain"] = drain
        secret = grant_secret(cluster_secret)
        if secret is not None:
            args["grant"] = sign_grant(secret, "undeploy", app, at=time.time()).to_wire()
        return await self.verb("undeploy", args, timeout=timeout)

    async def reload(self, app: str, *, timeout: float | None = None) -> dict[str, Any]:
        """Redeploy ``app`` from its manifest file as it is now: the new version takes
        over once its first slave runs, the old one drains (nothing lost); RedeployFailed
        and the old version serving on if the new one cannot start."""
        return await self.verb("reload", {"app": app}, timeout=timeout)

    async def crashlog(self, app: str) -> builtins.list[str]:  # (`list` is a method here)
        lines: builtins.list[str] = await self.verb("crashlog", {"app": app})
        return lines


@asynccontextmanager
async def connect(address: str = DEFAULT_NODE, *, timeout: float | None = None,
                  connect_timeout: float = 5.0, token: str | bytes | None = None,
                  token_file: str | Path | None = None,
                  tls: TlsConfig | None = None) -> AsyncIterator[NodeClient]:
    """Connect to a node; ``timeout`` is the default per-call timeout (None: none).
    Raises :class:`Unreachable` if no node answers within ``connect_timeout`` seconds.
    ``token``/``token_file``: the node's token, when it cannot be found by itself
    (:mod:`engine.client.tokens`; a named file that cannot be read raises TokenError).
    ``tls``: this client's certificate for a ``tls+tcp://`` node (default: from
    ``ENGINE_TLS_*``, :mod:`engine.client.tls`)."""
    guard = control_guard(address, token=token, token_file=token_file)
    ssl_context = client_context(address, tls)
    try:
        async with RpcClient(address, timeout=timeout, guard=guard, ssl_context=ssl_context) as rpc:
            with trio.move_on_after(connect_timeout):
                await rpc.wait_connected()
            if not rpc.connected:
                raise Unreachable(f"no node listening at {address} (waited {connect_timeout:g} s)")
            yield NodeClient(rpc)
    except BaseExceptionGroup as group:
        # The client's nursery wraps whatever the caller's block raised; hand back the
        # typed error itself (AppNotFound, HandlerError...) so `except` clauses work.
        only = _sole_exception(group)
        if only is None:
            raise
        raise only from None


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner


def grant_secret(secret: str | bytes | None) -> bytes | None:
    """The cluster secret a client signs cluster-wide changes with: the argument, else
    ``ENGINE_CLUSTER_SECRET``, else the file ``ENGINE_CLUSTER_SECRET_FILE`` names."""
    if secret is None:
        secret = secret_from(os.environ)
    if secret is None:
        return None
    return secret.encode() if isinstance(secret, str) else secret


def _manifest(args: dict[str, Any], name: str | None) -> AppManifest:
    """The app a deploy names (the grant names it and its content): read here, as the
    node will read it."""
    if "path" in args:
        return load_manifest(args["path"], name=name)
    return parse_manifest(args["manifest"], source=Path(args["base_dir"]) / MANIFEST_FILE,
                          name=name)


def _content_digest(manifest: AppManifest) -> str:
    """The digest of the bundle the node will share (engine/cluster/bundle.py), or ""
    for an app that is not shared (the node then deploys it on itself only)."""
    try:
        return str(make_bundle(manifest, manifest.name)["digest"])
    except (BundleError, OSError):
        return ""
