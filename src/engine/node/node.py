"""The node: a nursery of apps keyed by name, plus the control endpoint and its verbs.

Apps are found on disk (:func:`find_manifests`), parsed in full before anything starts,
and each runs in its own child of the node's nursery, so one bad manifest or one app
whose driver cannot bind is reported and skipped while the others keep serving.
:meth:`Node.shutdown` drains every app (each for its termination-timeout) and then
cancels the node, whose nursery does not exit before every slave is reaped.

Each node owns its table of verbs (:attr:`Node.verbs`, from :mod:`engine.node.verbs`),
fixed when it is made: a node made with ``cluster=`` (a factory of a
:class:`~engine.node.clustering.NodeCluster`) has the cluster's verbs as well.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import trio

from engine.app import App
from engine.errors import AppNotFound, DriverError, ManifestError, ShuttingDown
from engine.faults import Backoff
from engine.manifest import MANIFEST_FILE, AppManifest, load_manifest, parse_manifest
from engine.node.auth import ControlAuth, NodeToken
from engine.node.clustering import NodeCluster
from engine.node.verbs import VerbFn, base_verbs
from engine.pool.zygote_client import Zygote, running_zygote

if TYPE_CHECKING:
    from transport.tls import TlsConfig
    from transport.rpc import RpcServer

log = logging.getLogger("engine.node")

DEFAULT_CONTROL = "tcp://127.0.0.1:9300"


def find_manifests(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Manifest files under ``paths``, and (path, reason) for paths that hold none.

    A file is a manifest; a folder with ``manifest.json`` is one app; any other folder
    holds app folders, each with a ``manifest.json`` (folders without one are ignored,
    so e.g. ``examples/mesh`` can sit beside the apps)."""
    found: list[Path] = []
    missing: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif (path / MANIFEST_FILE).is_file():
            found.append(path / MANIFEST_FILE)
        elif path.is_dir():
            inside = sorted(p / MANIFEST_FILE for p in path.iterdir()
                            if p.is_dir() and (p / MANIFEST_FILE).is_file())
            if inside:
                found.extend(inside)
            else:
                missing.append((str(path), f"no {MANIFEST_FILE} in it or in its subfolders"))
        else:
            missing.append((str(path), "no such file or folder"))
    return found, missing


ClusterFactory = Callable[["Node"], NodeCluster]


