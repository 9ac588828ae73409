"""The pure discovery core: table, scoping, matching, round robin, datagrams, breaker."""
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from transport.mesh.breaker import CircuitBreaker, backoff
from transport.mesh.peers import (
    BadDatagram, Beacon, PeerTable, decode_datagram, encode_datagram, matches, with_host,
)

ME = Beacon(id="me", name="me", role="requester", namespace="ns", key="k")
IDS = [f"p{i}" for i in range(6)]
TYPES = ["a", "b", "user.created", "user.*", "**"]


def beacon(pid, role="responder", ns="ns", key="k", types=("a",)):
    return Beacon(id=pid, name=pid, role=role, namespace=ns, key=key, types=tuple(types),
                  endpoint=f"tcp://127.0.0.1:{1000 + IDS.index(pid) if pid in IDS else 1}")


class TableMachine(RuleBasedStateMachine):
    """The table against a dict model: what is kept, when it expires, who serves what."""

    def __init__(self):
        super().__init__()
        self.table = PeerTable(expiry=3.0, me=ME)
        self.model: dict[str, tuple[Beacon, float]] = {}
        self.now = 0.0

    @rule(pid=st.sampled_from(IDS + ["me"]), ns=st.sampled_from(["ns", "other"]),
          key=st.sampled_from(["k", "x"]), role=st.sampled_from(["responder", "publisher"]),
          types=st.lists(st.sampled_from(TYPES), max_size=3))
    def hear(self, pid, ns, key, role, types):
        b = beacon(pid, role, ns, key, types)
        self.table.observe(b, self.now)
        if pid != "me" and ns == "ns" and key == "k":
            self.model[pid] = (b, self.now)

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

    @rule(pid=st.sampled_from(IDS))
    def bye(self, pid):
        assert (self.table.forget(pid) is not None) == (pid in self.model)
        self.model.pop(pid, None)

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


def test_datagram_roundtrip_and_secret():
    b = beacon("p0", types=("a", "user.*"))
    d = decode_datagram(encode_datagram("hello", b, ask=True))
    assert (d.op, d.beacon, d.ask, d.signed) == ("hello", b, True, False)
    signed = encode_datagram("hello", b, secret=b"s3cret")
    assert decode_datagram(signed, secret=b"s3cret").verified
    for data, secret in [(signed, b"wrong"), (signed, None),
                         (encode_datagram("hello", b), b"s3cret")]:
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
