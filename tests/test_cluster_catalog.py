"""The cluster's app catalog (engine/cluster/catalog.py, state.py, apps.py) converges.

The convergence argument of catalog.py is "a map of last-writer-wins registers under one
total order": these tests hold it to that, first as a hypothesis state machine over 3-5
nodes (each a real :class:`ClusterApps` on its own state dir, no trio run needed: merging
and changing are synchronous) that change apps, gossip, split into partitions, heal and
restart, against an oracle that spells the order out rule by rule; then pinned scenarios
for the cases the issue names (an undeploy made in a partition, conflicting deploys),
the callers' grants, and the catalog file.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from random import Random
from typing import Any, Iterable

import msgpack
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.cluster.apps import ClusterApps
from engine.cluster.catalog import (GRANT_WINDOW, AppRecord, Catalog, Grant, GrantError, Op, check_fresh,
                                    check_grant, sign_grant)
from engine.cluster.state import CATALOG_FILE, CatalogFile
from transport.errors import Unauthorized

SECRET = b"the catalog tests' cluster secret"
OTHER_SECRET = b"another cluster's secret"
T0 = 1_700_000_000.0
NAMES = ["a", "b"]
DIGESTS = ["0d1e2f", "7f2a3b", "c3e4d5"]


class FakeNode:
    """What :class:`ClusterApps` reads of its node in these tests: the apps running here
    (none: merging, changing and authorizing never look further)."""

    def __init__(self) -> None:
        self.apps: dict[str, Any] = {}


def cluster_apps(node_id: str = "n1", secret: bytes | None = SECRET) -> ClusterApps:
    return ClusterApps(FakeNode(), node_id=node_id, cluster="test", secret=secret)  # type: ignore[arg-type]


def grant_for(op: Op, app: str, secret: bytes = SECRET, nonce: str | None = None) -> Grant:
    return sign_grant(secret, op, app, at=T0, nonce=nonce)


def deploy(name: str, generation: int, version: int = 1, digest: str = "aa", origin: str = "n1",
           grant: Grant | None = None) -> AppRecord:
    return AppRecord(name, generation, True, version, digest, origin, grant)


def tombstone(name: str, generation: int, origin: str = "n1", grant: Grant | None = None) -> AppRecord:
    return AppRecord(name, generation, False, 0, "", origin, grant)


def expected_winner(records: Iterable[AppRecord]) -> AppRecord | None:
    """The order of catalog.py's docstring, rule by rule (not through ``rank``)."""
    candidates = list(records)
    if not candidates:
        return None
    top = max(r.generation for r in candidates)
    candidates = [r for r in candidates if r.generation == top]
    if any(not r.deployed for r in candidates):
        candidates = [r for r in candidates if not r.deployed]      # stopping wins a tie
    version = max(r.version for r in candidates)
    candidates = [r for r in candidates if r.version == version]
    digest = max(r.digest for r in candidates)
    candidates = [r for r in candidates if r.digest == digest]
    return max(candidates, key=lambda r: r.origin)


def over_the_wire(records: list[AppRecord]) -> list[AppRecord]:
    """Records as a peer receives them: msgpack out, msgpack in."""
    wire = msgpack.packb([r.to_wire() for r in records], use_bin_type=True)
    return Catalog.records_from_wire(msgpack.unpackb(wire, raw=False))


# -- the state machine ---------------------------------------------------------------------------

FORGERIES = ["another secret", "another op", "another app", "no grant"]


