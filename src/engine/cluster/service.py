"""Nodes that find each other, share their apps and balance requests by real load.

The trio shell around the pure parts (docs/cluster.md has the whole story):

- *membership*: a :class:`~engine.cluster.registry.Registry`, UDP beacons on a LAN
  (:class:`~engine.cluster.lan.LanRegistry`, the default) or etcd (``--cluster-registry
  etcd://HOST:PORT``); this node keeps a control client per peer it talks to (every peer
  on a LAN, a stable sample of them with etcd);
- *load reports*: every ``report_interval`` the node calls ``cluster.status`` on each of
  those peers with its own :class:`~engine.cluster.balance.NodeReport` and the
  fingerprint of its catalog, and gets theirs back; catalogs that differ are exchanged
  (``cluster.catalog``) and merged;
- *apps*: :class:`~engine.cluster.apps.ClusterApps` keeps the node's apps in line with the
  catalog (fetching the winning content, ``cluster.fetch``, or stopping what the cluster
  undeployed); changes made here are pushed to the connected peers at once
  (``cluster.deploy``/``cluster.undeploy``) and published to the registry;
- *requests*: :class:`~engine.cluster.forwarding.Forwarding`.

Nothing a peer does may stop this node: every task that talks to a peer turns that
peer's failure into a log line and a dropped or retried link.

Cluster messages are ``{"cluster", "key", "body", "sig"}``: ``sig`` is an HMAC-SHA256 of
the body under the cluster's secret, and every call to a peer's control endpoint is
sealed (transport/seal.py) with a key derived from that secret, which its nodes accept
beside their own tokens: authenticated and replay-protected.  A cluster without a
secret exists only when its operator said ``--insecure`` (then calls are sealed with
the peer's own token, read on this host: one host only).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import msgpack
import trio

from transport.errors import BadMessage, RemoteError, TransportError, Unreachable
from transport.rpc import RpcClient
from transport.seal import SealedClient, SealKey

from engine.client.tls import client_context
from engine.client.tokens import TokenError, control_guard

from engine.cluster.apps import ClusterApps
from engine.cluster.balance import AppLoad, BalanceTable, NodeReport
from engine.cluster.bundle import BundleError, check_bundle
from engine.cluster.catalog import AppRecord, Catalog
from engine.cluster.forwarding import Forwarding
from engine.cluster.lan import LanRegistry
from engine.cluster.options import ClusterOptions
from engine.cluster.registry import Member, Registry
from engine.cluster.view import cluster_view
from engine.faults import leaves

if TYPE_CHECKING:
    from engine.app import App
    from engine.node.node import Node

log = logging.getLogger("engine.cluster")


class Cluster:
    def __init__(self, node: "Node", options: ClusterOptions):
        self.node = node
        self.options = options
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.table = BalanceTable(expiry=options.expiry)
        self.stats = {"forwarded": 0, "served_for_peers": 0, "fallbacks": 0,
                      "exchanges": 0, "exchange_failures": 0, "messages_out": 0,
                      "messages_in": 0, "catalog_exchanges": 0}
        self._secret = options.secret.encode() if options.secret else None
        self.apps = ClusterApps(node, node_id=self.id, cluster=options.name,
                                secret=self._secret, max_bundle=options.max_bundle)
        self._unusable: set[str] = set()          # peers this node cannot dial (logged once)
        self.forwarding = Forwarding(self, suspect_after=3 * options.report_interval,
                                     tick=options.report_interval / 2)
        self.registry: Registry | None = None
        self._clients: dict[str, RpcClient] = {}
        self._exchanging: set[str] = set()
        self._done: dict[str, tuple[float, int, float]] = {}  # app -> (time, done, jobs/s)
        self._seq = 0
        self._cpu = 0.0
        # A temporary state dir is made (and removed) by run() when the options name none.
        self._own_state_dir = options.state_dir is None
        self.state_dir: Path | None = options.state_dir

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def secret(self) -> bytes | None:
        """The cluster's secret (None: an ``--insecure`` cluster)."""
        return self._secret

    # -- lifetime -----------------------------------------------------------------------
    def _make_registry(self) -> Registry:
        member = Member(self.id, self.node.control_advertised or "", self.options.name,
                        self.options.key)
        if self.options.registry is None:
            return LanRegistry(member, self.options.discovery, secret=self._secret)
        from engine.cluster.etcd_registry import EtcdRegistry   # only nodes that use etcd
        return EtcdRegistry(self.options.registry, member, self._records_from_registry,
                            secret=self._secret, ttl=self.options.expiry)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        if self._secret is None:
            log.warning("cluster %s runs WITHOUT a secret (--insecure): its nodes trust each "
                        "other by the tokens on this host only; never use it beyond one host",
                        self.options.name)
        state_dir = self.state_dir = (self.options.state_dir
                                      or Path(tempfile.mkdtemp(prefix="engine-cluster-")))
        try:
            self.apps.open(state_dir)
            registry = self.registry = self._make_registry()
            async with trio.open_nursery() as nursery:
                await nursery.start(registry.run)
                nursery.start_soon(self.forwarding.run)
                nursery.start_soon(self._watch_peers, registry, nursery)
                nursery.start_soon(self._report_loop, nursery)
                nursery.start_soon(self.apps.reconcile_forever, self.fetch, nursery)
                self.apps.poke()
                log.info("cluster %s: node %s announcing %s (%s registry)", self.options.name,
                         self.id, self.node.control_address, registry.kind)
                task_status.started(self)
        finally:
            if self._own_state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)

    def _records_from_registry(self, records: Any) -> None:
        self.apps.merge(list(records), source="the registry")

    def _linked(self, peers: Mapping[str, str]) -> dict[str, str]:
        """The peers to keep a link to: all of them on a LAN; with a registry that
        carries membership and the catalog, a stable sample (rendezvous hashing, so
        the nodes' samples spread over the cluster and change little as it grows)."""
        if self.registry is None or not self.registry.samples_load:
            return dict(peers)

        def weight(pid: str) -> bytes:
            return hashlib.blake2b(f"{self.id}|{pid}".encode(), digest_size=8).digest()

        chosen = sorted(peers, key=weight)[: self.options.sample]
        return {pid: peers[pid] for pid in chosen}

    async def _watch_peers(self, registry: Registry, nursery: trio.Nursery) -> None:
        """Keep one control client per linked peer (level-triggered)."""
        seen = -1
        while True:
            seen = await registry.wait_change(seen)
            current = self._linked(registry.peers())
            for pid in list(self._clients):
                if current.get(pid) != self._clients[pid].address:
                    self._drop_peer(pid, "left the cluster" if pid not in registry.peers()
                                    else "is no longer in this node's sample")
            for pid, endpoint in current.items():
                if pid not in self._clients and pid not in self._unusable:
                    try:
                        client = self._clients[pid] = self._client(endpoint)
                    except TransportError as exc:    # tls+tcp:// and no certificate here
                        self._unusable.add(pid)
                        log.warning("cluster %s: cannot link to peer %s at %s: %s",
                                    self.options.name, pid, endpoint, exc)
                        continue
                    nursery.start_soon(self._guarded, client.run, f"link to {pid}")
                    nursery.start_soon(self._first_exchange, pid, client)
                    log.info("cluster %s: peer %s at %s", self.options.name, pid, endpoint)

    def _client(self, endpoint: str) -> RpcClient:
        # A hub of many links: never hold the node's loop polling for one.  A peer on
        # tls+tcp:// is dialled with this node's certificate (TlsConfigError without one).
        return RpcClient(endpoint, spin=False, guard=self._peer_guard(endpoint),
                         ssl_context=client_context(endpoint, self.node.tls))

    async def _guarded(self, fn: Any, what: str) -> None:
        """Run one peer's task: its failure is logged, never the node's."""
        try:
            await fn()
        except Exception as exc:
            log.warning("cluster %s: %s failed: %s: %s", self.options.name, what,
                        type(exc).__name__, exc)

    def _peer_guard(self, endpoint: str) -> SealedClient | None:
        """How this node proves itself to a peer's control endpoint: by the cluster's
        secret; in an ``--insecure`` cluster, by the peer's own token, read on this host;
        None when neither is to be had (the peer answers ``Unauthorized``)."""
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
        self.forwarding.lost(pid, why)

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
        digest = self.apps.digest(app.name, app)
        rate = self._done.get(app.name, (0, 0, 0.0))[2]
        if app.state != "running":
            return AppLoad(state=app.state, capacity=capacity, digest=digest)
        load = app.pool.load()
        return AppLoad(state=load.state, queue=load.queue, running=load.running,
                       slaves=load.slaves, capacity=capacity, jobs_per_s=rate, digest=digest)

    def local_report(self) -> NodeReport:
        self._seq += 1
        apps = {name: self.app_load(app) for name, app in self.node.apps.items()}
        report = NodeReport(self.id, self.node.control_advertised or "", apps, self._cpu, self._seq)
        self.table.update(report, trio.current_time())
        return report

    def status_body(self) -> dict[str, Any]:
        """What this node says in a status exchange: its report and catalog fingerprint."""
        return {**self.local_report().to_wire(), "catalog": self.apps.catalog.fingerprint()}

    async def _call(self, client: RpcClient, verb: str, args: Any, timeout: float) -> Any:
        self.stats["messages_out"] += 1
        reply = await client.call("", verb, args, timeout=timeout)
        self.stats["messages_in"] += 1
        return reply

    async def _exchange(self, pid: str) -> None:
        client = self._clients.get(pid)
        if client is None:
            return
        self._exchanging.add(pid)
        try:
            await self.apps.ensure_digests()
            reply = self.open(await self._call(client, "cluster.status",
                                               self.seal(self.status_body()),
                                               timeout=self.options.expiry))
            self.stats["exchanges"] += 1
            self.heard(NodeReport.from_wire(reply))
            if isinstance(reply, dict) and reply.get("catalog") != self.apps.catalog.fingerprint():
                await self._exchange_catalog(pid, client)
        except Unreachable:
            self.stats["exchange_failures"] += 1
            self.table.forget(pid)          # it died: stop routing there now, not at expiry
            self.forwarding.lost(pid, "unreachable")
        except trio.TooSlowError:
            self.stats["exchange_failures"] += 1
            self.forwarding.lost(pid, f"no status answer within {self.options.expiry:g} s")
        except (TransportError, ValueError) as exc:
            # RemoteError, Closed (the peer left while we were busy), BadMessage...: that
            # peer's failure, never this node's.
            self.stats["exchange_failures"] += 1
            log.warning("cluster %s: status exchange with %s failed: %s: %s",
                        self.options.name, pid, type(exc).__name__, exc)
        finally:
            self._exchanging.discard(pid)

    async def _exchange_catalog(self, pid: str, client: RpcClient) -> None:
        self.stats["catalog_exchanges"] += 1
        reply = self.open(await self._call(client, "cluster.catalog",
                                           self.seal({"records": self.apps.catalog.to_wire()}),
                                           timeout=self.options.expiry))
        self.catalog_heard(reply, pid)

    def catalog_heard(self, body: Any, source: str) -> None:
        records = body.get("records") if isinstance(body, dict) else None
        try:
            self.apps.merge(Catalog.records_from_wire(records, where=f"catalog from {source}"),
                            source=source)
        except ValueError as exc:
            raise BadMessage(f"cluster.catalog: {exc}") from None

    def heard(self, report: NodeReport) -> None:
        """A peer's report (from our exchange or from its): route by it, and let the
        apps reconcile when it holds content the catalog wants and this node lacks."""
        if report.id == self.id:
            return
        now = trio.current_time()
        self.table.update(report, now)
        self.forwarding.heard_from(report.id, now)
        for name, load in report.apps.items():
            if load.digest and self.apps.wanted_digest(name) == load.digest \
                    and self.apps.digest(name) != load.digest:
                self.apps.poke()
                break

    # -- apps ---------------------------------------------------------------------------------
    async def fetch(self, name: str, digest: str) -> dict[str, Any]:
        """The bundle of ``name`` at ``digest`` from a peer that runs it (by its last
        report; else the node that made the record, dialled for this); LookupError when
        no reachable peer has it."""
        now = trio.current_time()
        holders = [r.id for r, _ in self.table.nodes(now, self.id) if r.id != self.id
                   and (load := r.apps.get(name)) is not None and load.digest == digest]
        record = self.apps.catalog.get(name)
        registry_peers = self.registry.peers() if self.registry is not None else {}
        if record is not None and record.origin in registry_peers and record.origin not in holders:
            holders.append(record.origin)
        errors: list[str] = []
        for pid in holders:
            client = self._clients.get(pid)
            if client is None and pid not in registry_peers:
                continue
            try:
                bundle = await self._fetch_from(client, registry_peers.get(pid, ""), name, digest)
                bundle = check_bundle(bundle, limit=self.options.max_bundle)
                if bundle["digest"] != digest:
                    raise BundleError(f"{pid} sent {name} at {bundle['digest'][:12]}, "
                                      f"not {digest[:12]}")
                return bundle
            except* (TransportError, BundleError, trio.TooSlowError, ValueError) as group:
                errors.extend(f"{pid}: {type(exc).__name__}: {exc}" for exc in leaves(group))
        if errors:
            log.warning("cluster %s: could not fetch %s@%s: %s", self.options.name, name,
                        digest[:12], "; ".join(errors))
        raise LookupError(f"no reachable peer has {name}@{digest[:12]}")

    async def _fetch_from(self, client: RpcClient | None, endpoint: str, name: str,
                          digest: str) -> Any:
        """``cluster.fetch`` on a linked peer's client, or on a client made for this one
        call (a peer beyond this node's sample, with etcd)."""
        args = self.seal({"app": name, "digest": digest})
        if client is not None:
            return self.open(await self._call(client, "cluster.fetch", args, timeout=60))
        async with self._client(endpoint) as temporary:
            with trio.move_on_after(self.options.expiry):
                await temporary.wait_connected()
            return self.open(await self._call(temporary, "cluster.fetch", args, timeout=60))

    async def publish(self, record: AppRecord) -> None:
        if self.registry is not None:
            try:
                await self.registry.publish(record)
            except Exception as exc:   # the peers still hear it through the reports
                log.error("cluster %s: could not publish %s %s to the registry: %s",
                          self.options.name, record.name, record.label, exc)

    async def to_peers(self, verb: str, args: Any, timeout: float) -> dict[str, str]:
        """Call every linked peer; each peer's outcome by id (its failure is its outcome)."""
        outcomes: dict[str, str] = {}

        async def one(pid: str, client: RpcClient) -> None:
            try:
                outcomes[pid] = str(await self._call(client, verb, args, timeout=timeout))
            except Exception as exc:
                what = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"
                outcomes[pid] = f"error: {what}"

        async with trio.open_nursery() as nursery:
            for pid, client in list(self._clients.items()):
                if client.connected:
                    nursery.start_soon(one, pid, client)
                else:   # discovered but not (yet) dialled: it converges from the reports
                    outcomes[pid] = "not connected: converges when it is"
        return outcomes

    # -- requests -----------------------------------------------------------------------------
    @property
    def has_peers(self) -> bool:
        """Whether requests may go elsewhere (a peer is linked); without one,
        :meth:`serve` only ever runs them here."""
        return bool(self._clients)

    async def serve(self, app: str, event: str, payload: Any) -> Any:
        return await self.forwarding.serve(app, event, payload)

    def links(self) -> Mapping[str, RpcClient]:
        return self._clients

    def local_app(self, app: str) -> App | None:
        return self.node.apps.get(app)

    def wanted_digest(self, app: str) -> str | None:
        return self.apps.wanted_digest(app)

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
        """What ``python -m engine nodes`` shows (:mod:`engine.cluster.view`)."""
        return cluster_view(self)
