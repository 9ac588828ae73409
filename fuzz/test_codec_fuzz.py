"""Fuzz the wire codec: no input bytes make it raise anything but CodecError, every
encodable envelope list survives a round trip, no value makes the encoder raise
anything but CodecError, and decoding costs memory in proportion to the bytes read."""
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from transport.codec import (MIN_VALUE_BUDGET, Envelope, decode, decode_lists, encode, encode_envelope,
                             encode_one, join_frame, pack, unpack)
from transport.errors import CodecError, RemoteError, body_to_error, error_to_body

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
envelopes = st.builds(Envelope, st.integers(0, 255), st.integers(0, 2**32), payloads)


@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_only_raises_codec_error(data):
    try:
        result = decode(data)
    except CodecError:
        return
    assert all(isinstance(e, Envelope) for e in result)


@given(st.lists(payloads, max_size=5))
def test_decode_wellformed_msgpack_of_wrong_shape(values):
    try:
        decode(msgpack.packb(values))
    except CodecError:
        pass


@given(st.lists(envelopes, max_size=20))
def test_round_trip(batch):
    assert decode(encode(batch)) == batch


@given(st.one_of(st.binary(max_size=200), st.lists(payloads, max_size=5).map(msgpack.packb),
                 st.lists(envelopes, max_size=8).map(encode)))
def test_the_hot_path_decoder_accepts_and_refuses_exactly_what_decode_does(data):
    try:
        expected = decode(data)
    except CodecError:
        try:
            decode_lists(data)
        except CodecError:
            return
        raise AssertionError("decode_lists accepted a frame decode refuses")
    assert [Envelope(*env) for env in decode_lists(data)] == expected


@given(st.lists(envelopes, max_size=20))
def test_envelopes_packed_one_by_one_join_into_the_frame_encode_makes(batch):
    assert join_frame([encode_envelope(*env) for env in batch]) == encode(batch)


@given(payloads)
def test_error_bodies_always_rebuild_a_remote_error(body):
    assert isinstance(body_to_error(body), RemoteError)


@given(st.text(max_size=30), st.booleans())
def test_error_round_trip_keeps_code_type_and_message(message, retryable):
    err = body_to_error(error_to_body(RemoteError(message, type="X", retryable=retryable)))
    assert (err.message, err.type, err.retryable) == (message, "X", retryable)


# -- what senders may hand the encoder: anything, and only CodecError back ------------------

class _Opaque:
    """A value msgpack has no encoding for."""


unencodable = st.recursive(
    payloads | st.integers(min_value=2**64, max_value=2**70) | st.integers(max_value=-2**63 - 1)
    | st.builds(_Opaque) | st.sets(st.integers(0, 3), max_size=2) | st.complex_numbers(max_magnitude=1e6)
    | st.frozensets(st.text(max_size=2), max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    | st.tuples(inner, inner),
    max_leaves=8,
)


@given(st.integers(0, 255), st.integers(0, 2**32), unencodable)
def test_encoding_any_value_packs_it_or_raises_codec_error(kind, sid, body):
    """A reply a handler returned is packed where it is sent: a value msgpack cannot
    carry must fail that one envelope with CodecError (the server answers its caller
    with bad-message), never with TypeError or OverflowError out of a writer task."""
    for pack_it in (lambda: encode([Envelope(kind, sid, body)]), lambda: encode_envelope(kind, sid, body),
                    lambda: encode_one(kind, sid, body), lambda: pack(body)):
        try:
            data = pack_it()
        except CodecError:
            continue
        assert isinstance(data, bytes)
    # ... and the packer is reusable after a failure: the next envelope packs whole.
    assert decode(join_frame([encode_envelope(1, 2, "next")])) == [Envelope(1, 2, "next")]


@given(st.binary(max_size=200))
def test_unpacking_a_foreign_payload_raises_only_codec_error(data):
    """``unpack`` reads what nng-server / sink / pubsub clients in any language send."""
    try:
        unpack(data)
    except CodecError:
        pass


@given(payloads)
def test_foreign_payloads_round_trip(value):
    assert unpack(pack(value)) == value


# -- bounded memory -----------------------------------------------------------------------

# msgpack values of one to three bytes whose decoded objects are the largest for their
# size: an empty list or map costs ~60-80 bytes of objects per input byte, whatever the
# decoder does; what it must never do is allocate for a length it was *told* (an array
# "of 4 billion" in 5 bytes) rather than one it has read.
ATOMS = [b"\xc0", b"\x90", b"\x80", b"\xa0", b"\x91\xc0", b"\x93\x01\x01\x90", b"\xcd\x12\x34"]
AMPLIFICATION = 100     # bytes of live Python objects per byte of frame, at most
SLACK = 256 * 1024      # plus this much, whatever the frame


def _array_header(n: int) -> bytes:
    return b"\xdd" + n.to_bytes(4, "big")


def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except CodecError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@settings(max_examples=max(10, settings.default.max_examples // 10))
@given(st.sampled_from(ATOMS), st.integers(1, 20_000), st.integers(0, 2**32 - 1), st.booleans())
def test_decoding_builds_at_most_a_bounded_multiple_of_the_frame(atom, count, claimed, honest):
    """Memory is bounded by what was read: a frame of N bytes never costs more than
    ``AMPLIFICATION * N`` (+ a constant) to decode, however many elements its headers
    claim.  (Past MIN_VALUE_BUDGET bytes the codec's limits cut that further: the test
    at the end.)"""
    frame = _array_header(count if honest else claimed) + atom * count
    assert _peak_while(lambda: decode_lists(frame)) <= AMPLIFICATION * len(frame) + SLACK


@pytest.mark.parametrize("atom", ATOMS, ids=lambda a: a.hex())
def test_a_large_frame_of_the_costliest_values_stays_bounded(atom):
    count = (256 << 10) // len(atom)
    frame = _array_header(count) + atom * count
    assert _peak_while(lambda: decode_lists(frame)) <= AMPLIFICATION * len(frame) + SLACK


@pytest.mark.parametrize("header", [b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                                    b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                                    b"\x91" * 100_000], ids=["array", "map", "bin", "str", "deep"])
def test_lengths_a_frame_claims_but_does_not_carry_cost_nothing(header):
    """An array (map, bin, str) header announcing 4 GiB in five bytes, or a nesting
    100,000 deep: refused with CodecError, at once and without allocating for it."""
    with pytest.raises(CodecError):
        decode_lists(header)
    assert _peak_while(lambda: decode_lists(header)) <= SLACK + 4 * len(header)


def test_a_frame_announcing_more_values_than_its_size_allows_is_refused_at_the_header():
    """The codec's decode limits (transport/codec.py: a frame over MIN_VALUE_BUDGET bytes
    may hold len // BYTES_PER_VALUE values): 2 MiB announcing an array of 2 Mi nils, one
    byte each, is refused before the array is built (which would take 16 MiB of pointers
    alone, and a frame of 16 MiB of empty maps over a gigabyte).  Foreign payloads too."""
    count = 2 * MIN_VALUE_BUDGET
    frame = _array_header(count) + b"\xc0" * count
    for decoder in (decode_lists, unpack):
        with pytest.raises(CodecError):
            decoder(frame)
        assert _peak_while(lambda: decoder(frame)) <= SLACK