class ClusterMachine(RuleBasedStateMachine):
    """3-5 nodes of a cluster with a secret.  The model: ``seen[i]``, every record node i
    has merged (its catalog must hold the oracle's winner of them); ``made``, every good
    record any node made; ``superseded``, the records a node had seen when it changed that
    app (its change beats them, so none of them may win once everyone has heard)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="catalog-machine-"))
        self.nodes: list[ClusterApps] = []
        self.seen: list[set[AppRecord]] = []
        self.made: list[AppRecord] = []
        self.superseded: set[AppRecord] = set()
        self.groups: list[set[int]] | None = None
        self.nonces = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(n=st.integers(3, 5))
    def start(self, n: int) -> None:
        for i in range(n):
            self.nodes.append(self.open_node(f"n{i}"))
            self.seen.append(set())

    def open_node(self, node_id: str) -> ClusterApps:
        apps = cluster_apps(node_id)
        apps.open(self.dir / node_id)
        return apps

    def grant(self, op: Op, name: str, secret: bytes = SECRET) -> Grant:
        self.nonces += 1
        return grant_for(op, name, secret, nonce=f"nonce-{self.nonces:06d}")

    def reachable(self, i: int) -> list[int]:
        if self.groups is None:
            return list(range(len(self.nodes)))
        return sorted(next(g for g in self.groups if i in g))

    def send(self, i: int, j: int) -> None:
        """Gossip: all of i's records merged into j, through msgpack."""
        records = self.nodes[i].catalog.records()
        received = over_the_wire(records)
        assert received == records
        before = {r.name: self.nodes[j].catalog.get(r.name) for r in records}
        won = self.nodes[j].merge(received, source=self.nodes[i].node_id)
        assert won == [r for r in records if r.beats(before[r.name])]
        self.seen[j].update(records)

    def sync(self, members: list[int]) -> None:
        for i in members:
            for j in members:
                if i != j:
                    self.send(i, j)
        union = set().union(*(self.seen[i] for i in members))
        want = Catalog(sorted(union, key=lambda r: (r.name, r.rank()))).records()
        for i in members:
            assert self.nodes[i].catalog.records() == want
            assert self.nodes[i].catalog.fingerprint() == self.nodes[members[0]].catalog.fingerprint()

    # -- rules -----------------------------------------------------------------------------------
    @rule(i=st.integers(0, 4), name=st.sampled_from(NAMES), deployed=st.booleans(),
          version=st.integers(0, 2), digest=st.sampled_from(DIGESTS))
    def change(self, i: int, name: str, deployed: bool, version: int, digest: str) -> None:
        """An operator's deploy or undeploy on node i (its grant signed with the secret)."""
        i %= len(self.nodes)
        apps = self.nodes[i]
        before = [r for r in self.seen[i] if r.name == name]
        op: Op = "deploy" if deployed else "undeploy"
        record = apps.change(name, deployed=deployed, grant=self.grant(op, name), version=version,
                             digest=digest)
        assert record.generation == max((r.generation for r in before), default=0) + 1
        assert apps.catalog.get(name) == record
        assert all(record.beats(r) for r in before), "a change lost to a record its node had seen"
        self.superseded.update(before)
        self.made.append(record)
        self.seen[i].add(record)

    @rule(i=st.integers(0, 4), name=st.sampled_from(NAMES), version=st.integers(0, 2),
          digest=st.sampled_from(DIGESTS))
    def started_with(self, i: int, name: str, version: int, digest: str) -> None:
        """Node i finds an app it was started with (its operator's folder): generation 0,
        no grant needed, only when the catalog knows nothing of the name (ensure_digests)."""
        i %= len(self.nodes)
        apps = self.nodes[i]
        if name in apps.catalog:
            return
        record = deploy(name, 0, version, digest, origin=apps.node_id)
        assert apps.merge([record], source="its own folder") == [record]
        self.made.append(record)
        self.seen[i].add(record)

    @rule(i=st.integers(0, 4), j=st.integers(0, 4))
    def gossip(self, i: int, j: int) -> None:
        i %= len(self.nodes)
        group = self.reachable(i)
        self.send(i, group[j % len(group)])

    @rule(mask=st.integers(1, 2**5 - 2))
    def partition(self, mask: int) -> None:
        n = len(self.nodes)
        side = {i for i in range(n) if mask >> i & 1}
        if not side or len(side) == n:
            side = {0}
        self.groups = [side, set(range(n)) - side]

    @rule()
    def heal(self) -> None:
        self.groups = None

    @rule()
    def gossip_within_groups(self) -> None:
        for group in self.groups or [set(range(len(self.nodes)))]:
            self.sync(sorted(group))

    @rule()
    def heal_and_gossip_everywhere(self) -> None:
        """After full gossip every catalog is the catalog of all records, the oracle's,
        and no record a later change was made over wins."""
        self.groups = None
        self.sync(list(range(len(self.nodes))))
        catalog = self.nodes[0].catalog
        assert catalog.records() == Catalog(self.made).records()
        for name in NAMES:
            want = expected_winner(r for r in self.made if r.name == name)
            assert catalog.get(name) == want
            assert want is None or want not in self.superseded, \
                f"{want} won though a change was made over it"

    @rule(i=st.integers(0, 4))
    def restart(self, i: int) -> None:
        """Node i restarts from its state dir: its catalog (tombstones too) is read back."""
        i %= len(self.nodes)
        old = self.nodes[i]
        self.nodes[i] = self.open_node(old.node_id)
        assert self.nodes[i].catalog.records() == old.catalog.records()

    @rule(i=st.integers(0, 4), name=st.sampled_from(NAMES), deployed=st.booleans(),
          how=st.sampled_from(FORGERIES))
    def forged_record(self, i: int, name: str, deployed: bool, how: str) -> None:
        """A record whose grant does not check (it would win otherwise): refused, counted."""
        i %= len(self.nodes)
        apps = self.nodes[i]
        op: Op = "deploy" if deployed else "undeploy"
        grant = {"another secret": lambda: self.grant(op, name, OTHER_SECRET),
                 "another op": lambda: self.grant("undeploy" if deployed else "deploy", name),
                 "another app": lambda: self.grant(op, name + "x"),
                 "no grant": lambda: None}[how]()
        record = AppRecord(name, apps.catalog.next_generation(name) + 3, deployed, 9 if deployed else 0,
                           "ffffff" if deployed else "", "stranger", grant)
        refused, before = apps.stats["refused_records"], apps.catalog.records()
        assert apps.merge([record], source="a stranger") == []
        assert apps.stats["refused_records"] == refused + 1
        assert apps.catalog.records() == before

    @precondition(lambda self: self.made)
    @rule(rnd=st.randoms(use_true_random=False))
    def merge_order_does_not_matter(self, rnd: Random) -> None:
        """Idempotent, commutative, associative: any order and grouping of the same records
        gives the same catalog and fingerprint."""
        reference = Catalog(self.made)
        shuffled = self.made[:]
        rnd.shuffle(shuffled)
        cut1, cut2 = sorted(rnd.randint(0, len(shuffled)) for _ in range(2))
        a, b, c = shuffled[:cut1], shuffled[cut1:cut2], shuffled[cut2:]

        def union(*parts: Iterable[AppRecord]) -> Catalog:
            out = Catalog()
            for part in parts:
                out.merge_all(Catalog(part).records())
            return out

        ab_c = union(union(a, b).records(), c)
        a_bc = union(a, union(b, c).records())
        ba = union(b, a)
        ab = union(a, b)
        twice = Catalog(shuffled + shuffled[::-1])
        again = Catalog(reference.records())
        assert again.merge_all(shuffled) == []
        for catalog in (Catalog(shuffled), ab_c, a_bc, twice, again):
            assert catalog.records() == reference.records()
            assert catalog.fingerprint() == reference.fingerprint()
        assert ab.records() == ba.records() and ab.fingerprint() == ba.fingerprint()

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def each_node_holds_the_winner_of_what_it_has_seen(self) -> None:
        for apps, seen in zip(self.nodes, self.seen):
            for name in NAMES:
                assert apps.catalog.get(name) == expected_winner(r for r in seen if r.name == name)

    @invariant()
    def fingerprints_agree_iff_catalogs_do(self) -> None:
        for x in self.nodes:
            for y in self.nodes:
                assert (x.catalog.fingerprint() == y.catalog.fingerprint()) == \
                    (x.catalog.records() == y.catalog.records())


