"""The pure discovery core: table, scoping, matching, round robin, datagrams, breaker."""
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from transport.mesh.breaker import CircuitBreaker, backoff
from transport.mesh.peers import (
    MAX_PEERS, MAX_PER_SOURCE, BadDatagram, Beacon, PeerTable, decode_datagram, encode_datagram,
    matches, with_host,
)

ME = Beacon(id="me", name="me", role="requester", namespace="ns", key="k")
IDS = [f"p{i}" for i in range(6)]
TYPES = ["a", "b", "user.created", "user.*", "**"]


def beacon(pid, role="responder", ns="ns", key="k", types=("a",)):
    return Beacon(id=pid, name=pid, role=role, namespace=ns, key=key, types=tuple(types),
                  endpoint=f"tcp://127.0.0.1:{1000 + IDS.index(pid) if pid in IDS else 1}")


SOURCES = [("10.0.0.1", 1), ("10.0.0.1", 2), ("10.0.0.2", 1)]


class TableMachine(RuleBasedStateMachine):
    """The table against a dict model: what is kept (at most 4 peers, at most 2 per
    source address), when it expires, who serves what."""

    def __init__(self):
        super().__init__()
        self.table = PeerTable(expiry=3.0, me=ME, max_peers=4, max_per_source=2)
        self.model: dict[str, tuple[Beacon, float]] = {}
        self.source: dict[str, tuple[str, int]] = {}
        self.now = 0.0

    @rule(pid=st.sampled_from(IDS + ["me"]), ns=st.sampled_from(["ns", "other"]),
          key=st.sampled_from(["k", "x"]), role=st.sampled_from(["responder", "publisher"]),
          types=st.lists(st.sampled_from(TYPES), max_size=3), src=st.sampled_from(SOURCES))
    def hear(self, pid, ns, key, role, types, src):
        b = beacon(pid, role, ns, key, types)
        refused = self.table.refused
        self.table.observe(b, self.now, src)
        if pid == "me" or ns != "ns" or key != "k":
            return
        if pid in self.model:
            self.model[pid] = (b, self.now)
            self.source[pid] = src
        elif len(self.model) < 4 and list(self.source.values()).count(src) < 2:
            self.model[pid] = (b, self.now)
            self.source[pid] = src
        else:
            assert self.table.refused == refused + 1

    @rule(dt=st.floats(0, 2.5))
    def tick(self, dt):
        self.now += dt

    @rule()
    def expire(self):
        gone = {b.id for b in self.table.expire(self.now)}
        expected = {pid for pid, (_, t) in self.model.items() if self.now - t > 3.0}
        assert gone == expected
        for pid in expected:
            del self.model[pid]
            del self.source[pid]

    @rule(pid=st.sampled_from(IDS))
    def bye(self, pid):
        assert (self.table.forget(pid) is not None) == (pid in self.model)
        self.model.pop(pid, None)
        self.source.pop(pid, None)

    @invariant()
    def sources_counted(self):
        assert self.table.sources == len(set(self.source.values()))

    @invariant()
    def same_peers(self):
        assert {b.id: b for b in self.table.peers()} == {p: b for p, (b, _) in self.model.items()}

    @invariant()
    def serving_is_filter_of_model(self):
        for event in ["a", "b", "user.created", "user.deleted", "x.y.z"]:
            got = [b.id for b in self.table.serving("responder", event)]
            want = sorted(p for p, (b, _) in self.model.items() if b.role == "responder"
                          and (not b.types or any(matches(t, event) for t in b.types)))
            assert got == want

    @precondition(lambda self: self.model)
    @rule(event=st.sampled_from(["a", "user.created"]))
    def round_robin_is_fair(self, event):
        serving = self.table.serving("responder", event)
        if not serving:
            assert self.table.choose("responder", event) is None
            return
        picks = Counter(self.table.choose("responder", event).id for _ in range(3 * len(serving)))
        assert set(picks) == {b.id for b in serving}
        assert set(picks.values()) == {3}
        excluded = serving[0].id
        for _ in range(len(serving)):
            pick = self.table.choose("responder", event, exclude=[excluded])
            assert pick is None or pick.id != excluded


TestTable = TableMachine.TestCase
TestTable.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@pytest.mark.parametrize("a,b,hit", [
    ("user.*", "user.created", True), ("user.*", "user.created.now", False),
    ("user.**", "user.created.now", True), ("**", "anything.at.all", True),
    ("a", "b", False), ("randomRequest", "randomRequest", True), ("*.x", "y.*", True),
    ("user.*", "order.created", False),
])
def test_wildcards(a, b, hit):
    assert matches(a, b) is hit and matches(b, a) is hit


@given(st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=4))
def test_pattern_matches_its_own_instances(segments):
    pattern = ".".join(segments)
    concrete = ".".join("z" if s == "*" else s for s in segments)
    assert matches(pattern, concrete) and matches("**", concrete)


def test_table_ignores_self_and_other_scopes():
    t = PeerTable(me=ME)
    assert t.observe(Beacon(id="me", name="x", role="responder", namespace="ns", key="k"), 0) is None
    assert t.observe(beacon("p0", ns="rnd"), 0) is None
    assert t.observe(beacon("p1", key="prod"), 0) is None
    assert t.ignored == 2 and len(t) == 0
    assert t.observe(beacon("p2"), 0) == "added"
    assert t.observe(beacon("p2"), 1) is None
    assert t.observe(beacon("p2", types=("b",)), 1) == "changed"
    assert PeerTable().observe(beacon("p0", ns="rnd"), 0) == "added"  # the monitor's table


