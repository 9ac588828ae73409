"""The etcd registry: membership by leased keys, the catalog as keys every node watches.

Layout under ``/engine/<cluster>/``:

- ``members/<node-id>``: this node (``{id, control, key}``), put with a lease of ``ttl``
  seconds that :meth:`EtcdRegistry.run` renews every ``ttl / 3``: a node that dies stops
  renewing and its key goes within ``ttl``; a node that stops revokes its lease, so its
  key goes at once and the peers drop it without waiting;
- ``apps/<app-name>``: the winning :class:`~engine.cluster.catalog.AppRecord` of that app.
  :meth:`EtcdRegistry.publish` writes it with a compare-and-swap (read, compare by
  :meth:`AppRecord.beats`, write only if the key is unchanged since the read, else read
  again), so the key only ever moves to a greater record: every node watching it sees the
  same winner whatever the order the changes were made in.

Each value is msgpack ``{"body": <msgpack bytes>, "sig": <hmac or None>}``.  With the
cluster's secret, ``sig`` is an HMAC-SHA256 over the key and the body: someone with write
access to etcd but not the secret cannot add a node (peers would dial it, seal their
calls to it and forward requests to it), and an unsigned or forged value is ignored and
counted (``forged`` in :meth:`describe`).  Records carry their caller's grant besides,
which the service checks (:meth:`AppRecord.check`).  A signed member entry copied back
after its node left would still be believed until deleted: the secret keeps strangers
out, the etcd's own access control keeps its data honest.

The registry follows etcd with one watch on the whole prefix from the revision of its
last full read; when the watch drops (etcd restarted, network), it reads everything again
after a backoff and watches on, listing the outage in :meth:`problems` meanwhile; a lease
that expired during the outage is granted again and the member key put again.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
from contextlib import aclosing
from typing import Any, Mapping

import msgpack
import trio

from engine.cluster.catalog import AppRecord
from engine.cluster.etcd import EtcdClient, EtcdError, KeyValue
from engine.cluster.registry import Member, RecordSink, RegistryError
from engine.faults import Backoff

log = logging.getLogger(__name__)

ROOT = "/engine/"
_SIG_CONTEXT = b"engine-etcd-registry\x00"
PUBLISH_ATTEMPTS = 32           # lost races in a row before publish gives up (and says so)
LEAVE_TIMEOUT = 2.0             # seconds a stopping node spends taking its key away


def _mac(secret: bytes, key: str, body: bytes) -> bytes:
    # The key is signed too: a member's signed entry cannot be put under another id.
    return hmac.new(secret, _SIG_CONTEXT + key.encode() + b"\x00" + body, hashlib.sha256).digest()


def sign_value(secret: bytes | None, key: str, body: bytes) -> bytes:
    """The stored form of ``body`` at ``key``: signed with the cluster's secret if any."""
    sig = _mac(secret, key, body) if secret is not None else None
    return bytes(msgpack.packb({"body": body, "sig": sig}, use_bin_type=True))


def open_value(secret: bytes | None, key: str, value: bytes) -> Any:
    """The unpacked body stored at ``key``; ValueError if malformed, PermissionError if
    a secret is set and the value is unsigned or signed with another secret."""
    try:
        outer = msgpack.unpackb(value, raw=False)
    except Exception as exc:    # msgpack raises several unrelated types
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), bytes):
        raise ValueError("expected {body, sig}")
    body: bytes = outer["body"]
    if secret is not None:
        sig = outer.get("sig")
        if not isinstance(sig, bytes) or not hmac.compare_digest(_mac(secret, key, body), sig):
            raise PermissionError("unsigned, or not signed with this cluster's secret")
    try:
        return msgpack.unpackb(body, raw=False)
    except Exception as exc:
        raise ValueError(f"body is not msgpack: {exc}") from None