TestClusterMachine = ClusterMachine.TestCase
TestClusterMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


# -- the order, pinned ---------------------------------------------------------------------------

def test_a_later_generation_beats_any_version_digest_or_tombstone():
    assert deploy("a", 2, version=0, digest="00").beats(tombstone("a", 1))
    assert deploy("a", 2, version=0, digest="00").beats(deploy("a", 1, version=9, digest="ff"))
    assert tombstone("a", 3).beats(deploy("a", 2, version=9))


def test_a_tombstone_beats_a_deploy_of_the_same_generation():
    for version, digest, origin in [(0, "00", "a"), (9, "ff", "zz")]:
        assert tombstone("a", 4, origin="a").beats(deploy("a", 4, version, digest, origin))
        assert Catalog([tombstone("a", 4), deploy("a", 4, version, digest, origin)]).get("a") == tombstone("a", 4)
        assert Catalog([deploy("a", 4, version, digest, origin), tombstone("a", 4)]).get("a") == tombstone("a", 4)


def test_with_equal_generations_the_higher_version_wins_then_the_higher_digest_then_the_origin():
    assert deploy("a", 1, version=3, digest="00").beats(deploy("a", 1, version=2, digest="ff"))
    assert deploy("a", 1, version=2, digest="bb").beats(deploy("a", 1, version=2, digest="aa"))
    assert deploy("a", 1, origin="n2").beats(deploy("a", 1, origin="n1"))
    a, b = deploy("a", 1, version=2, digest="aa", origin="n9"), deploy("a", 1, version=2, digest="bb")
    assert Catalog([a, b]).get("a") == Catalog([b, a]).get("a") == b


