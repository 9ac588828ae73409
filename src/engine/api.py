"""The app API: ``@on(event)`` registers a handler in the module-level registry
that the slave runtime (``engine/worker.py``) reads after importing the app.

A handler takes the decoded payload and may be:

- a plain function: its return value is the single reply;
- an ``async def``: awaited, its return value is the single reply;
- a generator or async generator: each yielded item is one chunk of a streamed reply.

An exception becomes an error reply carrying the exception's type and message.

``publish(type, data)`` (``apublish`` in ``async def`` handlers) publishes an event on
the mesh through the app's ``mesh-publisher`` driver (docs/drivers.md), so that apps
chain through pub/sub: another app's ``mesh-subscriber`` turns it into a job.
"""
from __future__ import annotations

import os
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


# -- publishing on the mesh (engine/drivers/mesh_publisher.py) ----------------------------

PUBLISH_VERB = "mesh-publish"   # the node's control verb (engine.drivers.mesh_publisher)


def _publish_args(type: str, data: Any, driver: str | None, app: str | None) -> dict[str, Any]:
    if not isinstance(type, str) or not type:
        raise TypeError(f"publish(type, data): type must be a non-empty string, got {type!r}")
    app = app or os.environ.get("ENGINE_APP")
    if not app:
        raise RuntimeError("publish(): pass app=, or run inside a slave (ENGINE_APP)")
    args: dict[str, Any] = {"app": app, "type": type, "data": data}
    if driver is not None:
        args["driver"] = driver
    return args


def publish(type: str, data: Any = None, *, driver: str | None = None, app: str | None = None,
            node: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Publish ``data`` as an event of ``type`` on the mesh, from a handler: the node
    (``ENGINE_NODE``) publishes it on the app's (``ENGINE_APP``) ``mesh-publisher``
    driver (``driver``: which one, else the first that broadcasts ``type``).  Returns
    ``{"driver", "subscribers"}`` (Subscribers connected when it was published);
    raises the verb's typed errors (``UnknownEvent``: no such publisher; ``QueueFull``).
    Blocks for one round trip to the node, like ``call``."""
    from engine.client.calls import call

    reply: dict[str, Any] = call("", PUBLISH_VERB, _publish_args(type, data, driver, app),
                                 timeout=timeout, node=node)
    return reply


async def apublish(type: str, data: Any = None, *, driver: str | None = None, app: str | None = None,
                   node: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """:func:`publish` for ``async def`` handlers."""
    from engine.client.calls import acall

    reply: dict[str, Any] = await acall("", PUBLISH_VERB, _publish_args(type, data, driver, app),
                                        timeout=timeout, node=node)
    return reply
