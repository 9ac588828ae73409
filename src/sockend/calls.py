"""One browser request through the mesh, the same for both protocols: the request
transformer hook, the call bounded in time, and every failure as a typed RemoteError,
so a browser always gets an answer and never a Python traceback."""
from __future__ import annotations

import logging
from typing import Any

import trio

from transport.errors import BadMessage, RemoteError, TimeoutError_, TransportError, Unreachable

from sockend.bridge import NamespaceLink
from sockend.hooks import BridgeHooks, Browser, call_hook

log = logging.getLogger(__name__)

TYPES_REQUEST = "$types"   # answered by Sockend itself: the namespace's Responder types


async def transformed(hooks: BridgeHooks, request: dict[str, Any], browser: Browser) -> dict[str, Any]:
    """The request the transformer hook lets through (raises Forbidden, or RemoteError
    when the hook itself fails: the browser is told, the server keeps going)."""
    if type(hooks).transform is BridgeHooks.transform:
        return request       # (the default passes everything: skip the call on the hot path)
    try:
        out = await call_hook(hooks.transform(request, browser))
    except RemoteError:
        raise
    except Exception as exc:
        log.exception("sockend: the transform hook failed on %r", request.get("type"))
        raise RemoteError(f"sockend's transform hook failed: {exc}"[:300], type=type(exc).__name__) from None
    if not isinstance(out, dict) or not isinstance(out.get("type"), str):
        raise RemoteError("sockend's transform hook returned no request (a dict with 'type')",
                          type="HookError")
    return out


async def call_mesh(link: NamespaceLink, hooks: BridgeHooks, browser: Browser, request: dict[str, Any],
                    limit: float, chunks: Any = None) -> Any:
    """The Responder's answer to ``request`` (a dict with ``type``); raises RemoteError."""
    if request.get("type") == TYPES_REQUEST:
        return link.responder_types()
    request = await transformed(hooks, request, browser)
    try:
        # Past the link's own timeout, a grace second: a link that misbehaves still
        # cannot leave the browser without an answer.
        with trio.move_on_after(limit + 1) as guard:
            if chunks is None:
                result = await link.request(request, limit)
            else:
                result = await link.request(request, limit, chunks=chunks)
        if guard.cancelled_caught:
            raise TimeoutError_(f"no answer to {request['type']!r} within {limit:g} s")
        return result
    except RemoteError:
        raise
    except TransportError as exc:
        raise Unreachable(f"mesh: {exc}") from None
    except Exception as exc:
        log.exception("sockend: request %r failed inside sockend", request.get("type"))
        raise RemoteError(f"sockend failed: {exc}", type=type(exc).__name__) from None


async def publish_to_mesh(link: NamespaceLink, hooks: BridgeHooks, browser: Browser, topic: str,
                          data: Any) -> None:
    """A browser's event without an ack, through the transformer hook (which sees it as
    ``{"type": topic, "data": data}``), to the namespace's Subscribers."""
    request = await transformed(hooks, {"type": topic, "data": data}, browser)
    try:
        link.publish(request["type"], request.get("data"))
    except (TransportError, ValueError) as exc:
        raise BadMessage(f"cannot publish {topic!r}: {exc}"[:300]) from None
