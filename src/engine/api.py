"""The app API: ``@on(event)`` registers a handler in the module-level registry
that the slave runtime (``engine/worker.py``) reads after importing the app.

A handler takes the decoded payload and may be:

- a plain function: its return value is the single reply;
- an ``async def``: awaited, its return value is the single reply;
- a generator or async generator: each yielded item is one chunk of a streamed reply.

An exception becomes an error reply carrying the exception's type and message.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

HANDLERS: dict[str, Callable[..., Any]] = {}

Handler = TypeVar("Handler", bound=Callable[..., Any])


def on(event: str) -> Callable[[Handler], Handler]:
    """Decorator: handle ``event`` with the decorated function (returned unchanged)."""
    if not isinstance(event, str) or not event:
        raise TypeError(f"on(event): event must be a non-empty string, got {event!r}")

    def register(fn: Handler) -> Handler:
        if not callable(fn):
            raise TypeError(f"@on({event!r}) must decorate a callable, got {fn!r}")
        if event in HANDLERS and HANDLERS[event] is not fn:
            raise ValueError(f"two handlers for event {event!r}: {HANDLERS[event]!r} and {fn!r}")
        HANDLERS[event] = fn
        return fn

    return register


def handlers() -> dict[str, Callable[..., Any]]:
    return dict(HANDLERS)