class Node:
    def __init__(self, *, control: str | None = DEFAULT_CONTROL,
                 app_factory: Callable[[AppManifest], App] = App,
                 cluster: ClusterFactory | None = None,
                 auth: ControlAuth = ControlAuth(), tls: TlsConfig | None = None):
        """``cluster``: makes this node's part in a cluster (``engine.cluster.verbs.in_cluster``);
        without it the node is on its own.  ``auth``: where the control endpoint's
        token comes from (engine/node/auth.py; by default the node's own file for its
        address, made on first start: loopback only)."""
        self.control_requested = control
        self.tls = tls        # its certificate: for a tls+tcp:// control endpoint, and its peers
        self.control_address: str | None = None   # the bound address, once running (dialable here)
        # What peers on other hosts are told to dial: the bound address, or for a node
        # bound to every interface (``tcp://:9300``) ``tcp://0.0.0.0:9300``, which a LAN
        # peer reads as "the beacon's source address" (docs/cluster.md).
        self.control_advertised: str | None = None
        self.token = NodeToken(auth)               # its control endpoint's (never logged)
        self.app_factory = app_factory
        self.apps: dict[str, App] = {}
        self.rejected: dict[str, str] = {}        # manifest path -> why it is not hosted
        self.app_failures = 0                     # apps started again after failing whole
        self.state = "created"
        self.started_at = time.time()
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._control_server: RpcServer | None = None
        self.zygote: Zygote | None = None         # shared by the apps' slave pools
        # Its part in a cluster (made last: it is handed the node): adds verbs, routes
        # app requests, runs beside the apps.
        self.cluster: NodeCluster | None = None if cluster is None else cluster(self)
        verbs = base_verbs()
        if self.cluster is not None:
            verbs.update(self.cluster.verbs(MappingProxyType(base_verbs())))
        self.verbs: Mapping[str, VerbFn] = MappingProxyType(verbs)   # this node's, fixed

    # -- lifetime -------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or :meth:`shutdown`; started() once control listens."""
        failure: Exception | None = None
        try:
            # One zygote forks the slaves of every app here (engine.spawn "zygote");
            # it outlives the apps, so it is stopped only after their slaves.
            async with running_zygote(sys.executable) as self.zygote:
                with trio.CancelScope() as self._scope:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        failure = await self._start_control(nursery)
                        if failure is None and self.cluster is not None:
                            failure = await self._start_cluster(nursery, self.cluster)
                        if failure is None:
                            self.state = "running"
                            task_status.started(self)
                            await trio.sleep_forever()
            # Outside the nursery: the caller sees the TransportError, not a group.
            if failure is not None:
                raise failure
        finally:
            self.state = "stopped"
            self.token.close()
            self._stopped.set()

    async def _start_control(self, nursery: trio.Nursery) -> Exception | None:
        if not self.control_requested:
            return None
        from transport.errors import TransportError
        from transport.rpc import RpcServer
        from transport.seal import SealGate, SealKey

        from engine.client.tls import server_context, tls_env
        from engine.client.tokens import TokenError
        from engine.node.auth import OPEN_VERBS, is_local
        from engine.node.control import ClusterControlHandler, ControlHandler

        requested = self.control_requested
        local = is_local(requested)
        # The token before anything listens: a node that may not serve (beyond loopback
        # with no token given) binds nothing.
        try:
            keys = [SealKey.from_secret(self.token.before_bind(requested).secret)]
        except TokenError as exc:
            return exc
        if self.cluster is not None:
            secret = self.cluster.peer_secret
            if secret is not None:   # its peers seal with the cluster's secret
                keys.append(SealKey.from_secret(secret, b"cluster"))
            elif not local:
                return TokenError(
                    f"a node in a cluster without a secret listens on loopback only (its "
                    f"peers on other hosts could not prove who they are): give the cluster "
                    f"a secret (--cluster-secret, ENGINE_CLUSTER_SECRET) or bind "
                    f"127.0.0.1 (see docs/security.md)")
        open_verbs = OPEN_VERBS if local else frozenset()
        handler = (ControlHandler(self, self.verbs, open_verbs=open_verbs, address=requested)
                   if self.cluster is None else
                   ClusterControlHandler(self, self.verbs, self.cluster, open_verbs=open_verbs,
                                         address=requested))
        try:
            ssl_context = server_context(requested, self.tls)
        except TransportError as exc:   # TlsConfigError: no certificate, a file missing...
            return exc
        server = self._control_server = RpcServer(requested, handler, ssl_context=ssl_context,
                                                  gate=SealGate(keys, what="this node"))
        try:
            self.control_address = await nursery.start(server.run)
        except TransportError as exc:  # e.g. the port is taken
            return exc
        self.control_advertised = server.listen_address or self.control_address
        try:
            where = self.token.after_bind(self.control_address)
        except TokenError as exc:
            return exc
        # Logged before "serving" (tests and scripts wait for that): by then clients
        # on this host find the token.  The token itself is never logged.
        log.log(logging.INFO if local else logging.WARNING,
                "control endpoint on %s (%s; its token: %s)", self.control_address,
                "loopback: list, info and nodes answered without the token" if local
                else "NOT loopback: every request needs the token",
                where or "from the environment")
        # Slaves inherit this: a handler can reach its own node (e.g. to schedule events).
        os.environ["ENGINE_NODE"] = self.control_address
        if ssl_context is not None and self.tls is not None:
            os.environ.update(tls_env(self.tls))    # ...over TLS, with the node's certificate
        return None

    async def _start_cluster(self, nursery: trio.Nursery, cluster: NodeCluster) -> Exception | None:
        if self.control_address is None:
            return ValueError("a clustered node needs a control endpoint (peers call it)")
        try:
            await nursery.start(cluster.run)
        except OSError as exc:  # e.g. the discovery port cannot be bound
            return exc
        return None

    async def shutdown(self) -> None:
        """Drain every app in parallel (each up to its termination-timeout), stop them,
        then stop the node. Safe to call twice; returns when everything is down."""
        if self.state == "running":
            self.state = "stopping"
            names = list(self.apps)
            log.info("shutting down: draining %d app(s)", len(names))
            async with trio.open_nursery() as nursery:
                for app in list(self.apps.values()):
                    nursery.start_soon(app.stop)
            await self._flush_control()
            if self._scope is not None:
                self._scope.cancel()
        await self._stopped.wait()

    async def _flush_control(self, limit: float = 2.0) -> None:
        """Let the answers of drained jobs reach their callers before the control
        endpoint is cancelled with the node."""
        server = self._control_server
        if server is None:
            return
        with trio.move_on_after(limit):
            await server.flush()

    # -- apps -------------------------------------------------------------------------
    async def load_apps(self, paths: Iterable[str | Path]) -> list[str]:
        """Deploy every app found under ``paths``; report and skip the bad ones."""
        manifests, missing = find_manifests(paths)
        for path, reason in missing:
            self.rejected[path] = reason
            log.error("%s: %s", path, reason)
        started = []
        for manifest in manifests:
            try:
                app = await self.deploy(manifest)
            except (ManifestError, DriverError, ShuttingDown) as exc:
                self.rejected[str(manifest)] = str(exc)
                log.error("not hosting %s", exc)
            else:
                started.append(app.name)
        return started

    async def deploy(self, manifest: AppManifest | str | Path, *, name: str | None = None,
                     replace: bool = False) -> App:
        """Parse (if given a path) and start one app; raises ManifestError or DriverError
        with nothing of the app left running.  ``replace``: an app of that name already
        running is redeployed instead (:meth:`App.redeploy`: no request lost; on
        RedeployFailed the running version serves on)."""
        if self.state != "running" or self._nursery is None:
            raise ShuttingDown(f"node is {self.state}; cannot deploy")
        if not isinstance(manifest, AppManifest):
            manifest = load_manifest(manifest, name=name)
        if replace and manifest.name in self.apps:
            app = self.apps[manifest.name]
            log.info("redeploying app %s from %s", app.name, manifest.source)
            await app.redeploy(manifest)
            return app
        if manifest.name in self.apps:
            other = self.apps[manifest.name].manifest.source
            raise ManifestError(str(manifest.source), "name",
                                f"an app name not already deployed (taken by {other})", manifest.name)
        app = self.app_factory(manifest)
        app.node = self
        self.apps[app.name] = app          # reserve the name while it starts
        try:
            await self._nursery.start(self._host, app)
        except BaseException:
            if self.apps.get(app.name) is app:
                del self.apps[app.name]
            raise
        self.rejected.pop(str(manifest.source), None)
        engine = manifest.engine
        log.info("started app %s from %s (pool-limit %d, queue-limit %d, %d driver(s)%s)",
                 app.name, manifest.source, engine.pool_limit, engine.queue_limit,
                 len(manifest.drivers),
                 "".join(f"; {d.name}: {d.type} -> {d.emit}" for d in manifest.drivers))
        return app

    async def _host(self, app: App, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Failures before started() belong to deploy()'s caller.  After it, an app stops
        # only when asked (undeploy, shutdown): it keeps its own parts (docs/architecture.md,
        # "Faults"), and should it fail as a whole all the same (a bug of its own), a
        # fresh app of the same manifest takes its place after a backoff, never taking
        # the node or other apps down.
        started = False

        class _Status:
            def started(self, value: Any = None) -> None:
                nonlocal started
                if not started:  # deploy()'s caller hears of the first start only
                    started = True
                    task_status.started(value)

        backoff = Backoff()
        try:
            while True:
                began = trio.current_time()
                try:
                    await app.run(task_status=_Status())
                except Exception as exc:
                    if not started:
                        raise
                    if app.stop_asked.is_set() or self.state != "running":
                        log.info("app %s stopped (%s: %s)", app.name, type(exc).__name__, exc)
                        return
                    delay = backoff.failed(trio.current_time() - began)
                    self.app_failures += 1
                    log.error("app %s failed; starting it again in %gs", app.name, delay,
                              exc_info=exc)
                else:
                    if not started:     # undeployed (or the node stopping) while it started
                        raise ShuttingDown(f"app {app.name} was stopped while it started")
                    log.info("app %s stopped", app.name)
                    return
                if self.apps.get(app.name) is not app:
                    return  # undeployed meanwhile
                app = self.apps[app.name] = self.app_factory(app.manifest)
                app.node = self
                with trio.move_on_after(delay):
                    await app.stop_asked.wait()
                if app.stop_asked.is_set():
                    return  # undeployed (or the node is stopping) while it waited
        finally:
            if self.apps.get(app.name) is app:
                del self.apps[app.name]

    async def undeploy(self, name: str, timeout: float | None = None) -> None:
        app = self.get(name)
        log.info("undeploying app %s", name)
        await app.stop(timeout)

    def get(self, name: str) -> App:
        app = self.apps.get(name)
        if app is None:
            raise AppNotFound(f"no app named {name!r} on this node"
                              + (f" (apps: {', '.join(sorted(self.apps))})" if self.apps else ""))
        return app

    # -- introspection ----------------------------------------------------------------
    def list(self) -> dict[str, Any]:
        return {
            "apps": {name: {"state": app.state, "manifest": str(app.manifest.source)}
                     for name, app in sorted(self.apps.items())},
            "rejected": dict(self.rejected),
        }

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "state": self.state,
            "control": self.control_address,
            "uptime": round(time.time() - self.started_at, 3),
            **self.list(),
        }


