"""The etcd registry (engine/cluster/etcd.py, etcd_registry.py) against a real etcd.

First the client, call by call (put/get/txn/leases/watch, and its errors); then the
registry: two of them see each other, one that stops leaves at once and one that dies
within its ttl, conflicting publishes converge on the greater record, a change made while
a node was away reaches it when it comes back (node restarted, or etcd restarted under
it), forged entries are ignored, and an unreachable etcd stops the start.
"""
from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any, Callable

import msgpack
import pytest
import trio

from engine.cluster.catalog import AppRecord, Catalog, sign_grant
from engine.cluster.etcd import EtcdClient, EtcdError, WatchEvent
from engine.cluster.etcd_registry import EtcdRegistry, sign_value
from engine.cluster.registry import Member, RegistryError
from etcd_support import EtcdProcess, etcd_instance, etcd_server  # noqa: F401 (fixtures)
from support import free_tcp_port

pytestmark = pytest.mark.e2e

SECRET = b"the etcd tests' cluster secret"
TTL = 2.0
T0 = 1_700_000_000.0


# -- helpers -------------------------------------------------------------------------------
def record(name: str, generation: int, digest: str = "", *, origin: str = "a",
           version: int = 1, secret: bytes | None = SECRET) -> AppRecord:
    """A deploy (digest given) or a tombstone, with its caller's grant."""
    deployed = bool(digest)
    grant = (sign_grant(secret, "deploy" if deployed else "undeploy", name, at=T0)
             if secret is not None and generation > 0 else None)
    return AppRecord(name, generation, deployed, version if deployed else 0, digest, origin, grant)


class Node:
    """One registry and the catalog its records feed (what the service would hold)."""

    def __init__(self, address: str, node_id: str, *, secret: bytes | None = SECRET,
                 cluster: str = "c1", ttl: float = TTL):
        self.catalog = Catalog()
        self.member = Member(node_id, f"tcp://127.0.0.1:{9000 + len(node_id)}/{node_id}", cluster)
        self.registry = EtcdRegistry(address, self.member, self.catalog.merge_all,
                                     secret=secret, ttl=ttl)
        self.scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as self.scope:
                await self.registry.run(task_status=task_status)
        await nursery.start(run)

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"not within {timeout:g} s: {what}")


# -- the client ----------------------------------------------------------------------------
async def test_client_put_get_prefix_and_delete(etcd_server: str) -> None:
    client = EtcdClient(etcd_server)
    with trio.fail_after(10):
        rev1 = await client.put("/t/a", b"one")
        rev2 = await client.put("/t/b", b"\x00\xffbinary")
        await client.put("/u/c", b"elsewhere")
        kvs, rev = await client.get_prefix("/t/")
        assert [(kv.key, kv.value) for kv in kvs] == [("/t/a", b"one"), ("/t/b", b"\x00\xffbinary")]
        assert rev2 > rev1 and rev >= rev2 + 1
        assert (await client.get("/t/a")).mod_revision == rev1   # type: ignore[union-attr]
        assert await client.delete("/t/a") == 1
        assert await client.get("/t/a") is None
        assert await client.delete("/t/a") == 0
        assert await client.get_prefix("/nothing/") == ([], rev + 1)


async def test_client_txn_put_if_writes_only_over_what_was_read(etcd_server: str) -> None:
    client = EtcdClient(etcd_server)
    with trio.fail_after(10):
        assert await client.txn_put_if("/k", b"first", 0)          # absent: written
        assert not await client.txn_put_if("/k", b"again", 0)      # no longer absent
        held = await client.get("/k")
        assert held is not None and held.value == b"first"
        assert await client.txn_put_if("/k", b"second", held.mod_revision)
        assert not await client.txn_put_if("/k", b"stale", held.mod_revision)
        assert (await client.get("/k")).value == b"second"         # type: ignore[union-attr]


async def test_client_lease_renews_then_expires_with_its_keys(etcd_server: str) -> None:
    client = EtcdClient(etcd_server)
    with trio.fail_after(15):
        lease = await client.grant(2)
        await client.put("/leased", b"x", lease=lease)
        assert (await client.get("/leased")).lease == lease        # type: ignore[union-attr]
        for _ in range(3):                                         # renewed past its ttl
            await trio.sleep(0.8)
            assert await client.keepalive_once(lease) == 2
        assert await client.get("/leased") is not None
        while await client.get("/leased") is not None:             # no renewal: it ends
            await trio.sleep(0.2)
        assert await client.keepalive_once(lease) == 0
        await client.revoke(lease)                                 # gone already: no error


