"""Nodes that find each other, share their apps and balance requests by real load.

The trio shell around :mod:`engine.cluster.balance` (docs/cluster.md has the whole story):

- *discovery*: a :class:`transport.mesh.discovery.Discovery` beacon in the namespace
  ``engine-cluster:NAME`` whose endpoint is the node's control address;
- *load reports*: every ``report_interval`` each node calls ``cluster.status`` on every
  peer with its own :class:`~engine.cluster.balance.NodeReport` and gets the peer's back;
- *apps*: a peer reporting an app this node lacks (and did not undeploy) is asked for
  it (``cluster.fetch``), so a late joiner syncs; ``deploy``/``undeploy`` on one node are
  pushed to every peer at once (``cluster.deploy``/``cluster.undeploy``);
- *requests*: :meth:`Cluster.serve` runs an app request where :meth:`Cluster.route`
  says; a forwarded request travels as ``cluster.run``, which always runs locally, so a
  request is forwarded at most once.

Cluster messages are ``{"cluster", "key", "body", "sig"}``: ``sig`` is an HMAC-SHA256 of
the body under the cluster's secret (when it has one), so only holders of the secret
can push apps (code) or load figures to a node.  Every call to a peer's control
endpoint is sealed (transport/seal.py, docs/security.md): with the cluster's secret,
which its nodes accept beside their own tokens, or, in a cluster without one (on one
host: a node refuses to listen beyond loopback then), with the peer's own token, read
on this host like the CLI does.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncGenerator, Mapping, cast

import msgpack
import trio

from transport.mesh.discovery import Discovery, DiscoveryConfig
from transport.errors import BadMessage, QueueFull, RemoteError, Unreachable
from transport.mesh.peers import Beacon
from transport.rpc import RpcClient, Stream
from transport.seal import SealedClient, SealKey

from engine.client.tokens import TokenError, control_guard

from engine.cluster.balance import AppLoad, BalanceTable, NodeReport
from engine.cluster.bundle import MAX_BUNDLE, BundleError, check_bundle, make_bundle, write_bundle
from engine.node.control import answer
from engine.errors import AppBroken, AppNotFound, ShuttingDown

if TYPE_CHECKING:
    from engine.app import App
    from engine.node.node import Node

log = logging.getLogger("engine.cluster")

NAMESPACE_PREFIX = "engine-cluster:"
# Errors that mean "this node did not run the request": another node may.
NOT_RUN = (Unreachable, QueueFull, AppNotFound, ShuttingDown, AppBroken)


@dataclass(frozen=True)
class ClusterOptions:
    name: str
    key: str = ""
    secret: str | None = None
    state_dir: Path | None = None          # where apps received from peers are written
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    report_interval: float = 0.5           # seconds between load reports to each peer
    expiry: float = 3.0                    # a node silent this long is no longer routed to
    max_bundle: int = MAX_BUNDLE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("cluster name must be a non-empty string")
        if self.report_interval <= 0 or self.expiry <= self.report_interval:
            raise ValueError("need 0 < report_interval < expiry")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> "ClusterOptions | None":
        """ENGINE_CLUSTER (the name; unset: no cluster), ENGINE_CLUSTER_KEY,
        ENGINE_CLUSTER_SECRET, ENGINE_STATE_DIR, and MESH_* for discovery."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {"name": env.get("ENGINE_CLUSTER", "")}
        if env.get("ENGINE_CLUSTER_KEY"):
            kw["key"] = env["ENGINE_CLUSTER_KEY"]
        if env.get("ENGINE_CLUSTER_SECRET"):
            kw["secret"] = env["ENGINE_CLUSTER_SECRET"]
        if env.get("ENGINE_STATE_DIR"):
            kw["state_dir"] = Path(env["ENGINE_STATE_DIR"])
        kw["discovery"] = DiscoveryConfig.from_env(env)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw) if kw["name"] else None


