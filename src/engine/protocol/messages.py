"""What the node and a slave share: the protocol's constants and the shapes of the
messages whose body has structure (docs/protocol.md has the whole table).

Both sessions build and check bodies here, so the two sides cannot drift apart, and
the slave imports only this and :mod:`engine.protocol.slave_session` (nothing of the
node's side).  Pure: no I/O, no trio.
"""
from __future__ import annotations

from typing import Any

PROTOCOL_VERSION = 1
STREAM_WINDOW = 64  # chunks one side may send of one job beyond the other's CREDITs
CREDIT_BATCH = 16   # the receiver grants credit in steps of this many consumed chunks


def invoke_body(event: str, payload: Any, chunked: bool = False) -> list[Any]:
    """``INVOKE``'s body: ``[event, payload]``, or ``[event, payload, true]`` when the
    request's chunks follow on the same sid."""
    return [event, payload, True] if chunked else [event, payload]


def parse_invoke(body: Any) -> tuple[str, Any, bool] | None:
    """``(event, payload, chunked)`` from an ``INVOKE`` body, or None if it has not that
    shape (the slave answers such an INVOKE with a ``bad-message`` ERROR)."""
    if type(body) is list and 2 <= len(body) <= 3 and type(body[0]) is str:
        return body[0], body[1], len(body) == 3 and body[2] is True
    return None


def handshake_body(*, pid: int, app: str, concurrency: int, events: list[str]) -> dict[str, Any]:
    """``HANDSHAKE``'s body, the slave's first message."""
    return {"version": PROTOCOL_VERSION, "pid": pid, "app": app, "concurrency": concurrency,
            "events": events, "window": STREAM_WINDOW}


def handshake_concurrency(body: Any) -> int | None:
    """The concurrency a ``HANDSHAKE`` body offers (None: it states none usable), or
    raises ValueError if the body is not a handshake of this protocol version."""
    version = body.get("version") if isinstance(body, dict) else None
    if type(version) is not int or version != PROTOCOL_VERSION:  # (not 1.0, not true)
        raise ValueError(f"bad handshake {body!r:.120}")
    conc = body.get("concurrency")
    return conc if type(conc) is int and conc >= 1 else None


def is_credit(body: Any) -> bool:
    """A ``CREDIT`` body grants a positive int of chunks; anything else is ignored."""
    return type(body) is int and body > 0
