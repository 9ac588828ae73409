"""The one wire format: msgpack frames of envelopes.

A *frame* is what one nng message carries: a msgpack array of envelopes, so that
many small messages in flight share one send (batching is where throughput comes
from; see docs/architecture.md).  An *envelope* is ``[kind, sid, body]``:

- ``kind``: a small int from :class:`Kind`, saying what the envelope means;
- ``sid``: the stream (request) id it belongs to, 0 when none;
- ``body``: any msgpack value, its shape fixed by the kind.

Decoding never raises anything but :class:`CodecError`, whatever the bytes, and never
lets a frame cost much more memory than its values are worth (:func:`decode_lists`).

How big a frame may be is each link's business (``max_message``, default
:data:`DEFAULT_MAX_MESSAGE`): the frame's length is checked before it is buffered.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any, Iterable, NamedTuple

import msgpack

from transport.errors import CodecError

# The largest frame a link takes by default (RpcServer, RpcClient, SyncRpcClient,
# FramedStream, the nng drivers): well below what would let a handful of connections
# exhaust a node's memory, above what a node sends in one piece (an app bundle is at
# most 10 MiB).  Bigger data goes as chunked requests or streamed replies.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

# Decode limits.  msgpack builds a Python object per value, and a value can take one
# byte on the wire and 30-70 in memory (a small negative int, an empty map): a 16 MiB
# frame of empty maps would decode into ~1.1 GB.  So a frame may hold at most
# max(MIN_VALUE_BUDGET, len(frame) // BYTES_PER_VALUE) values, no single array or map
# longer than that, and no string, binary or ext value longer than the frame.  A frame
# of at most MIN_VALUE_BUDGET bytes cannot hold more values than that (each takes a
# byte at least), so it is decoded exactly as before, at no cost: the hooks that count
# values run only for larger frames, where their ~0.1 µs per array or map is small
# beside the frame's own decoding.
MIN_VALUE_BUDGET = 1 << 20
BYTES_PER_VALUE = 8


class Kind(IntEnum):
    # Slave protocol (docs/protocol.md)
    HANDSHAKE = 1   # slave -> node: {"pid", "app", "concurrency", ...}
    HEARTBEAT = 2   # slave -> node: {"jobs": N} (any message counts as a sign of life)
    INVOKE = 3      # node -> slave: [event, payload]
    CHUNK = 4       # one item of a streamed reply
    ERROR = 5       # reply failed: error body (transport.errors), ends the stream
    CHOKE = 6       # end of a streamed reply
    TERMINATE = 7   # node -> slave: finish and exit; slave -> node: "I am exiting"
    RESULT = 8      # a whole single-value reply; ends the stream
    # Request/response and control (engine client, native-server, mesh)
    REQUEST = 10    # [target, event, payload] (target: app name or mesh type)
    CANCEL = 11     # caller gave up on sid
    # Publish/subscribe
    PUBLISH = 20    # [topic, payload, seq]
    # Window-based flow control of streams
    CREDIT = 30     # receiver grants `body` more chunks on sid


class Envelope(NamedTuple):
    kind: int
    sid: int
    body: Any = None


_packer_opts = dict(use_bin_type=True)
# One Packer reused for every envelope: ``msgpack.packb`` builds a new one per call,
# which is over half its cost for a small envelope (0.72 against 0.30 µs here).  Safe
# because packing never awaits (one trio thread) and a failed pack leaves it reset.  Its
# buffer keeps the size of the largest value packed, so after a big one it is replaced.
_packer = msgpack.Packer(**_packer_opts)
_KEEP_PACKER_BELOW = 1 << 20


def _pack(value: Any) -> bytes:
    global _packer
    packed: bytes = _packer.pack(value)
    if len(packed) >= _KEEP_PACKER_BELOW:
        _packer = msgpack.Packer(**_packer_opts)
    return packed


def encode(envelopes: Iterable[Envelope]) -> bytes:
    """Pack envelopes into one frame. Raises CodecError for values msgpack cannot carry."""
    try:
        frame: bytes = msgpack.packb([tuple(e) for e in envelopes], **_packer_opts)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode: {exc}") from exc
    return frame


def encode_one(kind: int, sid: int, body: Any = None) -> bytes:
    try:
        frame: bytes = msgpack.packb(((kind, sid, body),), **_packer_opts)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode: {exc}") from exc
    return frame


def encode_envelope(kind: int, sid: int, body: Any = None) -> bytes:
    """Pack one envelope on its own; :func:`join_frame` makes a frame of several
    without packing them again (senders encode once, at the time they send, so a
    value msgpack cannot carry fails there, for that caller only).

    A body of bytes (a chunk of bulk data) is not run through the packer, which
    copies it twice (into its buffer, then out): its bin header is written beside it
    and the two joined, one copy."""
    try:
        if type(body) is bytes and len(body) >= _BIG_BYTES:
            return b"".join((b"\x93", _pack((kind, sid))[1:], _bin_header(len(body)), body))
        return _pack((kind, sid, body))
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode: {exc}") from exc


_BIG_BYTES = 1 << 12  # a bytes body this long or longer is packed by hand


def _bin_header(size: int) -> bytes:
    """msgpack's bin header for ``size`` bytes (bin 16 or bin 32: size >= 256)."""
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    if size < 1 << 32:
        return b"\xc6" + size.to_bytes(4, "big")
    raise ValueError(f"bytes object of {size} bytes is too large for msgpack")


