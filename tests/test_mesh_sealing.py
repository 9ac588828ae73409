"""The pure parts of the mesh's defences: sealed frames (encryption, authentication,
replay refusal), the replay window, dial backoff, and a subscriber's gap accounting.
No sockets: time is passed in."""
from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from transport.codec import Kind
from transport.errors import CodecError
from transport.mesh.breaker import DialBackoff
from transport.mesh.pubsub import MAX_GAP, Subscriber
from transport.mesh.replay import REPLAYED, STALE, ReplayWindow
from transport.mesh.sealing import _HEAD, HEAD, OVERHEAD, TAG, FrameSigner

SECRET = b"s3cret"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def pair(clock=None, **kw):
    """A requester's and a responder's guards for one responder ``R``."""
    clock = clock or Clock()
    rq = FrameSigner(SECRET, b"request:R", opens=b"answer:R", clock=clock, **kw)
    rep = FrameSigner(SECRET, b"answer:R", opens=b"request:R", clock=clock, **kw)
    return rq, rep, clock


def test_sealed_frames_round_trip_and_are_unreadable():
    rq, rep, _ = pair()
    frame = b"transfer 100 to mallory" * 3
    sealed = rq.seal(frame)
    assert len(sealed) == len(frame) + OVERHEAD
    assert b"transfer" not in sealed and b"mallory" not in sealed
    assert rep.open(sealed) == frame
    assert rq.open(rep.seal(b"done")) == b"done"
    assert rep.stats == rq.stats == {"forged": 0, "replayed": 0, "stale": 0}


def test_a_replayed_frame_is_refused_and_counted():
    rq, rep, _ = pair()
    frames = [rq.seal(b"req %d" % i) for i in range(5)]
    assert [rep.open(f) for f in frames] == [b"req %d" % i for i in range(5)]
    for f in frames[2:] + frames[:1]:
        with pytest.raises(CodecError, match="replayed"):
            rep.open(f)
    assert rep.stats["replayed"] == 4
    assert rep.open(rq.seal(b"next")) == b"next"  # the sender is not blocked by it


def test_frames_a_little_out_of_order_are_taken_once_each():
    rq, rep, _ = pair()
    frames = [rq.seal(b"%d" % i) for i in range(10)]
    for i in (0, 3, 9, 1, 2, 8, 4, 7, 5, 6):  # (before the first: refused, see replay.py)
        assert rep.open(frames[i]) == b"%d" % i
    for f in frames:
        with pytest.raises(CodecError):
            rep.open(f)


def test_frames_outside_the_clock_window_are_stale():
    rq, rep, clock = pair(max_skew=30.0)
    old = rq.seal(b"old")
    clock.now += 31
    with pytest.raises(CodecError, match="clock window"):
        rep.open(old)
    early = FrameSigner(SECRET, b"request:R", clock=Clock(T0 + 200)).seal(b"from the future")
    with pytest.raises(CodecError, match="clock window"):
        rep.open(early)
    assert rep.stats["stale"] == 2
    skewed = FrameSigner(SECRET, b"request:R", clock=Clock(clock.now - 29)).seal(b"skewed")
    assert rep.open(skewed) == b"skewed"  # within the tolerance


@pytest.mark.parametrize("who", ["wrong secret", "another responder", "reflected",
                                 "an answer as a request", "tampered", "truncated", "plain"])
def test_what_does_not_open(who):
    rq, rep, clock = pair()
    frame = b"payload"
    if who == "wrong secret":
        data = FrameSigner(b"guess", b"request:R", clock=clock).seal(frame)
    elif who == "another responder":
        data = FrameSigner(SECRET, b"request:OTHER", clock=clock).seal(frame)
    elif who == "reflected":  # our own request sent back to us as if an answer
        data = rq.seal(frame)
        with pytest.raises(CodecError):
            rq.open(data)
        return
    elif who == "an answer as a request":
        data = rep.seal(frame)
    elif who == "tampered":
        sealed = bytearray(rq.seal(frame))
        sealed[HEAD + 2] ^= 1
        data = bytes(sealed)
    elif who == "truncated":
        data = rq.seal(frame)[:OVERHEAD - 1]
    else:
        data = frame
    with pytest.raises(CodecError):
        rep.open(data)
    assert rep.rejected == 1


def test_a_tampered_header_fails_the_tag():
    rq, rep, _ = pair()
    sealed = bytearray(rq.seal(b"x"))
    sealed[20] ^= 1  # the counter: also the nonce and authenticated data
    with pytest.raises(CodecError, match="not sealed"):
        rep.open(bytes(sealed))


def test_a_publishers_guard_opens_nothing():
    pub = FrameSigner(SECRET, b"event:P", opens=b"")
    with pytest.raises(CodecError):
        pub.open(FrameSigner(SECRET, b"event:P").seal(b"x"))


def test_forgeries_from_many_senders_cost_no_memory():
    _, rep, _ = pair()
    for _ in range(2000):  # fresh, well-formed headers: each costs a key and a failed tag
        head = _HEAD.pack(0xE2, os.urandom(16), 1, int(T0 * 1e6))
        with pytest.raises(CodecError):
            rep.open(head + os.urandom(TAG + 10))
    assert len(rep._open_aeads) == 0 and len(rep._replay) == 0
    assert rep.stats["forged"] == 2000


# -- the replay window --------------------------------------------------------------

