"""Fuzz the wire codec: no input bytes make it raise anything but CodecError, and
every encodable envelope list survives a round trip."""
import msgpack
from hypothesis import given, settings, strategies as st

from transport.codec import Envelope, decode, decode_lists, encode, encode_envelope, join_frame
from transport.errors import CodecError, RemoteError, body_to_error, error_to_body

payloads = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
envelopes = st.builds(Envelope, st.integers(0, 255), st.integers(0, 2**32), payloads)


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_decode_arbitrary_bytes_only_raises_codec_error(data):
    try:
        result = decode(data)
    except CodecError:
        return
    assert all(isinstance(e, Envelope) for e in result)


@settings(max_examples=300)
@given(st.lists(payloads, max_size=5))
def test_decode_wellformed_msgpack_of_wrong_shape(values):
    try:
        decode(msgpack.packb(values))
    except CodecError:
        pass


@settings(max_examples=300)
@given(st.lists(envelopes, max_size=20))
def test_round_trip(batch):
    assert decode(encode(batch)) == batch


@settings(max_examples=300)
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


@settings(max_examples=300)
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
