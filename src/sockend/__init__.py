"""Sockend: the browser bridge to mesh components, speaking Socket.IO v4 and its own
websocket protocol on one port (docs/sockend.md)."""
from sockend.bridge import Mesh, NamespaceLink, TransportMesh
from sockend.hooks import BridgeHooks, Browser, Forbidden, Handshake, load_hooks
from sockend.protocol import BadFrame, ClientRequest, EventOutbox, namespace_from_path, parse_request
from sockend.server import Sockend, SockendConfig

__all__ = [
    "BadFrame", "BridgeHooks", "Browser", "ClientRequest", "EventOutbox", "Forbidden", "Handshake",
    "Mesh", "NamespaceLink", "Sockend", "SockendConfig", "TransportMesh", "load_hooks",
    "namespace_from_path", "parse_request",
]