def test_a_flood_of_beacons_leaves_the_table_bounded():
    # 5,000 fake responders from 5,000 source addresses (spoofed, say), then from one.
    t = PeerTable(me=ME)
    real = beacon("p0")
    assert t.observe(real, 0, ("10.0.0.9", 47474)) == "added"
    for i in range(5000):
        fake = Beacon(id=f"fake{i}", name="f", role="responder", namespace="ns", key="k",
                      types=("a",), endpoint=f"tcp://10.1.{i // 250}.{i % 250}:1")
        t.observe(fake, 0.5, (f"10.1.{i // 250}.{i % 250}", 40000))
    assert len(t) == MAX_PEERS and t.refused == 5001 - MAX_PEERS
    # The peers it knew keep refreshing: the flood does not push them out.
    assert t.observe(real, 1.0, ("10.0.0.9", 47474)) is None and t.last_seen("p0") == 1.0
    assert [b.id for b in t.serving("responder", "a")].count("p0") == 1
    # Once the fakes fall silent they expire, and newcomers find room again.
    assert len(t.expire(4.9)) == MAX_PEERS - 1
    assert t.observe(beacon("p1"), 5.0, ("10.0.0.8", 47474)) == "added"
    one = PeerTable(me=ME)
    for i in range(5000):
        one.observe(Beacon(id=f"fake{i}", name="f", role="responder", namespace="ns",
                           key="k"), 0, ("10.6.6.6", 666))
    assert len(one) == MAX_PER_SOURCE and one.sources == 1


def test_datagram_roundtrip_and_secret():
    b = beacon("p0", types=("a", "user.*"))
    d = decode_datagram(encode_datagram("hello", b, ask=True))
    assert (d.op, d.beacon, d.ask, d.signed) == ("hello", b, True, False)
    signed = encode_datagram("hello", b, secret=b"s3cret", seq=7, at=1700000000.25)
    d = decode_datagram(signed, secret=b"s3cret")
    assert d.verified and (d.seq, d.at) == (7, 1700000000.25)
    # Signed but without a sequence and time: nothing to refuse a replay by.
    for data, secret in [(signed, b"wrong"), (signed, None),
                         (encode_datagram("hello", b), b"s3cret"),
                         (encode_datagram("hello", b, secret=b"s3cret"), b"s3cret")]:
        with pytest.raises(BadDatagram):
            decode_datagram(data, secret=secret)
    tampered = bytearray(signed)
    tampered[10] ^= 1
    with pytest.raises(BadDatagram):
        decode_datagram(bytes(tampered), secret=b"s3cret")
    seen = decode_datagram(signed, require_auth=False)  # the monitor
    assert seen.signed and not seen.verified


@given(st.binary(max_size=300))
def test_garbage_datagrams_raise_only_bad_datagram(data):
    with pytest.raises(BadDatagram):
        decode_datagram(data)
        raise BadDatagram("decoded garbage")  # decoding garbage must not succeed silently


def test_wildcard_endpoint_gets_source_address():
    b = Beacon(id="x", name="x", role="responder", endpoint="tcp://0.0.0.0:5555")
    assert with_host(b, "10.0.0.7").endpoint == "tcp://10.0.0.7:5555"
    loop = Beacon(id="x", name="x", role="responder", endpoint="tcp://127.0.0.1:1")
    assert with_host(loop, "10.0.0.7") is loop


def test_breaker_opens_half_opens_and_closes():
    br = CircuitBreaker(threshold=2, cooldown=1.0)
    assert br.allows(0)
    br.on_failure(0)
    assert br.allows(0)
    br.on_failure(0)
    assert br.state == "open" and not br.allows(0.5)
    assert br.allows(1.0) and br.state == "half-open"
    br.on_dispatch()
    assert not br.allows(1.0)  # one trial at a time
    br.on_failure(1.1)
    assert br.state == "open" and br.current_cooldown == 2.0 and not br.allows(2.0)
    assert br.allows(3.2)
    br.on_dispatch()
    br.on_success()
    assert br.state == "closed" and br.allows(3.3)
    assert backoff(1) < backoff(2) < backoff(3) and backoff(50) == 1.0


class BreakerMachine(RuleBasedStateMachine):
    """The Requester's fast path skips the breaker when ``failures == 0``: that must
    mean closed, allowing, with nothing for on_dispatch/on_success to change."""

    def __init__(self):
        super().__init__()
        self.br = CircuitBreaker(threshold=2, cooldown=1.0, max_cooldown=4.0)
        self.now = 0.0

    @rule(dt=st.floats(0, 5))
    def tick(self, dt):
        self.now += dt

    @rule()
    def ask_and_dispatch(self):
        if self.br.allows(self.now):
            self.br.on_dispatch()

    @rule()
    def fail(self):
        self.br.on_failure(self.now)

    @rule()
    def succeed(self):
        self.br.on_success()

    @invariant()
    def no_failures_means_untouched_closed(self):
        if self.br.failures == 0:
            before = (self.br.state, self.br.current_cooldown, self.br.trial_in_flight)
            assert before == ("closed", 0.0, False) and self.br.allows(self.now)
            self.br.on_dispatch()
            assert (self.br.state, self.br.current_cooldown, self.br.trial_in_flight) == before


TestBreakerFastPathInvariant = BreakerMachine.TestCase
TestBreakerFastPathInvariant.settings = settings(max_examples=200, deadline=None)
