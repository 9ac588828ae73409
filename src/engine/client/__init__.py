"""Clients of a node: :func:`connect` for Python code under trio (``engine.client``),
and :mod:`engine.client.calls` for handlers calling other apps on their node.

The names below are imported on first use: a slave imports ``engine.client.calls``
(through ``from engine import call``) and must not pay for the trio client.
:func:`control_guard` is the frame guard of any other client of a node's control
endpoint (``RpcClient(address, guard=control_guard(address))``): it seals with the
node's token, found as ``connect`` finds it (:mod:`engine.client.tokens`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = ("DEFAULT_NODE", "NODE_TARGET", "NodeClient", "connect")
_TOKENS = ("TokenError", "control_guard", "find_token")

__all__ = list(_EXPORTS + _TOKENS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from engine.client import node_client
        return getattr(node_client, name)
    if name in _TOKENS:
        from engine.client import tokens
        return getattr(tokens, name)
    raise AttributeError(f"module 'engine.client' has no attribute {name!r}")


if TYPE_CHECKING:
    from engine.client.node_client import DEFAULT_NODE, NODE_TARGET, NodeClient, connect  # noqa: F401
    from engine.client.tokens import TokenError, control_guard, find_token  # noqa: F401