async def test_client_watch_sees_changes_from_a_revision(etcd_server: str) -> None:
    client = EtcdClient(etcd_server)
    with trio.fail_after(10):
        rev = await client.put("/w/before", b"0")
        await client.put("/elsewhere", b"not watched")
        seen: list[WatchEvent] = []

        async def watch() -> None:
            async with aclosing(client.watch_prefix("/w/", rev)) as events:
                async for event in events:
                    seen.append(event)
                    if len(seen) == 3:
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await client.put("/w/x", b"1")
            await client.delete("/w/before")
        assert [(e.type, e.key, e.value) for e in seen] == [
            ("PUT", "/w/before", b"0"), ("PUT", "/w/x", b"1"), ("DELETE", "/w/before", b"")]
        assert seen[0].mod_revision == rev and seen[2].mod_revision > seen[1].mod_revision


async def test_client_watch_raises_when_etcd_goes(etcd_instance: EtcdProcess) -> None:
    client = EtcdClient(etcd_instance.address)
    with trio.fail_after(15):
        async def stop_soon() -> None:
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(etcd_instance.stop)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_soon)
            with pytest.raises(EtcdError, match="unreachable|ended the watch"):
                async for _ in client.watch_prefix("/", 1):
                    pass


async def test_client_errors_say_where_and_what() -> None:
    port = free_tcp_port()      # nothing listens there
    with trio.fail_after(10):
        with pytest.raises(EtcdError, match=rf"etcd at 127\.0\.0\.1:{port} unreachable"):
            await EtcdClient(f"127.0.0.1:{port}").get("/k")
    with pytest.raises(ValueError, match="HOST:PORT"):
        EtcdClient("no-port")


async def test_client_reports_a_refused_request(etcd_server: str) -> None:
    client = EtcdClient(etcd_server)
    with trio.fail_after(10):
        with pytest.raises(EtcdError, match="etcd answered 400: json: cannot unmarshal"):
            await client._call("/v3/kv/range", {"key": 1})
        with pytest.raises(EtcdError, match="lease not found"):
            await client.put("/k", b"v", lease=12345)


# -- the registry --------------------------------------------------------------------------
async def test_two_registries_see_each_other_and_a_stopped_one_leaves_at_once(
        etcd_server: str) -> None:
    a, b = Node(etcd_server, "a"), Node(etcd_server, "b")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            assert dict(b.registry.peers()) == {"a": a.member.control}   # read at start
            seen = await a.registry.wait_change(-1)
            await until(lambda: "b" in a.registry.peers(), 5, "a sees b")
            assert dict(a.registry.peers()) == {"b": b.member.control}
            assert a.registry.describe()["members"] == 2 and a.registry.problems() == []
            b.stop()
            t0 = trio.current_time()
            while "b" in a.registry.peers():
                seen = await a.registry.wait_change(seen)
            assert trio.current_time() - t0 < TTL / 2        # not the lease running out
            kvs, _ = await EtcdClient(etcd_server).get_prefix("/engine/c1/members/")
            assert [kv.key for kv in kvs] == ["/engine/c1/members/a"]
            nursery.cancel_scope.cancel()


async def test_a_killed_registry_disappears_within_its_ttl(etcd_server: str) -> None:
    a, b = Node(etcd_server, "a"), Node(etcd_server, "b")

    async def crash() -> None:       # what a node that dies does: nothing
        return None

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            await until(lambda: "b" in a.registry.peers(), 5, "a sees b")
            b.registry._leave = crash                        # type: ignore[method-assign]
            b.stop()
            await trio.sleep(TTL / 2)
            assert "b" in a.registry.peers()                 # its lease still runs
            await until(lambda: "b" not in a.registry.peers(), TTL + 2, "b's lease ends")
            nursery.cancel_scope.cancel()


async def test_a_lost_lease_is_granted_again(etcd_server: str) -> None:
    a, b = Node(etcd_server, "a"), Node(etcd_server, "b")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            await until(lambda: "b" in a.registry.peers(), 5, "a sees b")
            first = b.registry.lease
            await EtcdClient(etcd_server).revoke(first)      # as if b was away past its ttl
            await until(lambda: "b" not in a.registry.peers(), 5, "a sees b go")
            await until(lambda: "b" in a.registry.peers(), TTL + 2, "b announces itself again")
            assert b.registry.lease != first and b.registry.stats["regrants"] == 1
            nursery.cancel_scope.cancel()


async def test_conflicting_publishes_converge_on_the_greater_record(etcd_server: str) -> None:
    a, b = Node(etcd_server, "a"), Node(etcd_server, "b")
    mine = record("app", 1, "aa" * 32, origin="a")
    theirs = record("app", 1, "bb" * 32, origin="b")
    winner = max(mine, theirs, key=AppRecord.rank)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            for _ in range(3):                   # at once, many times: races and all
                async with trio.open_nursery() as both:
                    both.start_soon(a.registry.publish, mine)
                    both.start_soon(b.registry.publish, theirs)
            await b.registry.publish(mine)       # late, and the loser: changes nothing
            await until(lambda: a.catalog.get("app") == b.catalog.get("app") == winner, 5,
                        "both catalogs hold the winner")
            held = await EtcdClient(etcd_server).get("/engine/c1/apps/app")
            assert held is not None and b.registry._record(held.key, held.value) == winner
            later = record("app", 2, origin="a")   # a later change beats both
            await b.registry.publish(later)
            await until(lambda: a.catalog.get("app") == later, 5, "a sees the tombstone")
            nursery.cancel_scope.cancel()