def join_frame(packed: list[bytes]) -> bytes:
    """A frame from envelopes packed by :func:`encode_envelope`: a msgpack array
    header followed by the envelopes' bytes."""
    n = len(packed)
    if n < 16:
        header = bytes((0x90 | n,))
    elif n < 0x10000:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(packed)


def decode(frame: bytes) -> list[Envelope]:
    """Unpack one frame into envelopes, validating the outer shape."""
    return [Envelope(*item) for item in decode_lists(frame)]


def decode_lists(frame: bytes) -> list[list[Any]]:
    """:func:`decode` for the hot paths: the same checks, but each envelope is left as
    the ``[kind, sid, body]`` list msgpack made (unpack it like the tuple); building an
    :class:`Envelope` per message costs as much as the unpacking itself."""
    if len(frame) <= MIN_VALUE_BUDGET:
        try:
            items = msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
        except Exception as exc:  # msgpack raises a zoo of types for garbage input
            raise CodecError(f"not a msgpack frame: {exc.__class__.__name__}: {exc}") from None
    else:
        items = _unpack_large(frame, "not a msgpack frame")
    if type(items) is not list:
        raise CodecError(f"frame must be an array of envelopes, got {type(items).__name__}")
    for item in items:
        if type(item) is not list or len(item) != 3 or type(item[0]) is not int \
                or type(item[1]) is not int:
            raise CodecError(f"envelope must be [int kind, int sid, body], got {item!r:.120}")
    return items


def pack(value: Any) -> bytes:
    """Plain msgpack of a payload (for foreign clients: nng-server, pubsub)."""
    try:
        data: bytes = msgpack.packb(value, **_packer_opts)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode: {exc}") from exc
    return data


def unpack(data: bytes) -> Any:
    """One plain msgpack value, under the same decode limits as a frame."""
    if len(data) > MIN_VALUE_BUDGET:
        return _unpack_large(data, "not msgpack")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CodecError(f"not msgpack: {exc.__class__.__name__}: {exc}") from None


class _TooManyValues(Exception):
    pass


def _unpack_large(data: bytes, what: str) -> Any:
    """Unpack a frame over MIN_VALUE_BUDGET bytes, counting its values as it goes: each
    array or map, as it is completed, adds its length (and itself) to the count, which
    may not pass the frame's budget; no single array or map may either (refused at its
    header, before anything is allocated for it).  So the values built before the frame
    is refused are at most about twice the budget."""
    size = len(data)
    budget = max(MIN_VALUE_BUDGET, size // BYTES_PER_VALUE)
    left = budget

    def counted_array(array: list[Any]) -> list[Any]:
        nonlocal left
        left -= len(array) + 1
        if left < 0:
            raise _TooManyValues
        return array

    def counted_map(mapping: dict[Any, Any]) -> dict[Any, Any]:
        nonlocal left
        left -= 2 * len(mapping) + 1
        if left < 0:
            raise _TooManyValues
        return mapping

    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                               list_hook=counted_array, object_hook=counted_map,
                               max_str_len=size, max_bin_len=size, max_ext_len=size,
                               max_array_len=budget, max_map_len=budget // 2)
    except _TooManyValues:
        raise CodecError(f"a frame of {size} bytes may hold at most {budget} values "
                         "(send bulk data as bytes, or in chunks)") from None
    except Exception as exc:
        raise CodecError(f"{what}: {exc.__class__.__name__}: {exc}") from None
