"""A node's apps kept in line with the cluster's catalog.

:class:`ClusterApps` holds the node's :class:`~engine.cluster.catalog.Catalog` (saved
under the state dir by :class:`~engine.cluster.state.CatalogFile`), turns changes made
here into records (:meth:`ClusterApps.change`: the caller's grant checked first), merges
records from peers or the registry (:meth:`ClusterApps.merge`: grants checked, conflicts
logged), and *reconciles*: for every record, make this node match it, by fetching and
installing the winning content (replacing another version) or by stopping an app the
cluster undeployed.  Every name is changed under its own lock, so an operator's deploy
and a reconciliation never interleave on one app.

Apps that are not self-contained (:mod:`engine.cluster.bundle`) have no digest and no
record: they run where they were deployed and the catalog leaves them alone (a record of
the same name is shown as a divergence by ``engine nodes``).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import trio

from transport.errors import Unauthorized

from engine.cluster.bundle import MAX_BUNDLE, BundleError, make_bundle, write_bundle
from engine.cluster.catalog import (GRANT_WINDOW, AppRecord, Catalog, Grant, GrantError, Op,
                                    check_fresh, check_grant)
from engine.cluster.state import CatalogFile
from engine.manifest import AppManifest, parse_manifest

if TYPE_CHECKING:
    from engine.app import App
    from engine.node.verbs import NodeApi

log = logging.getLogger("engine.cluster")

# fetch(name, digest) -> a checked bundle of that content from some peer (LookupError: none has it)
Fetch = Callable[[str, str], Awaitable[dict[str, Any]]]


class ClusterApps:
    def __init__(self, node: NodeApi, *, node_id: str, cluster: str, secret: bytes | None,
                 max_bundle: int = MAX_BUNDLE):
        self.node = node
        self.node_id = node_id
        self.cluster = cluster
        self.secret = secret
        self.max_bundle = max_bundle
        self.catalog = Catalog()
        self.sync_failed: dict[tuple[str, str], str] = {}     # (app, digest) -> why
        self.stats = {"synced": 0, "replaced": 0, "stopped": 0, "conflicts": 0,
                      "refused_records": 0}
        self.apps_dir: Path | None = None
        self._file: CatalogFile | None = None
        self._digests: dict[str, tuple[Any, str]] = {}      # name -> (the App, digest)
        self._locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._nonces: dict[str, float] = {}                 # grant nonces taken, with their time
        self._conflicts: set[tuple[str, int, str, str]] = set()   # (name, gen, loser, winner) logged
        self._dirty = trio.Event()
        self._busy: set[str] = set()

    # -- state -------------------------------------------------------------------------
    def open(self, state_dir: Path) -> None:
        """Use ``state_dir`` (apps received are written under it; the catalog is saved
        there and read back now)."""
        self.apps_dir = state_dir / "apps"
        self.apps_dir.mkdir(parents=True, exist_ok=True)
        self._file = CatalogFile(state_dir)
        records = self._file.load()
        self.catalog.merge_all(records)
        if records:
            log.info("cluster %s: catalog of %d app(s) read from %s", self.cluster,
                     len(records), self._file.path)

    def _save(self) -> None:
        if self._file is not None:
            self._file.save(self.catalog)

    # -- digests -----------------------------------------------------------------------
    def digest(self, name: str, app: App | None = None) -> str:
        """The digest of the app running under ``name`` ("" unknown or not shareable)."""
        app = app if app is not None else self.node.apps.get(name)
        known, digest = self._digests.get(name, (None, ""))
        return digest if app is not None and known is app else ""

    async def ensure_digests(self) -> None:
        """Compute the digest of every running app not yet known (in a thread); an app
        the catalog has no record of gets a generation-0 record (it was started here
        from its operator's folder)."""
        for name, app in list(self.node.apps.items()):
            if self._digests.get(name, (None,))[0] is app or app.state != "running":
                continue
            try:
                bundle = await trio.to_thread.run_sync(
                    lambda: make_bundle(app.manifest, name, limit=self.max_bundle))
                digest = bundle["digest"]
            except (BundleError, OSError) as exc:
                log.warning("cluster %s: not sharing app %s: %s", self.cluster, name, exc)
                digest = ""
            if self.node.apps.get(name) is not app:
                continue                    # replaced meanwhile: the new one is next
            self._digests[name] = (app, digest)
            if digest and name not in self.catalog:
                self._record(AppRecord(name, 0, True, app.manifest.version, digest, self.node_id))
            elif digest:
                self._dirty.set()           # compare it with the catalog's record

    # -- records -----------------------------------------------------------------------
    def authorize(self, op: Op, name: str, grant_wire: Any) -> Grant | None:
        """The caller's grant for a cluster-wide change (None in a cluster without a
        secret); :class:`~transport.errors.Unauthorized` when missing or wrong."""
        if self.secret is None:
            return None
        if grant_wire is None:
            raise Unauthorized(
                f"a cluster-wide {op} must be signed by the caller with the cluster's secret: "
                f"pass --cluster-secret-file PATH (or ENGINE_CLUSTER_SECRET) to the CLI, or "
                f"cluster_secret= to engine.client; see docs/cluster.md")
        try:
            grant = Grant.from_wire(grant_wire)
            check_grant(self.secret, grant, op, name)
            now = time.time()
            check_fresh(grant, now)
        except GrantError as exc:
            raise Unauthorized(f"cluster-wide {op} of {name!r} refused: {exc}") from None
        for nonce, at in list(self._nonces.items()):
            if now - at > 2 * GRANT_WINDOW:
                del self._nonces[nonce]
        if grant.nonce in self._nonces:
            raise Unauthorized(f"cluster-wide {op} of {name!r} refused: the grant was used before")
        self._nonces[grant.nonce] = now
        return grant

    def change(self, name: str, *, deployed: bool, grant: Grant | None, version: int = 0,
               digest: str = "") -> AppRecord:
        """A change made on this node: the next generation for ``name``."""
        record = AppRecord(name, self.catalog.next_generation(name), deployed,
                           version if deployed else 0, digest if deployed else "",
                           self.node_id, grant)
        self._record(record)
        return record

    def _record(self, record: AppRecord) -> None:
        before = self.catalog.get(record.name)
        if self.catalog.merge(record):
            self._note_conflict(before, record)
            self._save()
            self._dirty.set()

    def merge(self, records: Sequence[AppRecord], source: str) -> list[AppRecord]:
        """Records from a peer or the registry: those whose grant checks are merged; the
        ones that won, in order (each logged)."""
        won = []
        for record in records:
            try:
                record.check(self.secret)
            except GrantError as exc:
                self.stats["refused_records"] += 1
                log.warning("cluster %s: record of %s from %s refused: %s", self.cluster,
                            record.name, source, exc)
                continue
            if record.grant is not None:      # spent cluster-wide: not again on this node
                self._nonces.setdefault(record.grant.nonce, time.time())
            before = self.catalog.get(record.name)
            if self.catalog.merge(record):
                won.append(record)
                self._note_conflict(before, record)
            elif before is not None and before != record:
                self._note_conflict(record, before)      # the loser arrived second
                log.info("cluster %s: app %s is now %s (g%d, by %s; from %s)", self.cluster,
                         record.name, record.label, record.generation, record.origin or "?", source)
        if won:
            self._save()
            self._dirty.set()
        return won

    def _note_conflict(self, before: AppRecord | None, after: AppRecord) -> None:
        """Count and log two deploys of one generation with different content, once
        per pair, whichever of the two arrived first."""
        if (before is not None and before.generation == after.generation
                and before.deployed and after.deployed and before.digest != after.digest):
            pair = (after.name, after.generation, before.digest, after.digest)
            if pair in self._conflicts:
                return
            self._conflicts.add(pair)
            self.stats["conflicts"] += 1
            log.warning("cluster %s: conflicting deploys of %s at generation %d: %s (by %s) and "
                        "%s (by %s); %s wins everywhere (higher version, then digest)",
                        self.cluster, after.name, after.generation, before.label, before.origin,
                        after.label, after.origin, after.label)

    def wanted_digest(self, name: str) -> str | None:
        """What requests for ``name`` must run on: the winning digest, ``"-"`` (matches
        no node) for an undeployed app, None when the catalog has no record."""
        record = self.catalog.get(name)
        if record is None:
            return None
        return record.digest if record.deployed else "-"

    def divergence(self) -> dict[str, str]:
        """This node's apps that differ from the catalog, and how."""
        out = {}
        for record in self.catalog.records():
            app = self.node.apps.get(record.name)
            mine = self.digest(record.name, app) if app is not None else ""
            if record.deployed and app is None:
                out[record.name] = f"missing here (cluster runs {record.label})"
            elif record.deployed and mine != record.digest:
                out[record.name] = (f"runs {mine[:12] or 'unshared content'} here, "
                                    f"cluster runs {record.label}")
            elif not record.deployed and app is not None:
                out[record.name] = "undeployed in the cluster, still running here"
        return out

    # -- installing ----------------------------------------------------------------------
    async def install(self, bundle: dict[str, Any]) -> str:
        """Write a peer's bundle, already checked (:func:`~engine.cluster.bundle.check_bundle`),
        under the state dir and run it here, replacing another version of the app (the
        catalog's record for it has been merged first)."""
        name = bundle["name"]
        async with self._locks[name]:
            return await self._install(bundle)

    async def _install(self, bundle: dict[str, Any]) -> str:
        name, digest = bundle["name"], bundle["digest"]
        record = self.catalog.get(name)
        if record is not None and not (record.deployed and record.digest == digest):
            return f"superseded: the cluster runs {record.label}"
        current = self.node.apps.get(name)
        if current is not None:
            await self.ensure_digests()
            if self.digest(name, current) == digest:
                return "already deployed"
            if not self.digest(name, current):
                raise BundleError(f"app {name} runs here from a folder that is not shared; "
                                  f"not replacing it")
        if self.apps_dir is None:
            raise BundleError("the cluster is not running: no folder to write apps to")
        base = await trio.to_thread.run_sync(write_bundle, bundle, self.apps_dir)
        manifest = parse_manifest(bundle["manifest"], source=base / "manifest.json", name=name)
        if current is not None:
            log.warning("cluster %s: replacing app %s (%s here) with %s", self.cluster, name,
                        self.digest(name, current)[:12], digest[:12])
            self.stats["replaced"] += 1
        app = await self.node.deploy(manifest, replace=True)  # a redeploy: nothing lost
        self._digests[name] = (app, digest)
        return "deployed"

    async def deploy_here(self, manifest: AppManifest, bundle: dict[str, Any] | None) -> tuple[App, str]:
        """An operator's deploy on this node (under the app's lock): run ``manifest``,
        replacing a running app of that name with other content.  The outcome is
        "deployed", "replaced" or "already deployed"."""
        name = manifest.name
        digest = bundle["digest"] if bundle else ""
        current = self.node.apps.get(name)
        if current is not None:
            await self.ensure_digests()
            if digest and self.digest(name, current) == digest:
                return current, "already deployed"
            app = await self.node.deploy(manifest, replace=True)  # a redeploy: nothing lost
            outcome = "replaced"
        else:
            app = await self.node.deploy(manifest)
            outcome = "deployed"
        self._digests[name] = (app, digest)
        return app, outcome

    def lock(self, name: str) -> trio.Lock:
        return self._locks[name]

    # -- reconciling ---------------------------------------------------------------------
    def poke(self) -> None:
        """Something changed that may let a reconciliation progress (a peer's report)."""
        self._dirty.set()

    async def reconcile_forever(self, fetch: Fetch, nursery: trio.Nursery) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            await self.ensure_digests()
            for record in self.catalog.records():
                if record.name not in self._busy and self._needs_work(record):
                    self._busy.add(record.name)
                    nursery.start_soon(self._reconcile, record.name, fetch)

    def _needs_work(self, record: AppRecord) -> bool:
        app = self.node.apps.get(record.name)
        if not record.deployed:
            return app is not None
        if (record.name, record.digest) in self.sync_failed:
            return False
        if app is None:
            return True
        mine = self.digest(record.name, app)
        return bool(mine) and mine != record.digest

    async def _reconcile(self, name: str, fetch: Fetch) -> None:
        try:
            async with self._locks[name]:
                record = self.catalog.get(name)
                if record is None or not self._needs_work(record):
                    return
                if not record.deployed:
                    log.warning("cluster %s: app %s was undeployed cluster-wide (g%d by %s): "
                                "stopping it here", self.cluster, name, record.generation,
                                record.origin or "?")
                    await self.node.undeploy(name)
                    self.stats["stopped"] += 1
                    return
                try:
                    bundle = await fetch(name, record.digest)
                except LookupError:
                    return              # nobody reachable has it yet: a later report pokes
                outcome = await self._install(bundle)      # (checked by fetch)
                if outcome == "deployed":
                    self.stats["synced"] += 1
                    log.info("cluster %s: app %s now runs %s here", self.cluster, name, record.label)
        except Exception as exc:  # one app's failure is its own, never the node's
            record = self.catalog.get(name)
            digest = record.digest if record is not None else ""
            self.sync_failed[(name, digest)] = f"{type(exc).__name__}: {exc}"
            log.error("cluster %s: could not bring app %s to %s: %s", self.cluster, name,
                      record.label if record else "?", exc)
        finally:
            self._busy.discard(name)