async def test_a_tombstone_made_while_a_node_was_away_reaches_it(etcd_server: str) -> None:
    a, b = Node(etcd_server, "a"), Node(etcd_server, "b")
    deploy = record("app", 1, "aa" * 32)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            await a.registry.publish(deploy)
            await until(lambda: b.catalog.get("app") == deploy, 5, "b sees the deploy")
            b.stop()
            await until(lambda: "b" not in a.registry.peers(), 5, "b is gone")
            tombstone = record("app", 2, origin="a")
            await a.registry.publish(tombstone)
            assert b.catalog.get("app") == deploy
            b2 = Node(etcd_server, "b")
            b2.catalog = b.catalog
            b2.registry.on_records = b.catalog.merge_all
            await b2.start(nursery)                           # read at start, before started()
            assert b2.catalog.get("app") == tombstone
            nursery.cancel_scope.cancel()


async def test_a_registry_follows_etcd_through_a_restart(
        etcd_instance: EtcdProcess, caplog: pytest.LogCaptureFixture) -> None:
    a, b = Node(etcd_instance.address, "a"), Node(etcd_instance.address, "b")
    tombstone = record("app", 2, origin="b")
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await b.start(nursery)
            await until(lambda: "b" in a.registry.peers(), 5, "a sees b")
            with caplog.at_level(logging.WARNING, "engine.cluster.etcd_registry"):
                await trio.to_thread.run_sync(etcd_instance.stop)
                await until(lambda: bool(a.registry.problems()), 5, "a lists the outage")
            assert "lost etcd's changes" in " ".join(a.registry.problems())
            assert any(etcd_instance.address in r.getMessage() for r in caplog.records)
            await trio.to_thread.run_sync(etcd_instance.start)
            await b.registry.publish(tombstone)      # b is back first: a may not be yet
            await until(lambda: a.catalog.get("app") == tombstone, 15, "a sees b's change")
            await until(lambda: not a.registry.problems(), 10, "a's problems clear")
            assert "b" in a.registry.peers() and a.registry.stats["reconnects"] >= 1
            nursery.cancel_scope.cancel()


async def test_forged_and_malformed_entries_are_ignored(etcd_server: str) -> None:
    a = Node(etcd_server, "a")
    client = EtcdClient(etcd_server)
    members, apps = "/engine/c1/members/", "/engine/c1/apps/"

    def body(d: Any) -> bytes:
        return bytes(msgpack.packb(d, use_bin_type=True))

    intruder = body({"id": "x", "control": "tcp://10.6.6.6:1"})
    good = record("good", 1, "cc" * 32)
    with trio.fail_after(15):
        await client.put(members + "x", sign_value(b"another secret", members + "x", intruder))
        await client.put(members + "y", sign_value(None, members + "y", intruder))   # unsigned
        await client.put(members + "z", sign_value(SECRET, members + "x", intruder))  # moved
        await client.put(members + "w", b"\xc1 not msgpack")
        await client.put(apps + "bad", sign_value(SECRET, apps + "bad", body({"name": "bad"})))
        await client.put(apps + "evil", sign_value(None, apps + "evil",
                                                   body(record("evil", 9, "dd" * 32).to_wire())))
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            await client.put(members + "v", sign_value(b"another secret", members + "v", intruder))
            await a.registry.publish(good)
            await until(lambda: a.catalog.get("good") == good, 5, "a sees its own record")
            assert dict(a.registry.peers()) == {}
            assert "evil" not in a.catalog and "bad" not in a.catalog
            assert a.registry.stats["forged"] == 5 and a.registry.stats["bad"] == 2
            nursery.cancel_scope.cancel()


async def test_a_forged_record_does_not_block_a_real_one(etcd_server: str) -> None:
    """With etcd write access but no secret, a record signed right but without a valid
    caller's grant (here: none) cannot hold a name against a real change."""
    a = Node(etcd_server, "a")
    key = "/engine/c1/apps/app"
    squatter = record("app", 99, "ee" * 32, secret=None)
    real = record("app", 1, "aa" * 32)
    with trio.fail_after(10):
        await EtcdClient(etcd_server).put(key, sign_value(SECRET, key, msgpack.packb(
            squatter.to_wire(), use_bin_type=True)))
        await a.registry.publish(real)
        held = await EtcdClient(etcd_server).get(key)
        assert held is not None and a.registry._record(key, held.value) == real


async def test_unreachable_etcd_at_start_is_a_registry_error() -> None:
    port = free_tcp_port()
    a = Node(f"etcd://127.0.0.1:{port}", "a")
    with trio.fail_after(10):
        with pytest.raises(RegistryError, match=rf"127\.0\.0\.1:{port}.*unreachable"):
            await a.registry.run()
    with pytest.raises(RegistryError, match="HOST:PORT"):
        Node("etcd://nowhere", "a")
