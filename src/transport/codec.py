"""The one wire format: msgpack frames of envelopes.

A *frame* is what one nng message carries: a msgpack array of envelopes, so that
many small messages in flight share one send (batching is where throughput comes
from; see docs/architecture.md).  An *envelope* is ``[kind, sid, body]``:

- ``kind``: a small int from :class:`Kind`, saying what the envelope means;
- ``sid``: the stream (request) id it belongs to, 0 when none;
- ``body``: any msgpack value, its shape fixed by the kind.

Decoding never raises anything but :class:`CodecError`, whatever the bytes.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any, Iterable, NamedTuple

import msgpack

from transport.errors import CodecError


class Kind(IntEnum):
    # Slave protocol (docs/protocol.md)
    HANDSHAKE = 1   # slave -> node: {"pid", "app", "concurrency", ...}
    HEARTBEAT = 2   # both ways: body None, or load figures
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
    value msgpack cannot carry fails there, for that caller only)."""
    try:
        return _pack((kind, sid, body))
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode: {exc}") from exc


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
    try:
        items = msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
        raise CodecError(f"not a msgpack frame: {exc.__class__.__name__}: {exc}") from None
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
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CodecError(f"not msgpack: {exc.__class__.__name__}: {exc}") from None