def test_a_change_made_after_seeing_a_record_beats_it():
    n1, n2 = cluster_apps("n1"), cluster_apps("n2")
    seen = n1.change("a", deployed=True, grant=grant_for("deploy", "a"), version=9, digest="ff")
    n2.merge([seen], source="n1")
    undone = n2.change("a", deployed=False, grant=grant_for("undeploy", "a"))
    assert undone.generation == seen.generation + 1 and undone.beats(seen)
    assert n1.merge([undone], source="n2") == [undone]


def test_an_undeploy_made_during_a_partition_wins_after_the_heal_and_survives_restarts(tmp_path):
    """Issue 13 defect 3: the deploy is still running on the other side of the partition
    (and on a node restarted meanwhile); after the heal the undeploy wins everywhere."""
    nodes = {i: cluster_apps(i) for i in ("A", "B", "C")}
    for node_id, apps in nodes.items():
        apps.open(tmp_path / node_id)
    deployed = nodes["A"].change("app", deployed=True, grant=grant_for("deploy", "app"), version=1,
                                 digest="d1")
    for peer in "BC":
        nodes[peer].merge([deployed], source="A")
    # partition {A} | {B, C}: B undeploys, C hears of it; A still runs the app
    undone = nodes["B"].change("app", deployed=False, grant=grant_for("undeploy", "app"))
    nodes["C"].merge(over_the_wire(nodes["B"].catalog.records()), source="B")
    # C restarts from its state dir: the tombstone is still there
    nodes["C"] = cluster_apps("C")
    nodes["C"].open(tmp_path / "C")
    assert nodes["C"].catalog.get("app") == undone
    # heal: A's (stale) catalog reaches C and B first, then theirs reach A
    for peer in "BC":
        assert nodes[peer].merge(over_the_wire(nodes["A"].catalog.records()), source="A") == []
    nodes["A"].merge(over_the_wire(nodes["C"].catalog.records()), source="C")
    # a node joining later syncs from A, which ran the app: it learns the tombstone
    late = cluster_apps("D")
    late.merge(over_the_wire(nodes["A"].catalog.records()), source="A")
    for apps in [*nodes.values(), late]:
        assert apps.catalog.get("app") == undone
        assert apps.wanted_digest("app") == "-"
    assert len({apps.catalog.fingerprint() for apps in [*nodes.values(), late]}) == 1


def test_a_deploy_and_an_undeploy_made_at_once_in_a_partition_end_as_the_undeploy():
    a, b = cluster_apps("A"), cluster_apps("B")
    first = a.change("app", deployed=True, grant=grant_for("deploy", "app"), version=1, digest="d1")
    b.merge([first], source="A")
    redeployed = a.change("app", deployed=True, grant=grant_for("deploy", "app"), version=2, digest="d2")
    undone = b.change("app", deployed=False, grant=grant_for("undeploy", "app"))
    assert redeployed.generation == undone.generation == 2
    a.merge([undone], source="B")
    b.merge([redeployed], source="A")
    assert a.catalog.get("app") == b.catalog.get("app") == undone