class EtcdRegistry:
    """A :class:`~engine.cluster.registry.Registry` on one etcd endpoint (module docstring)."""

    kind = "etcd"
    samples_load = True

    def __init__(self, address: str, member: Member, on_records: RecordSink, *,
                 secret: bytes | None, ttl: float):
        try:
            self.client = EtcdClient(address)
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
        self.member = member
        self.on_records = on_records
        self.secret = secret
        self.ttl = max(2, math.ceil(ttl))           # etcd leases are whole seconds
        self.prefix = f"{ROOT}{member.cluster}/"
        self.members_prefix = self.prefix + "members/"
        self.apps_prefix = self.prefix + "apps/"
        self.member_key = self.members_prefix + member.id
        self.lease = 0
        self.revision = 0
        self._peers: dict[str, str] = {}
        self._problems: dict[str, str] = {}
        self.version = 0
        self._changed = trio.Event()
        self.stats = {"forged": 0, "bad": 0, "reconnects": 0, "regrants": 0, "published": 0,
                      "publish_races": 0}

    # -- what the service reads ----------------------------------------------------------
    def peers(self) -> Mapping[str, str]:
        return dict(self._peers)

    async def wait_change(self, seen: int) -> int:
        while self.version == seen:
            await self._changed.wait()
        return self.version

    def problems(self) -> list[str]:
        return list(self._problems.values())

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.client.address, "prefix": self.prefix,
                "lease": f"{self.lease:x}", "ttl": self.ttl, "revision": self.revision,
                "members": len(self._peers) + 1, **self.stats}

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def _problem(self, what: str, message: str | None) -> None:
        if message is None:
            if self._problems.pop(what, None) is not None:
                log.info("cluster %s: etcd at %s: %s works again", self.member.cluster,
                         self.client.address, what)
        elif self._problems.get(what) != message:
            self._problems[what] = message
            log.warning("cluster %s: %s", self.member.cluster, message)

    # -- reading ------------------------------------------------------------------------------
    def _open(self, key: str, value: bytes) -> Any:
        """The body at ``key``, or None (logged, counted) if it is forged or malformed."""
        try:
            return open_value(self.secret, key, value)
        except PermissionError as exc:
            self.stats["forged"] += 1
            log.warning("cluster %s: etcd key %s ignored: %s", self.member.cluster, key, exc)
        except ValueError as exc:
            self.stats["bad"] += 1
            log.warning("cluster %s: etcd key %s ignored: %s", self.member.cluster, key, exc)
        return None

    def _member(self, kv: KeyValue) -> tuple[str, str] | None:
        node_id = kv.key[len(self.members_prefix):]
        body = self._open(kv.key, kv.value)
        if body is None:
            return None
        if (not isinstance(body, dict) or body.get("id") != node_id
                or not isinstance(body.get("control"), str) or not body["control"]):
            self.stats["bad"] += 1
            log.warning("cluster %s: etcd key %s ignored: not a member entry for %s",
                        self.member.cluster, kv.key, node_id)
            return None
        return node_id, str(body["control"])

    def _record(self, key: str, value: bytes) -> AppRecord | None:
        body = self._open(key, value)
        if body is None:
            return None
        try:
            record = AppRecord.from_wire(body, key)
        except ValueError as exc:
            self.stats["bad"] += 1
            log.warning("cluster %s: etcd key %s ignored: %s", self.member.cluster, key, exc)
            return None
        if record.name != key[len(self.apps_prefix):]:
            self.stats["bad"] += 1
            log.warning("cluster %s: etcd key %s ignored: it holds a record of %r",
                        self.member.cluster, key, record.name)
            return None
        return record

    async def _read_all(self) -> None:
        """Read every member and record: replace the peers, feed all the records."""
        kvs, self.revision = await self.client.get_prefix(self.prefix)
        peers: dict[str, str] = {}
        records: list[AppRecord] = []
        for kv in kvs:
            if kv.key.startswith(self.members_prefix):
                found = self._member(kv)
                if found is not None and found[0] != self.member.id:
                    peers[found[0]] = found[1]
            elif kv.key.startswith(self.apps_prefix):
                record = self._record(kv.key, kv.value)
                if record is not None:
                    records.append(record)
        if peers != self._peers:
            self._peers = peers
            self._bump()
        if records:
            self._feed(records)

    def _feed(self, records: list[AppRecord]) -> None:
        try:
            self.on_records(records)
        except Exception:       # the sink's failure is the sink's bug, not a reason to stop
            log.exception("cluster %s: the registry's record sink failed", self.member.cluster)

    # -- writing ------------------------------------------------------------------------------
    def _member_value(self) -> bytes:
        body = {"id": self.member.id, "control": self.member.control}
        if self.member.key:
            body["key"] = self.member.key
        return sign_value(self.secret, self.member_key,
                          bytes(msgpack.packb(body, use_bin_type=True)))

    async def _announce(self) -> None:
        """A new lease, and this node's key on it."""
        self.lease = await self.client.grant(self.ttl)
        await self.client.put(self.member_key, self._member_value(), lease=self.lease)

    async def publish(self, record: AppRecord) -> None:
        key = self.apps_prefix + record.name
        value = sign_value(self.secret, key,
                           bytes(msgpack.packb(record.to_wire(), use_bin_type=True)))
        for _ in range(PUBLISH_ATTEMPTS):
            held = await self.client.get(key)
            if held is not None:
                stored = self._record(key, held.value)
                if stored is not None and not self._refused(stored) and not record.beats(stored):
                    return          # what etcd holds is ours or beats it: ours lost
            if await self.client.txn_put_if(key, value, held.mod_revision if held else 0):
                self.stats["published"] += 1
                return
            self.stats["publish_races"] += 1
        raise EtcdError(f"could not publish {record.name}: lost {PUBLISH_ATTEMPTS} races in a row")

    def _refused(self, record: AppRecord) -> bool:
        """A stored record the service would refuse (no valid grant) must not block ours."""
        try:
            record.check(self.secret)
        except ValueError:          # GrantError
            return True
        return False

    # -- running ------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._announce()
            await self._read_all()
        except EtcdError as exc:
            await self._leave()
            raise RegistryError(f"cluster registry etcd://{self.client.address}: {exc}") from None
        log.info("cluster %s: node %s in etcd at %s (lease %x, %d peer(s))", self.member.cluster,
                 self.member.id, self.client.address, self.lease, len(self._peers))
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease)
                nursery.start_soon(self._follow)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        """Take this node's key away at once (its lease with it), shielded and bounded:
        the peers drop it now rather than when the lease runs out."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + LEAVE_TIMEOUT
            try:
                if self.lease:
                    await self.client.revoke(self.lease)
                await self.client.delete(self.member_key)
            except EtcdError as exc:
                log.info("cluster %s: could not take node %s out of etcd (its lease ends "
                         "within %d s): %s", self.member.cluster, self.member.id, self.ttl, exc)

    async def _keep_lease(self) -> None:
        """Renew the lease every ttl/3; grant a new one (and put the key again) if it is
        gone, i.e. this node was away from etcd longer than the ttl."""
        while True:
            await trio.sleep(self.ttl / 3)
            try:
                if await self.client.keepalive_once(self.lease) == 0:
                    self.stats["regrants"] += 1
                    log.warning("cluster %s: node %s's etcd lease had expired: announcing "
                                "it again", self.member.cluster, self.member.id)
                    await self._announce()
                self._problem("lease", None)
            except EtcdError as exc:
                self._problem("lease", f"cannot renew this node's etcd lease: {exc}")

    async def _follow(self) -> None:
        """Watch the whole prefix; on a drop, wait, read everything again, watch again."""
        backoff = Backoff(first=0.2, cap=5.0, stable_after=10.0)
        while True:
            started = trio.current_time()
            try:
                async with aclosing(self.client.watch_prefix(self.prefix, self.revision + 1)) as events:
                    async for event in events:
                        self._apply(event.type, event.key, event.value, event.mod_revision)
            except EtcdError as exc:
                self._problem("watch", f"lost etcd's changes (reconnecting): {exc}")
            self.stats["reconnects"] += 1
            await trio.sleep(backoff.failed(trio.current_time() - started))
            try:
                await self._read_all()
                self._problem("watch", None)
            except EtcdError as exc:
                self._problem("watch", f"lost etcd's changes (reconnecting): {exc}")

    def _apply(self, kind: str, key: str, value: bytes, revision: int) -> None:
        self.revision = max(self.revision, revision)
        if key.startswith(self.members_prefix):
            node_id = key[len(self.members_prefix):]
            if node_id == self.member.id:
                return
            found = None if kind == "DELETE" else self._member(KeyValue(key, value, revision))
            if found is None:       # gone, or no longer a valid entry (as a full read sees it)
                if self._peers.pop(node_id, None) is not None:
                    self._bump()
            elif self._peers.get(node_id) != found[1]:
                self._peers[node_id] = found[1]
                self._bump()
        elif key.startswith(self.apps_prefix) and kind == "PUT":
            record = self._record(key, value)
            if record is not None:
                self._feed([record])
