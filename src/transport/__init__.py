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

# Mesh components (cote's half): zero-config discovery, request/response, pub/sub.
from .discovery import Discovery, DiscoveryConfig  # noqa: E402
from .monitor import Monitor  # noqa: E402
from .peers import Beacon, PeerTable, matches  # noqa: E402
from .pubsub import Event, Publisher, Subscriber  # noqa: E402
from .requester import Requester  # noqa: E402
from .responder import Responder  # noqa: E402

__all__ += [
    "Beacon", "Discovery", "DiscoveryConfig", "Event", "Monitor", "PeerTable", "Publisher",
    "Requester", "Responder", "Subscriber", "matches",
]
