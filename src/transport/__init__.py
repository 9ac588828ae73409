"""Transport: trio over nng and framed sockets, one msgpack envelope format, and the
zero-config mesh components (cote's half).

Every name below is importable from ``transport`` as before, but imported on first
use (PEP 562): a slave process imports ``transport.streams``/``transport.channel``
only, and must not pay for pynng and the mesh (several MB of RSS per slave).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the submodule that defines it
_EXPORTS = {
    # the envelope format and typed errors
    "Envelope": "codec", "Kind": "codec", "decode": "codec", "encode": "codec",
    "BadMessage": "errors", "Closed": "errors", "CodecError": "errors",
    "HandlerError": "errors", "QueueFull": "errors", "RemoteError": "errors",
    "TimeoutError_": "errors", "TransportError": "errors", "UnknownEvent": "errors",
    "Unreachable": "errors", "body_to_error": "errors", "error_to_body": "errors",
    "register_error": "errors",
    "TrioSocket": "sockets",
    # request/response: the trio client and server, the blocking client
    "RpcClient": "rpc", "RpcServer": "rpc", "Request": "rpc", "Stream": "rpc",
    "Deferred": "rpc", "SyncRpcClient": "sync_client",
    # mesh components: zero-config discovery, request/response, pub/sub
    "Discovery": "mesh.discovery", "DiscoveryConfig": "mesh.discovery", "Monitor": "mesh.monitor",
    "Beacon": "mesh.peers", "PeerTable": "mesh.peers", "matches": "mesh.peers",
    "Event": "mesh.pubsub", "Publisher": "mesh.pubsub", "Subscriber": "mesh.pubsub",
    "Requester": "mesh.requester", "Responder": "mesh.responder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transport' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from transport.codec import Envelope, Kind, decode, encode  # noqa: F401
    from transport.mesh.discovery import Discovery, DiscoveryConfig  # noqa: F401
    from transport.errors import (  # noqa: F401
        BadMessage, Closed, CodecError, HandlerError, QueueFull, RemoteError, TimeoutError_,
        TransportError, UnknownEvent, Unreachable, body_to_error, error_to_body, register_error)
    from transport.mesh.monitor import Monitor  # noqa: F401
    from transport.mesh.peers import Beacon, PeerTable, matches  # noqa: F401
    from transport.mesh.pubsub import Event, Publisher, Subscriber  # noqa: F401
    from transport.mesh.requester import Requester  # noqa: F401
    from transport.mesh.responder import Responder  # noqa: F401
    from transport.rpc import Deferred, Request, RpcClient, RpcServer, Stream  # noqa: F401
    from transport.sockets import TrioSocket  # noqa: F401
    from transport.sync_client import SyncRpcClient  # noqa: F401