class Cluster:
    def __init__(self, node: "Node", options: ClusterOptions):
        self.node = node
        self.options = options
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.table = BalanceTable(expiry=options.expiry)
        self.tombstones: set[str] = set()       # apps undeployed here: never pulled back
        self.sync_failed: dict[tuple[str, str], str] = {}   # (app, digest) -> why
        self.stats = {"forwarded": 0, "served_for_peers": 0, "fallbacks": 0, "synced": 0}
        self._secret = options.secret.encode() if options.secret else None
        self._clients: dict[str, RpcClient] = {}
        self._exchanging: set[str] = set()
        self._syncing: set[str] = set()
        self._digests: dict[str, tuple[Any, str]] = {}      # name -> (the App, digest)
        self._done: dict[str, tuple[float, int, float]] = {}  # app -> (time, done, jobs/s)
        self._seq = 0
        self._cpu = 0.0
        self._nursery: trio.Nursery | None = None
        # Where apps received from peers are written: a temporary folder made (and
        # removed) by run() when the options name none.
        self._own_state_dir = options.state_dir is None
        self.state_dir: Path | None = options.state_dir
        self.discovery: Discovery | None = None

    # -- lifetime -----------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        me = Beacon(id=self.id, name=self.id, role="responder",
                    namespace=NAMESPACE_PREFIX + self.options.name, key=self.options.key,
                    endpoint=self.node.control_address or "", host=socket.gethostname(),
                    pid=os.getpid())
        discovery = self.discovery = Discovery(me, self.options.discovery, secret=self._secret)
        state_dir = self.state_dir = (self.options.state_dir
                                      or Path(tempfile.mkdtemp(prefix="engine-cluster-")))
        (state_dir / "apps").mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(discovery.run)
                nursery.start_soon(self._watch_peers, discovery, nursery)
                nursery.start_soon(self._report_loop, nursery)
                log.info("cluster %s: node %s announcing %s", self.options.name, self.id,
                         self.node.control_address)
                task_status.started(self)
        finally:
            if self._own_state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)

    async def _watch_peers(self, discovery: Discovery, nursery: trio.Nursery) -> None:
        """Keep one control client per discovered peer (level-triggered)."""
        seen = -1
        while True:
            seen = await discovery.wait_change(seen)
            current = {b.id: b.endpoint for b in discovery.peers() if b.endpoint}
            for pid in list(self._clients):
                if current.get(pid) != self._clients[pid].address:
                    self._drop_peer(pid, "left the cluster")
            for pid, endpoint in current.items():
                if pid not in self._clients:
                    # A hub of many links: never hold the node's loop polling for one.
                    client = self._clients[pid] = RpcClient(endpoint, spin=False,
                                                            guard=self._peer_guard(endpoint))
                    nursery.start_soon(client.run)
                    nursery.start_soon(self._first_exchange, pid, client)
                    log.info("cluster %s: peer %s at %s", self.options.name, pid, endpoint)

    @property
    def secret(self) -> bytes | None:
        """The cluster's secret (None: it has none)."""
        return self._secret

    def _peer_guard(self, endpoint: str) -> SealedClient | None:
        """How this node proves itself to a peer's control endpoint: by the cluster's
        secret; without one, by the peer's own token, read on this host; None (plain
        frames: the peer answers them ``Unauthorized``, seen in ``sync_failed`` and the
        peers' outcomes) when neither is to be had."""
        if self._secret is not None:
            return SealedClient(SealKey.from_secret(self._secret, b"cluster"))
        try:
            return control_guard(endpoint)
        except TokenError as exc:
            log.warning("cluster %s: no token for the peer at %s: %s", self.options.name,
                        endpoint, exc)
            return None

    def _drop_peer(self, pid: str, why: str) -> None:
        client = self._clients.pop(pid, None)
        if client is not None:
            client.close()
            log.info("cluster %s: peer %s %s", self.options.name, pid, why)
        self.table.forget(pid)

    async def _first_exchange(self, pid: str, client: RpcClient) -> None:
        with trio.move_on_after(self.options.expiry):
            await client.wait_connected()
            await self._exchange(pid)

    async def _report_loop(self, nursery: trio.Nursery) -> None:
        import psutil

        psutil.cpu_percent(None)             # the first call only starts the measure
        while True:
            await trio.sleep(self.options.report_interval)
            self._cpu = min(1.0, max(0.0, psutil.cpu_percent(None) / 100.0))
            self._update_rates()
            self.table.expire(trio.current_time(), keep=self.id)
            for pid, client in list(self._clients.items()):
                if client.connected and pid not in self._exchanging:
                    nursery.start_soon(self._exchange, pid)

    # -- load reports ----------------------------------------------------------------------
    def _update_rates(self) -> None:
        now = trio.current_time()
        for name, app in self.node.apps.items():
            done = app.pool.done
            then, before, _ = self._done.get(name, (now, done, 0.0))
            rate = (done - before) / (now - then) if now > then else 0.0
            self._done[name] = (now, done, round(rate, 2))
        for name in [n for n in self._done if n not in self.node.apps]:
            del self._done[name]

    def app_load(self, app: App) -> AppLoad:
        """The app's load now, for this node's report, from its pool's
        :meth:`~engine.pool.base.Pool.load` (either backend)."""
        engine = app.manifest.engine
        capacity = max(1, engine.pool_limit * engine.concurrency)
        known, digest = self._digests.get(app.name, (None, ""))
        if known is not app:
            digest = ""   # the digest of an earlier app of that name
        rate = self._done.get(app.name, (0, 0, 0.0))[2]
        if app.state != "running":
            return AppLoad(state=app.state, capacity=capacity, digest=digest)
        load = app.pool.load()
        return AppLoad(state=load.state, queue=load.queue, running=load.running,
                       slaves=load.slaves, capacity=capacity, jobs_per_s=rate, digest=digest)

    def local_report(self) -> NodeReport:
        self._seq += 1
        apps = {name: self.app_load(app) for name, app in self.node.apps.items()}
        report = NodeReport(self.id, self.node.control_address or "", apps, self._cpu, self._seq)
        self.table.update(report, trio.current_time())
        return report

    async def _exchange(self, pid: str) -> None:
        client = self._clients.get(pid)
        if client is None:
            return
        self._exchanging.add(pid)
        try:
            await self._ensure_digests()
            reply = await client.call("", "cluster.status", self.seal(self.local_report().to_wire()),
                                      timeout=self.options.expiry)
            self.heard(NodeReport.from_wire(self.open(reply)))
        except Unreachable:
            self.table.forget(pid)          # it died: stop routing there now, not at expiry
        except (RemoteError, ValueError) as exc:
            log.warning("cluster %s: status exchange with %s failed: %s", self.options.name, pid, exc)
        finally:
            self._exchanging.discard(pid)

    def heard(self, report: NodeReport) -> None:
        """A peer's report (from our exchange or from its): route by it, sync its apps."""
        if report.id == self.id:
            return
        self.table.update(report, trio.current_time())
        nursery = self._nursery
        if report.id not in self._clients or nursery is None:
            return                          # not discovered (yet): nothing to fetch through
        for name, load in report.apps.items():
            if (load.serving and load.digest and name not in self.node.apps
                    and name not in self.tombstones and name not in self._syncing
                    and (name, load.digest) not in self.sync_failed):
                self._syncing.add(name)
                nursery.start_soon(self._pull, report.id, name, load.digest)

    async def _ensure_digests(self) -> None:
        for name, app in list(self.node.apps.items()):
            if self._digests.get(name, (None,))[0] is not app and app.state == "running":
                try:
                    bundle = await trio.to_thread.run_sync(
                        lambda: make_bundle(app.manifest, name, limit=self.options.max_bundle))
                    digest = bundle["digest"]
                except (BundleError, OSError) as exc:
                    log.warning("cluster %s: not sharing app %s: %s", self.options.name, name, exc)
                    digest = ""
                self._digests[name] = (app, digest)

    # -- apps ---------------------------------------------------------------------------------
    async def _pull(self, pid: str, name: str, digest: str) -> None:
        try:
            client = self._clients.get(pid)
            if client is None:
                return
            reply = await client.call("", "cluster.fetch", self.seal({"app": name}), timeout=60)
            await self.install(self.open(reply))
            self.stats["synced"] += 1
            log.info("cluster %s: synced app %s from %s", self.options.name, name, pid)
        except Exception as exc:
            self.sync_failed[(name, digest)] = f"{type(exc).__name__}: {exc}"
            log.error("cluster %s: could not sync app %s from %s: %s", self.options.name, name, pid, exc)
        finally:
            self._syncing.discard(name)

    async def install(self, bundle: Any) -> str:
        """Write a peer's bundle under the state dir and deploy it here."""
        bundle = check_bundle(bundle, limit=self.options.max_bundle)
        name = bundle["name"]
        current = self.node.apps.get(name)
        if current is not None:
            await self._ensure_digests()
            if self._digests.get(name, (None, ""))[1] == bundle["digest"]:
                return "already deployed"
            raise BundleError(f"app {name} is already deployed here with other content")
        if self.state_dir is None:
            raise BundleError("the cluster is not running: no folder to write apps to")
        base = await trio.to_thread.run_sync(write_bundle, bundle, self.state_dir / "apps")
        if name in self.tombstones:
            return "undeployed meanwhile"
        app = await self.node.deploy_data(bundle["manifest"], base, name=name)
        self._digests[name] = (app, bundle["digest"])
        return "deployed"

    async def share(self, name: str) -> dict[str, str]:
        """Push a locally deployed app to every peer; their outcome by peer id."""
        app = self.node.get(name)
        self.tombstones.discard(name)
        try:
            bundle = await trio.to_thread.run_sync(
                lambda: make_bundle(app.manifest, name, limit=self.options.max_bundle))
        except (BundleError, OSError) as exc:
            return {pid: f"not shared: {exc}" for pid in self._clients}
        self._digests[name] = (app, bundle["digest"])
        return await self._to_peers("cluster.deploy", self.seal(bundle), timeout=60)

    async def unshare(self, name: str, drain: float | None) -> dict[str, str]:
        self.tombstones.add(name)
        return await self._to_peers("cluster.undeploy", self.seal({"app": name, "drain": drain}),
                                    timeout=(drain or 30) + 30)

    async def _to_peers(self, verb: str, args: Any, timeout: float) -> dict[str, str]:
        outcomes: dict[str, str] = {}

        async def one(pid: str, client: RpcClient) -> None:
            try:
                outcomes[pid] = str(await client.call("", verb, args, timeout=timeout))
            except Exception as exc:  # one peer's failure is its outcome, not the verb's
                what = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
                outcomes[pid] = f"error: {what}"

        async with trio.open_nursery() as nursery:
            for pid, client in list(self._clients.items()):
                if client.connected:
                    nursery.start_soon(one, pid, client)
                else:   # discovered but not (yet) dialled: it syncs from the reports
                    outcomes[pid] = "error: not connected"
        return outcomes

    # -- requests -----------------------------------------------------------------------------
    def route(self, app: str, event: str = "", payload: Any = None, *,
              exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
        """The node id to run this request on (ours or a connected peer's), or None."""
        now = trio.current_time()
        local = self.node.apps.get(app)
        if local is not None:
            self.table.set_app_load(self.id, app, self.app_load(local), now)
        else:
            self.table.set_app_load(self.id, app, None, now)
        down = {pid for pid in self.table.ids() if pid != self.id
                and not (pid in self._clients and self._clients[pid].connected)}
        return self.table.pick(app, self.id, now, exclude=down | set(exclude))

    @property
    def has_peers(self) -> bool:
        """Whether requests may go elsewhere (a peer was discovered); without one,
        :meth:`serve` only ever runs them here."""
        return bool(self._clients)

    async def serve(self, app: str, event: str, payload: Any) -> Any:
        """Run an app request here or on the peer :meth:`route` picks; a node that did
        not run it (unreachable, queue full, app missing) hands it to the next one."""
        if not self._clients:
            return await self.run_local(app, event, payload)
        tried: dict[str, RemoteError] = {}
        while (target := self.route(app, event, payload, exclude=set(tried))) is not None:
            try:
                if target == self.id:
                    return await self.run_local(app, event, payload)
                return await self.forward(target, app, event, payload)
            except NOT_RUN as exc:
                tried[target] = exc
                self.stats["fallbacks"] += 1
                if isinstance(exc, Unreachable):
                    self.table.forget(target)
        if self.id not in tried:
            return await self.run_local(app, event, payload)   # its own clear error
        last = list(tried.values())[-1]
        detail = "; ".join(f"{nid}: {exc}" for nid, exc in tried.items())
        raise type(last)(f"no node of cluster {self.options.name} could run {app}/{event} ({detail})")

    async def run_local(self, app: str, event: str, payload: Any) -> Any:
        job = self.node.get(app).submit(event, payload)
        return await answer(job)

    async def forward(self, pid: str, app: str, event: str, payload: Any) -> Any:
        client = self._clients[pid]
        self.table.note_sent(pid, app)
        self.stats["forwarded"] += 1
        replies = client.stream("", "cluster.run", {"app": app, "event": event, "payload": payload})
        chunks = cast(AsyncGenerator[Any, None], replies.__aiter__())   # (it is one: aclose)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            self.table.note_done(pid, app)
            return Stream(_nothing())
        except BaseException:
            self.table.note_done(pid, app)
            await chunks.aclose()
            raise
        # RESULT or CHUNK: the reply stream knows once the first reply arrived.
        if not replies.streamed:
            self.table.note_done(pid, app)
            await chunks.aclose()
            return first
        return Stream(self._relay(pid, app, first, chunks))

    async def _relay(self, pid: str, app: str, first: Any, chunks: Any):
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            self.table.note_done(pid, app)
            await chunks.aclose()

    # -- messages ------------------------------------------------------------------------------
    def seal(self, body: Any) -> dict[str, Any]:
        msg = {"cluster": self.options.name, "key": self.options.key, "body": body}
        if self._secret is not None:
            msg["sig"] = hmac.new(self._secret, msgpack.packb(body, use_bin_type=True),
                                  hashlib.sha256).digest()
        return msg

    def open(self, msg: Any) -> Any:
        if not isinstance(msg, dict) or msg.get("cluster") != self.options.name \
                or msg.get("key", "") != self.options.key:
            raise BadMessage(f"not a message of cluster {self.options.name!r}")
        body = msg.get("body")
        if self._secret is not None:
            sig = msg.get("sig")
            good = hmac.new(self._secret, msgpack.packb(body, use_bin_type=True),
                            hashlib.sha256).digest()
            if not isinstance(sig, bytes) or not hmac.compare_digest(sig, good):
                raise BadMessage(f"cluster {self.options.name}: bad or missing signature")
        return body

    def describe(self) -> dict[str, Any]:
        """What ``python -m engine nodes`` shows."""
        now = trio.current_time()
        self.local_report()
        nodes = []
        for report, age in self.table.nodes(now, self.id):
            client = self._clients.get(report.id)
            nodes.append({"id": report.id, "control": report.control, "self": report.id == self.id,
                          "connected": report.id == self.id or bool(client and client.connected),
                          "age": round(age, 3), "cpu": round(report.cpu, 3),
                          "apps": {n: load.to_wire() for n, load in sorted(report.apps.items())}})
        return {"cluster": self.options.name, "self": self.id, "nodes": nodes,
                "stats": dict(self.stats), "tombstones": sorted(self.tombstones),
                "sync_failed": {f"{a}@{d[:12]}": why for (a, d), why in self.sync_failed.items()}}


async def _nothing():
    return
    yield  # pragma: no cover

