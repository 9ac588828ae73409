"""Fuzz what the mesh takes from strangers: discovery datagrams (transport/mesh/peers.py),
the replay window both beacons and sealed frames rely on (transport/mesh/replay.py),
and sealed frames themselves (transport/mesh/sealing.py, ``FrameSigner``).

Properties:

- ``decode_datagram`` of any bytes, with or without a secret, returns a Datagram or
  raises ``BadDatagram``, nothing else; what ``encode_datagram`` makes decodes to the
  same beacon, op, ask, sequence number and time;
- a signed datagram changed anywhere (a byte altered, cut short, lengthened), or
  signed with another secret, is refused by a holder of the secret; an unsigned one
  is refused where a secret is set;
- the replay window never accepts a (sender, counter) twice, nor a time outside its
  clock window, whatever the order, the senders and the evictions; a sender's
  in-order messages inside the window are all accepted;
- a sealed frame opens to what was sealed; altered anywhere, sealed for another
  purpose or with another secret, sent back to its sender, or replayed, it is refused
  with ``CodecError``; any bytes at all raise only ``CodecError``; the sealed bytes do
  not contain the frame (it is encrypted).
"""
from __future__ import annotations

from hypothesis import example, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from transport.errors import CodecError
from transport.mesh.peers import (MAGIC, MAX_DATAGRAM, ROLES, BadDatagram, Beacon, Datagram, decode_datagram,
                                  encode_datagram)
from transport.mesh.replay import ReplayWindow
from transport.mesh.sealing import HEAD, FrameSigner

from damage import BYTE_DAMAGE, damaged

SECRETS = st.binary(min_size=1, max_size=12)
NAMES = st.text(max_size=10)
beacons = st.builds(Beacon, id=st.text(min_size=1, max_size=12), name=NAMES, role=st.sampled_from(ROLES),
                    namespace=NAMES, key=NAMES, types=st.lists(NAMES, max_size=3).map(tuple),
                    endpoint=NAMES, host=NAMES, pid=st.integers(-2**63, 2**63 - 1))
times = st.integers(0, 4_102_444_800_000).map(lambda ms: ms / 1000)   # whole ms, as on the wire


def decoded_or_refused(data: bytes, **kw: object) -> Datagram | None:
    try:
        dgram = decode_datagram(data, **kw)  # type: ignore[arg-type]
    except BadDatagram:
        return None
    assert isinstance(dgram, Datagram) and isinstance(dgram.beacon, Beacon)
    return dgram


# -- datagrams ----------------------------------------------------------------------------

# Garbage in every layer: bytes, a header then bytes, a header then msgpack of anything.
garbage_wire = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
                            | st.text(max_size=6)
                            | st.binary(max_size=6),
                            lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.sampled_from(["op", "ask", "b", "sq", "ts", "id", "n", "r", "t",
                                                               "e", "p", "x"]) | st.text(max_size=3),
                                              inner, max_size=6), max_leaves=12)


@st.composite
def datagram_bytes(draw: st.DrawFn) -> bytes:
    import msgpack
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=120))
    head = MAGIC + bytes([draw(st.sampled_from([1, 1, 0, 2])), draw(st.integers(0, 255))])
    if kind == 1:
        return head + draw(st.binary(max_size=120))
    body = msgpack.packb(draw(garbage_wire), use_bin_type=True)
    return head + body + draw(st.sampled_from([b"", b"\x00" * 32]))


@given(datagram_bytes(), st.none() | SECRETS, st.booleans())
@example(b"ETMB\x01\x00" + b"\x91" * 20_000, None, True)   # nested past msgpack's depth
@example(b"ETMB\x01\x00" + b"x" * (MAX_DATAGRAM + 1), None, True)
def test_any_datagram_decodes_or_is_refused_with_bad_datagram(data, secret, require_auth):
    dgram = decoded_or_refused(data, secret=secret, require_auth=require_auth)
    if dgram is not None:
        assert len(data) <= MAX_DATAGRAM and dgram.op in ("hello", "bye")
        if secret is not None and require_auth:
            assert dgram.signed and dgram.verified, "a datagram taken unverified in a mesh with a secret"
        if secret is None and require_auth:
            assert not dgram.signed


@given(st.sampled_from(["hello", "bye"]), beacons, st.booleans(), st.none() | SECRETS,
       st.integers(1, 2**63 - 1), times)
def test_a_datagram_round_trips(op, beacon, ask, secret, seq, at):
    data = encode_datagram(op, beacon, ask=ask, secret=secret, seq=seq, at=at)
    dgram = decode_datagram(data, secret=secret)
    assert (dgram.op, dgram.beacon, dgram.ask, dgram.seq) == (op, beacon, ask, seq)
    assert abs(dgram.at - at) < 0.0011  # carried as whole milliseconds (cut, not rounded)
    assert dgram.signed is dgram.verified is (secret is not None)


@given(st.data(), beacons, SECRETS, st.integers(1, 2**40), times)
def test_a_signed_datagram_changed_anywhere_is_refused(data, beacon, secret, seq, at):
    signed = encode_datagram("hello", beacon, secret=secret, seq=seq, at=at)
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "other-secret", "unsigned"]))
    if how in BYTE_DAMAGE:
        changed = damaged(data, signed, how)
    elif how == "other-secret":
        other = data.draw(SECRETS.filter(lambda s: s != secret))
        changed = encode_datagram("hello", beacon, secret=other, seq=seq, at=at)
    else:
        changed = encode_datagram("hello", beacon, seq=seq, at=at)
    assert decoded_or_refused(changed, secret=secret) is None, f"{how}: taken"


