"""Transport: trio over nng, one msgpack envelope format, and (soon) zero-config mesh components."""
from .codec import Envelope, Kind, decode, encode
from .errors import (
    BadMessage,
    Closed,
    CodecError,
    HandlerError,
    QueueFull,
    RemoteError,
    TimeoutError_,
    TransportError,
    UnknownEvent,
    Unreachable,
    body_to_error,
    error_to_body,
    register_error,
)
from .sockets import TrioSocket

__all__ = [
    "BadMessage", "Closed", "CodecError", "Envelope", "HandlerError", "Kind", "QueueFull",
    "RemoteError", "TimeoutError_", "TransportError", "TrioSocket", "UnknownEvent",
    "Unreachable", "body_to_error", "decode", "encode", "error_to_body", "register_error",
]
