"""Fuzz the control endpoint's seal (transport/seal.py): a node's ``SealGate`` and a
client's ``SealedClient``, which decide whether a frame comes from a holder of the
node's token.

Properties:

- what a client seals opens at the gate to the same frame, marked sealed, and the
  answer the gate's guard seals opens at the client; the sealed bytes carry the frame
  (a MAC hides nothing) but nothing opens them without the key;
- any bytes at all: a plain frame passes through marked unsealed (the handler decides
  what an unsealed caller may do), anything else raises ``Refused`` or ``CodecError``,
  never another exception, and never comes out marked sealed;
- a sealed frame altered anywhere, sealed with another token, replayed, or sealed
  outside the clock window, never comes out marked sealed;
- a client takes from the server only frames sealed with its key, or plain frames of
  nothing but ERRORs (how a server that could not verify it says why).
"""
from __future__ import annotations

from hypothesis import given, strategies as st

from transport.codec import Kind, decode_lists, encode_envelope, join_frame
from transport.errors import CodecError
from transport.rpc.handlers import Refused
from transport.seal import MARK, SealedClient, SealGate, SealKey

from damage import BYTE_DAMAGE, damaged

SECRETS = st.binary(min_size=1, max_size=16)
FRAMES = st.binary(max_size=60)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def opened(gate: SealGate, wire: bytes) -> tuple[bytes, bool] | None:
    """(frame, sealed) as the gate lets it in, or None if it refused it."""
    try:
        frame, guard = gate.open(wire)
    except (Refused, CodecError):
        return None
    return frame, guard is not None


@given(SECRETS, st.lists(FRAMES, min_size=1, max_size=5), FRAMES)
def test_a_sealed_frame_opens_sealed_once_and_its_answer_opens_at_the_client(secret, frames, answer):
    clock = Clock()
    key = SealKey.from_secret(secret)
    client, gate = SealedClient(key, clock=clock), SealGate([key], clock=clock)
    for frame in frames:
        wire = client.seal(frame)
        frame_in, guard = gate.open(wire)
        assert frame_in == frame and guard is not None
        assert client.open(guard.seal(answer)) == answer
        assert opened(gate, wire) is None, "a replayed frame was let in again"


@given(SECRETS, st.binary(max_size=120))
def test_any_bytes_pass_unsealed_or_are_refused(secret, wire):
    gate = SealGate([SealKey.from_secret(secret)])
    result = opened(gate, wire)
    if result is not None:
        frame, sealed = result
        assert not sealed and frame == wire and wire[:1] != bytes([MARK])


@given(st.data(), SECRETS, FRAMES)
def test_a_sealed_frame_changed_or_misused_never_opens_sealed(data, secret, frame):
    clock = Clock()
    key = SealKey.from_secret(secret)
    wire = SealedClient(key, clock=clock).seal(frame)
    gate = SealGate([key], clock=clock)
    how = data.draw(st.sampled_from(["flip", "cut", "extend", "token", "purpose", "early", "late"]))
    if how in BYTE_DAMAGE:
        wire = damaged(data, wire, how)
    elif how == "token":
        gate = SealGate([SealKey.from_secret(data.draw(SECRETS.filter(lambda s: s != secret)))], clock=clock)
    elif how == "purpose":
        gate = SealGate([SealKey.from_secret(secret, b"other")], clock=clock)
    else:
        clock.now += (-1 if how == "early" else 1) * data.draw(st.floats(31.0, 1e7))
    result = opened(gate, wire)
    assert result is None or not result[1], f"{how}: a changed frame opened as sealed"


@given(SECRETS, st.one_of(st.binary(max_size=80),
                          st.lists(st.tuples(st.sampled_from([int(Kind.ERROR), int(Kind.RESULT)]),
                                             st.integers(0, 9)), max_size=3).map(
                              lambda envs: join_frame([encode_envelope(k, s, {"code": "x"}) for k, s in envs]))))
def test_a_client_takes_only_sealed_answers_or_plain_errors(secret, wire):
    client = SealedClient(SealKey.from_secret(secret))
    try:
        frame = client.open(wire)
    except CodecError:
        return
    assert frame == wire and wire[:1] != bytes([MARK])   # a plain frame, let in as it is
    envelopes = decode_lists(frame)
    assert envelopes and all(kind == Kind.ERROR for kind, _, _ in envelopes)