class ReplayMachine(RuleBasedStateMachine):
    """Senders send (each message a fixed counter and send time) and an attacker
    delivers old ones again; against a model of what was accepted: nothing accepted
    twice, nothing outside the clock window, a known sender's next message on time
    (and after the floor) always accepted, memory bounded (three senders kept, of five)."""

    def __init__(self):
        super().__init__()
        self.w: ReplayWindow[str] = ReplayWindow(max_skew=10.0, window=8, max_senders=3)
        self.now = 100.0
        self.sent: dict[str, list[float]] = {s: [] for s in "abcde"}
        self.accepted: set[tuple[str, int]] = set()

    def deliver(self, sender, counter):
        at = self.sent[sender][counter - 1]
        verdict = self.w.accept(sender, counter, at, self.now)
        if abs(self.now - at) > 10.0:
            assert verdict == STALE
        if (sender, counter) in self.accepted:
            assert verdict in (REPLAYED, STALE)
        if verdict is None:
            self.accepted.add((sender, counter))
        return verdict

    @rule(sender=st.sampled_from("abcde"), lag=st.floats(-12, 12, allow_nan=False))
    def send(self, sender, lag):
        known = sender in self.w._senders
        self.sent[sender].append(self.now + lag)
        verdict = self.deliver(sender, len(self.sent[sender]))
        at = self.now + lag      # (what was sent: abs(lag) may be 10.0 where now - at is not)
        if known and abs(self.now - at) <= 10.0 and at > self.w.floor:
            assert verdict is None  # (at or below the floor: it may be a replay, see replay.py)

    @rule(sender=st.sampled_from("abcde"), pick=st.integers(0, 30))
    def replay(self, sender, pick):
        if self.sent[sender]:
            self.deliver(sender, 1 + pick % len(self.sent[sender]))

    @rule(dt=st.floats(0, 6))
    def tick(self, dt):
        self.now += dt

    @invariant()
    def bounded(self):
        assert len(self.w) <= 3


TestReplayMachine = ReplayMachine.TestCase
TestReplayMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_full_window_forgets_without_reopening_replays():
    w: ReplayWindow[int] = ReplayWindow(max_skew=30.0, max_senders=16)
    for sender in range(16):
        assert w.accept(sender, 1, T0 + sender / 100, T0) is None
    assert w.accept(99, 1, T0 + 0.5, T0) is None      # full: the earliest heard are forgotten
    assert len(w) <= 16 and w.floor >= T0
    assert w.accept(0, 1, T0, T0 + 1) == REPLAYED      # forgotten, but its old message stays refused
    assert w.accept(0, 2, T0 + 1, T0 + 1) is None      # and its next one is taken
    later = T0 + 100                                   # all silent past the window: pruned
    assert w.accept(500, 1, later, later) is None and len(w) == 1


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 3000)), max_size=300))
def test_the_window_never_grows_past_its_bound(messages):
    w: ReplayWindow[int] = ReplayWindow(max_senders=32)
    for sender, counter in messages:
        w.accept(sender, counter, T0, T0)
        assert len(w) <= 32


# -- dial backoff -----------------------------------------------------------------------

def test_dial_backoff_doubles_caps_and_forgets_on_success():
    b = DialBackoff(base=1.0, cap=4.0, max_entries=3)
    assert b.allows("p", 0) and b.next_due(0) is None
    assert b.failed("p", 0) == 1.0
    assert not b.allows("p", 0.5) and b.allows("p", 1.0)
    assert b.next_due(0.5) == 1.0
    assert b.failed("p", 1.0) == 3.0 and b.failed("p", 3.0) == 7.0 and b.failed("p", 7.0) == 11.0
    b.succeeded("p")
    assert b.allows("p", 7.5) and b.next_due(7.5) is None
    for i in range(10):
        b.failed(f"q{i}", float(i))
    assert len(b) == 3 and b.next_due(0) == 8.0  # bounded: the earliest due forgotten first


# -- a subscriber's gap accounting (issue 12, item 8) ----------------------------------------

def frame(*seqs):
    return msgpack.packb([[Kind.PUBLISH, s, ["t", s, s]] for s in seqs], use_bin_type=True)


def test_a_gap_no_queue_could_explain_is_a_reset_not_drops():
    sub = Subscriber("s")
    sub._take("pid", "pub", frame(1, 2, 5), None)
    assert sub.stats["dropped"] == 2                     # 3 and 4: lost in the queues
    sub._take("pid", "pub", frame(5 + MAX_GAP), None)
    assert sub.stats["dropped"] == 2 + MAX_GAP - 1       # the widest gap still counted
    sub._take("pid", "pub", frame(2**62, 3, 2**63 + 5), None)  # (3: behind, ignored)
    assert sub.stats["dropped"] == 2 + MAX_GAP - 1 and sub.stats["resets"] == 2
    sub._take("pid", "pub", frame(2**63 + 7), None)       # goes on counting from the reset
    assert sub.stats["dropped"] == 2 + MAX_GAP


def test_with_a_secret_unsealed_events_never_touch_the_counters():
    sub = Subscriber("s", secret="s3cret")
    guard = sub.guard(seals=b"subscriber:x", opens=b"event:P")
    publisher = FrameSigner(b"s3cret", b"event:P")
    sub._take("P", "pub", publisher.seal(frame(1)), guard)
    assert sub.stats["received"] == 1
    for forged in (frame(2**62), FrameSigner(b"guess", b"event:P").seal(frame(2**62)),
                   FrameSigner(b"s3cret", b"event:OTHER").seal(frame(2**62))):
        sub._take("P", "pub", forged, guard)
    assert sub.stats["dropped"] == sub.stats["resets"] == 0 and sub.stats["bad_frames"] == 3
    assert sub.stats["received"] == 1