# -- grants --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", FORGERIES)
@pytest.mark.parametrize("deployed", [True, False])
def test_a_record_with_a_grant_that_does_not_check_is_refused(how, deployed):
    op: Op = "deploy" if deployed else "undeploy"
    grant = {"another secret": grant_for(op, "a", OTHER_SECRET),
             "another op": grant_for("undeploy" if deployed else "deploy", "a"),
             "another app": grant_for(op, "b"),
             "no grant": None}[how]
    record = AppRecord("a", 2, deployed, 1 if deployed else 0, "aa" if deployed else "", "n1", grant)
    with pytest.raises(GrantError):
        record.check(SECRET)
    record.check(None)                                  # a cluster without a secret checks nothing
    good = AppRecord("a", 2, deployed, record.version, record.digest, "n1", grant_for(op, "a"))
    good.check(SECRET)


def test_a_generation_0_record_needs_no_grant():
    deploy("a", 0).check(SECRET)
    with pytest.raises(GrantError, match="no caller's grant"):
        deploy("a", 1).check(SECRET)


def test_check_grant_names_what_is_wrong():
    grant = grant_for("deploy", "a")
    check_grant(SECRET, grant, "deploy", "a")
    with pytest.raises(GrantError, match="not signed with this cluster's secret"):
        check_grant(OTHER_SECRET, grant, "deploy", "a")
    with pytest.raises(GrantError, match="not undeploy"):
        check_grant(SECRET, grant, "undeploy", "a")
    forged = Grant("deploy", "a", T0 + 1, grant.nonce, grant.sig)       # another time, same sig
    with pytest.raises(GrantError):
        check_grant(SECRET, forged, "deploy", "a")


@pytest.mark.parametrize("age", [GRANT_WINDOW + 1, -(GRANT_WINDOW + 1)])
def test_a_grant_31_s_old_or_ahead_is_stale_and_29_s_is_fresh(age):
    grant = grant_for("deploy", "a")
    with pytest.raises(GrantError, match="NTP"):
        check_fresh(grant, T0 + age)
    check_fresh(grant, T0 + age - (2 if age > 0 else -2))


def test_a_grant_signed_at_a_time_that_is_not_a_number_is_never_fresh():
    """Regression: ``abs(now - nan) > window`` is False, so a grant signed "at NaN"
    (msgpack carries it) was fresh for ever and its nonce forgotten after a minute."""
    grant = sign_grant(SECRET, "deploy", "a", at=float("nan"))
    with pytest.raises(GrantError):
        check_fresh(grant, T0)


def test_authorize_takes_a_good_grant_once():
    apps = cluster_apps()
    wire = sign_grant(SECRET, "deploy", "a", at=time.time()).to_wire()
    grant = apps.authorize("deploy", "a", wire)
    assert grant is not None and grant.to_wire() == wire
    with pytest.raises(Unauthorized, match="used before"):
        apps.authorize("deploy", "a", wire)


def test_authorize_refuses_a_missing_grant_naming_the_secret_option():
    with pytest.raises(Unauthorized, match="--cluster-secret-file"):
        cluster_apps().authorize("undeploy", "a", None)


@pytest.mark.parametrize("wire", [
    sign_grant(OTHER_SECRET, "deploy", "a", at=time.time() + 3600).to_wire(),
    {"op": "deploy", "app": "a"},
    "a grant",
    ])
def test_authorize_refuses_a_wrong_grant_with_unauthorized(wire):
    with pytest.raises(Unauthorized, match="refused"):
        cluster_apps().authorize("deploy", "a", wire)


@pytest.mark.parametrize("op, app, age, match", [
    ("undeploy", "a", 0, "not deploy"),
    ("deploy", "b", 0, "not deploy 'a'"),
    ("deploy", "a", GRANT_WINDOW + 1, "NTP"),
    ])
def test_authorize_refuses_a_grant_for_another_change_or_a_stale_one(op, app, age, match):
    wire = sign_grant(SECRET, op, app, at=time.time() - age).to_wire()
    with pytest.raises(Unauthorized, match=match):
        cluster_apps().authorize("deploy", "a", wire)


def test_authorize_without_a_secret_returns_none():
    apps = cluster_apps(secret=None)
    assert apps.authorize("deploy", "a", None) is None
    assert apps.authorize("deploy", "a", {"anything": 1}) is None


# -- the catalog file ----------------------------------------------------------------------------