async def serve(paths: Iterable[str | Path], *, control: str | None = DEFAULT_CONTROL,
                cluster: ClusterFactory | None = None, auth: ControlAuth = ControlAuth(),
                tls: TlsConfig | None = None, metrics: str | None = None) -> int:
    """``python -m engine run``: host the apps under ``paths`` until SIGINT/SIGTERM,
    then drain and stop everything. A second signal skips the drain.  ``cluster``,
    ``auth``: as for :class:`Node` (the CLI makes them from its options and environment).
    ``metrics``: ``HOST:PORT`` of the HTTP port for Prometheus and the dashboard
    (engine/node/dashboard.py); None: none."""
    node = Node(control=control, cluster=cluster, auth=auth, tls=tls)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if metrics:
                from engine.node.dashboard import (AddressError, is_loopback, parse_address,
                                                   serve_metrics)

                # Beside the node, not inside it: cancelled with the rest below.
                try:
                    where = await nursery.start(serve_metrics, node, metrics)
                except (AddressError, OSError) as exc:   # a bad address, the port taken
                    log.error("cannot serve metrics on %s: %s", metrics, exc)
                    nursery.cancel_scope.cancel()
                    return 1
                local = is_loopback(parse_address(metrics)[0])
                log.log(logging.INFO if local else logging.WARNING,
                        "metrics and dashboard on http://%s/ (/metrics, /api/state; no "
                        "authentication%s)", where,
                        "" if local else ": NOT loopback, keep it behind an authenticating proxy")

            async def watch_signals() -> None:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        log.info("%s: draining and stopping", signal.Signals(signum).name)
                        nursery.start_soon(node.shutdown)
                    else:
                        log.warning("%s again: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()

            # Watch before loading, so a signal during a slow start is not left waiting.
            nursery.start_soon(watch_signals)
            started = await node.load_apps(paths)
            log.info("node %d serving %d app(s)%s; control on %s", os.getpid(), len(started),
                     f": {', '.join(started)}" if started else "", node.control_address)
            await node._stopped.wait()
            nursery.cancel_scope.cancel()
    log.info("node stopped")
    return 0
