"""The node: a nursery of apps, its control endpoint and verbs, its maintenance channel.

``from engine.node import Node`` still works (imported on first use, so that
``engine.node.control`` can be imported without the whole node).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Node"]


def __getattr__(name: str) -> Any:
    if name == "Node":
        from engine.node.node import Node
        return Node
    raise AttributeError(f"module 'engine.node' has no attribute {name!r}")


if TYPE_CHECKING:
    from engine.node.node import Node  # noqa: F401