def some_catalog() -> Catalog:
    return Catalog([deploy("a", 0, version=1, digest="00ff", origin="n1"),
                    deploy("b", 3, version=2, digest="abcd", origin="n2", grant=grant_for("deploy", "b", nonce="nonce-b-1")),
                    tombstone("c", 7, origin="n3", grant=grant_for("undeploy", "c", nonce="nonce-c-1"))])


def test_the_catalog_file_reads_back_what_was_saved(tmp_path):
    catalog = some_catalog()
    CatalogFile(tmp_path).save(catalog)
    records = CatalogFile(tmp_path).load()
    assert records == catalog.records()
    assert isinstance(records[1].grant, Grant) and isinstance(records[1].grant.sig, bytes)
    assert Catalog(records).fingerprint() == catalog.fingerprint()


def test_no_catalog_file_is_an_empty_catalog(tmp_path):
    assert CatalogFile(tmp_path).load() == []


@pytest.mark.parametrize("content", [
    b"",                                                          # cut before anything
    msgpack.packb(some_catalog().to_wire(), use_bin_type=True)[:-5],   # cut short
    b"\xc1",                                                       # not msgpack
    msgpack.packb({"records": []}),                                # not a list
    msgpack.packb([{"name": "a"}]),                                # a record without a generation
    msgpack.packb([{"name": "a", "generation": 1, "deployed": True, "digest": 5}]),  # digest not str
    msgpack.packb([{"name": "a", "generation": 1, "deployed": False,
                    "grant": {"op": "undeploy", "app": "a"}}]),     # a broken grant
    ], ids=["empty", "cut", "garbage", "map", "no-generation", "int-digest", "bad-grant"])
def test_a_corrupt_catalog_file_is_moved_aside_and_logged(tmp_path, caplog, content):
    path = tmp_path / CATALOG_FILE
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="engine.cluster"):
        assert CatalogFile(tmp_path).load() == []
    assert not path.exists()
    assert (tmp_path / (CATALOG_FILE + ".bad")).read_bytes() == content
    assert any(r.levelno == logging.ERROR and CATALOG_FILE in r.getMessage() for r in caplog.records)
    CatalogFile(tmp_path).save(some_catalog())                    # and the node goes on
    assert CatalogFile(tmp_path).load() == some_catalog().records()


def test_saving_leaves_no_temporary_file_and_replaces_a_stale_one(tmp_path):
    (tmp_path / (CATALOG_FILE + ".tmp")).write_bytes(b"half of a crashed save")
    file = CatalogFile(tmp_path)
    file.save(Catalog())
    file.save(some_catalog())
    assert sorted(os.listdir(tmp_path)) == [CATALOG_FILE]
    assert file.load() == some_catalog().records()


def test_a_save_that_fails_before_the_rename_leaves_the_old_catalog(tmp_path, monkeypatch):
    file = CatalogFile(tmp_path)
    file.save(some_catalog())

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        file.save(Catalog([tombstone("a", 9)]))
    monkeypatch.undo()
    assert file.load() == some_catalog().records()


def test_cluster_apps_reads_its_catalog_back_on_open(tmp_path):
    apps = cluster_apps()
    apps.open(tmp_path)
    apps.change("a", deployed=True, grant=grant_for("deploy", "a"), version=1, digest="d1")
    undone = apps.change("a", deployed=False, grant=grant_for("undeploy", "a"))
    again = cluster_apps()
    again.open(tmp_path)
    assert again.catalog.get("a") == undone
    assert again.catalog.next_generation("a") == 3


# -- merging: conflicts and refusals -------------------------------------------------------------

def conflicting_deploys() -> tuple[AppRecord, AppRecord]:
    """Two deploys of one app at the same generation, from two nodes: the second wins."""
    loser = deploy("app", 1, version=1, digest="1111aaaa", origin="n1", grant=grant_for("deploy", "app"))
    winner = deploy("app", 1, version=1, digest="2222bbbb", origin="n2", grant=grant_for("deploy", "app"))
    assert winner.beats(loser)
    return loser, winner


def conflict_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "conflicting" in r.getMessage()]


def test_merge_counts_and_logs_a_conflict_naming_both_versions_and_the_winner(caplog):
    loser, winner = conflicting_deploys()
    apps = cluster_apps("n3")
    with caplog.at_level(logging.INFO, logger="engine.cluster"):
        assert apps.merge([loser], source="n1") == [loser]
        assert apps.merge([winner], source="n2") == [winner]
        apps.merge([loser], source="n1")                            # heard again: same conflict
    assert apps.stats["conflicts"] == 1
    [message] = conflict_warnings(caplog)
    assert loser.label in message and winner.label in message
    assert f"{winner.label} wins" in message