@given(beacons, SECRETS, st.integers(1, 2**40), times)
def test_without_the_secret_a_signed_datagram_is_refused_unless_only_watched(beacon, secret, seq, at):
    signed = encode_datagram("hello", beacon, secret=secret, seq=seq, at=at)
    assert decoded_or_refused(signed) is None
    seen = decode_datagram(signed, require_auth=False)  # the monitor: shown, marked unverified
    assert seen.signed and not seen.verified and seen.beacon == beacon


# -- the replay window ----------------------------------------------------------------------

SKEW = 30.0


class ReplayMachine(RuleBasedStateMachine):
    """Messages of a few senders, in any order, at any time, and copies of them sent
    again, against a small window and table: no message is taken twice, nothing outside
    the clock window is taken.  (A message is its (sender, counter, time): only the
    holder of the key makes new ones, and it never reuses a counter.)"""

    @initialize(window=st.integers(1, 16), max_senders=st.integers(1, 4))
    def start(self, window: int, max_senders: int) -> None:
        self.replay: ReplayWindow[str] = ReplayWindow(max_skew=SKEW, window=window, max_senders=max_senders)
        self.now = 1000.0
        self.counters = dict.fromkeys("abcdef", 0)
        self.accepted: set[tuple[str, int, float]] = set()
        self.sent: list[tuple[str, int, float]] = []

    @rule(sender=st.sampled_from("abcdef"), skip=st.integers(1, 20),
          age=st.sampled_from([0.0, 1.0, -1.0, 29.0, 31.0, -31.0, 1e9]))
    def a_message(self, sender: str, skip: int, age: float) -> None:
        """The sender's next message (some of its messages never arrive: ``skip``)."""
        self.counters[sender] += skip
        message = (sender, self.counters[sender], self.now - age)
        self.sent.append(message)
        self.offer(*message)

    @rule(data=st.data())
    def a_copy(self, data: st.DataObject) -> None:
        """A message sent again: a replay, or a late copy of one that got lost."""
        if self.sent:
            self.offer(*data.draw(st.sampled_from(self.sent)))

    @rule(dt=st.sampled_from([0.5, 5.0, 40.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    def offer(self, sender: str, counter: int, at: float) -> None:
        verdict = self.replay.accept(sender, counter, at, self.now)
        if verdict is None:
            assert (sender, counter, at) not in self.accepted, f"{sender} #{counter} accepted twice"
            assert abs(self.now - at) <= SKEW, "a message outside the clock window accepted"
            self.accepted.add((sender, counter, at))

    @invariant()
    def memory_is_bounded(self) -> None:
        assert len(self.replay) <= self.replay.max_senders


TestReplayMachine = ReplayMachine.TestCase
TestReplayMachine.settings = settings(max_examples=settings.default.max_examples // 2,
                                      stateful_step_count=50, deadline=None)


@given(st.integers(1, 64), st.lists(st.integers(1, 5), min_size=1, max_size=60))
def test_a_senders_messages_in_order_are_all_accepted(window, steps):
    replay: ReplayWindow[str] = ReplayWindow(max_skew=SKEW, window=window, max_senders=1)
    counter, now = 0, 0.0
    for step in steps:
        counter += step
        now += 0.1
        assert replay.accept("a", counter, now, now) is None
        assert replay.accept("a", counter, now, now) is not None  # and once only


# -- sealed frames --------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@given(SECRETS, st.binary(min_size=1, max_size=8),  # (purpose b"" opens nothing: a Publisher's)
       st.lists(st.binary(min_size=8, max_size=60), min_size=1, max_size=6))
def test_a_sealed_frame_opens_once_to_what_was_sealed_and_hides_it(secret, purpose, frames):
    clock = Clock()
    sender = FrameSigner(secret, purpose, clock=clock)
    receiver = FrameSigner(secret, purpose, clock=clock)
    sealed = [sender.seal(f) for f in frames]
    for frame, wire in zip(frames, sealed):
        assert frame not in wire[HEAD:], "a sealed frame carries its plaintext"
        assert receiver.open(wire) == frame
    for wire in sealed:  # every one again: replays
        try:
            receiver.open(wire)
        except CodecError:
            continue
        raise AssertionError("a replayed frame was opened")
    assert receiver.stats["replayed"] == len(sealed)


@given(st.data(), SECRETS, st.binary(min_size=1, max_size=40))
def test_a_sealed_frame_altered_or_misdirected_is_refused(data, secret, frame):
    clock = Clock()
    wire = FrameSigner(secret, b"request:a", clock=clock).seal(frame)
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "purpose", "secret", "own", "stale"]))
    receiver = FrameSigner(secret, b"request:a", clock=clock)
    if how in BYTE_DAMAGE:
        wire = damaged(data, wire, how)
    elif how == "purpose":
        receiver = FrameSigner(secret, b"request:b", clock=clock)
    elif how == "secret":
        receiver = FrameSigner(data.draw(SECRETS.filter(lambda s: s != secret)), b"request:a", clock=clock)
    elif how == "own":
        sender = FrameSigner(secret, b"request:a", clock=clock)
        wire, receiver = sender.seal(frame), sender
    else:
        clock.now += data.draw(st.sampled_from([-1.0, 1.0])) * data.draw(st.floats(31.0, 1e6))
    try:
        receiver.open(wire)
    except CodecError:
        assert receiver.rejected == 1
        return
    raise AssertionError(f"{how}: a frame opened that should not have")


@given(SECRETS, st.binary(max_size=120))
def test_any_bytes_offered_as_a_sealed_frame_raise_only_codec_error(secret, wire):
    receiver = FrameSigner(secret, b"p")
    try:
        receiver.open(wire)
    except CodecError:
        return
    raise AssertionError("random bytes opened as a sealed frame")
