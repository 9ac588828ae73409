"""Sockend: a trio-websocket bridge from browsers to mesh components."""
from sockend.bridge import Mesh, NamespaceLink, TransportMesh
from sockend.protocol import BadFrame, ClientRequest, EventOutbox, namespace_from_path, parse_request
from sockend.server import Sockend, SockendConfig

__all__ = [
    "BadFrame", "ClientRequest", "EventOutbox", "Mesh", "NamespaceLink", "Sockend",
    "SockendConfig", "TransportMesh", "namespace_from_path", "parse_request",
]