def test_merge_counts_a_conflict_whichever_deploy_arrives_first(caplog):
    """The node that holds the winner (say, the one that made it) must see the conflict
    too when the losing deploy reaches it; and once, however often it is heard."""
    loser, winner = conflicting_deploys()
    apps = cluster_apps("n2")
    with caplog.at_level(logging.INFO, logger="engine.cluster"):
        apps.merge([winner], source="n2")
        assert apps.merge([loser], source="n1") == []
        apps.merge([loser], source="n3")
    assert apps.stats["conflicts"] == 1
    [message] = conflict_warnings(caplog)
    assert loser.label in message and f"{winner.label} wins" in message


def test_a_newer_generation_or_a_tombstone_is_no_conflict(caplog):
    loser, winner = conflicting_deploys()
    apps = cluster_apps()
    with caplog.at_level(logging.INFO, logger="engine.cluster"):
        apps.merge([loser], source="n1")
        apps.merge([deploy("app", 2, digest="3333", grant=grant_for("deploy", "app"))], source="n2")
        apps.merge([tombstone("app", 2, grant=grant_for("undeploy", "app"))], source="n3")
    assert apps.stats["conflicts"] == 0 and not conflict_warnings(caplog)


def test_merge_refuses_and_counts_records_whose_grant_does_not_check(caplog):
    apps = cluster_apps()
    good = deploy("a", 1, grant=grant_for("deploy", "a"))
    forged = [deploy("b", 5, grant=grant_for("deploy", "b", OTHER_SECRET)),
              tombstone("a", 6, grant=grant_for("deploy", "a")),
              tombstone("a", 7, grant=grant_for("undeploy", "b")),
              tombstone("a", 8)]
    with caplog.at_level(logging.WARNING, logger="engine.cluster"):
        assert apps.merge([*forged, good], source="a stranger") == [good]
    assert apps.stats["refused_records"] == 4
    assert apps.catalog.records() == [good]
    assert sum("refused" in r.getMessage() and "a stranger" in r.getMessage() for r in caplog.records) == 4


@pytest.mark.parametrize("field, value", [("digest", 5), ("digest", [1]), ("digest", b"\x01"),
                                          ("origin", {}), ("origin", 3)])
def test_a_record_whose_digest_or_origin_is_not_a_string_is_refused_with_value_error(field, value):
    """Regression: such a record was accepted, then ranking it against a held record or
    logging its label raised TypeError, which the status exchange does not catch (a
    peer's catalog could end the node)."""
    wire = {"name": "a", "generation": 2, "deployed": True, "digest": "aa", "origin": "n1", field: value}
    with pytest.raises(ValueError, match=field):
        Catalog.records_from_wire([wire])


async def test_divergence_names_each_app_that_differs_from_the_catalog(monkeypatch):
    """What ``engine nodes`` prints as DIVERGED: an app running other content than the
    catalog's winner, one the cluster undeployed still running, one missing here."""
    import types

    import engine.cluster.apps as apps_module

    apps = cluster_apps("n1")
    digests = {"a": "aaaa1111", "b": "bbbb2222"}
    monkeypatch.setattr(apps_module, "make_bundle",
                        lambda manifest, name, limit: {"digest": digests[name]})
    for name in ("a", "b"):
        apps.node.apps[name] = types.SimpleNamespace(
            state="running", manifest=types.SimpleNamespace(version=1))
    await apps.ensure_digests()              # generation-0 records of what runs here
    assert apps.divergence() == {}
    apps.merge([deploy("a", 1, digest="cccc3333", grant=grant_for("deploy", "a")),
                tombstone("b", 1, grant=grant_for("undeploy", "b")),
                deploy("c", 1, digest="dddd4444", grant=grant_for("deploy", "c"))], source="n2")
    assert apps.divergence() == {
        "a": "runs aaaa1111 here, cluster runs v1@cccc3333",
        "b": "undeployed in the cluster, still running here",
        "c": "missing here (cluster runs v1@dddd4444)"}
