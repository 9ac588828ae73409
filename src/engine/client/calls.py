"""Calling other apps from a handler: pipelines of apps on one node.

```python
from engine import on, stream, astream

@on("thumbnails")                       # a sync generator: one stage of a pipeline
def thumbnails(spec):
    for frame in stream("decoder", "frames", spec):   # another app's streamed reply
        yield shrink(frame)

@on("athumbnails")                      # the same as an async generator
async def athumbnails(spec):
    async for frame in astream("decoder", "frames", spec):
        yield shrink(frame)
```

``call``/``stream`` block; ``acall``/``astream`` are for ``async def`` handlers.  Each
request goes to the node the slave belongs to (``ENGINE_NODE``, set by the node), which
runs it like any client's request (sealed with the node's token, found as any client
on the node's host finds it: engine/client/tokens.py): on the target app's pool, with
its queue-limit and typed errors (``AppNotFound``, ``QueueFull``, the target handler's ``HandlerError``...),
raised here.  Chunks flow as the target produces them, flow-controlled end to end.

Blocking calls hold the slave's only thread: its heartbeats wait too, so a blocking call
(or the wait for one chunk) must end within the app's ``heartbeat-timeout``, or the node
takes the slave for hung.  ``acall``/``astream`` have no such limit, but need a slave:
in a ``backend: "thread"`` app use ``call``/``stream`` from plain handlers (they run on
threads there, since a call takes longer than the inline threshold).  An app that calls
itself (directly or round a cycle) can use up its own pool and wait for ever; give
such calls a timeout.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator

import trio

DEFAULT_TIMEOUT = 30.0

_idle_sync: dict[str, list] = {}      # node address -> idle SyncRpcClients
_async_clients: dict[str, Any] = {}   # node address -> a running RpcClient
_async_lock: trio.Lock | None = None
_nursery: trio.Nursery | None = None  # the slave runtime's, set by engine.worker


def bind_runtime(nursery: trio.Nursery | None) -> None:
    """The slave runtime (engine.worker) hands over the nursery async clients run in."""
    global _nursery, _async_lock
    _nursery = nursery
    _async_lock = trio.Lock() if nursery is not None else None
    _async_clients.clear()


def _node(node: str | None) -> str:
    address = node or os.environ.get("ENGINE_NODE")
    if not address:
        raise RuntimeError("no node to call: run inside a slave (ENGINE_NODE) or pass node=")
    return address


@contextmanager
def _sync_client(node: str | None) -> Iterator[Any]:
    """A connection of its own for the duration of one call or stream, so a call made
    while iterating a stream never reads that stream's replies."""
    from transport.sync_client import SyncRpcClient

    if _inline_in_node():
        raise RuntimeError("call()/stream() from a handler running inline on the node's own "
                           "loop would wait for itself: the node cannot answer while it runs")
    address = _node(node)
    idle = _idle_sync.setdefault(address, [])
    client = idle.pop() if idle else SyncRpcClient(address, guard=_guard(address))
    try:
        yield client
    finally:
        idle.append(client)


def call(app: str, event: str, payload: Any = None, *, timeout: float = DEFAULT_TIMEOUT,
         node: str | None = None) -> Any:
    """``app``'s reply to ``event``: its value, or the list of chunks of a stream."""
    with _sync_client(node) as client:
        return client.call(app, event, payload, timeout=timeout)


def stream(app: str, event: str, payload: Any = None, *, timeout: float = DEFAULT_TIMEOUT,
           node: str | None = None) -> Iterator[Any]:
    """``app``'s reply to ``event`` chunk by chunk (``timeout`` bounds each wait);
    leaving the loop early cancels the rest."""
    with _sync_client(node) as client:
        yield from client.stream(app, event, payload, timeout=timeout)


def _guard(address: str) -> Any:
    """The node's token as a frame guard (None: no token found: plain frames)."""
    from engine.client.tokens import control_guard

    return control_guard(address)


def _inline_in_node() -> bool:
    """A backend "thread" app's quick handler, run on the node's loop (engine.pool.threads).
    Looked up, not imported: a slave never loads the thread pool, and where nothing loaded
    it no handler can be running inline."""
    thread_pool = sys.modules.get("engine.pool.threads")
    return thread_pool is not None and thread_pool.inline.active


async def _async_client(node: str | None) -> Any:
    from transport.rpc.client import RpcClient

    if _nursery is None or _async_lock is None:
        raise RuntimeError("acall/astream run in a slave's async handlers; elsewhere use "
                           "engine.client.connect")
    address = _node(node)
    async with _async_lock:  # two handlers asking at once start one client
        client = _async_clients.get(address)
        if client is None:
            client = _async_clients[address] = await _nursery.start(
                RpcClient(address, guard=_guard(address)).run)
    return client


async def acall(app: str, event: str, payload: Any = None, *, timeout: float = DEFAULT_TIMEOUT,
                node: str | None = None) -> Any:
    """``call`` for async handlers."""
    client = await _async_client(node)
    return await client.call(app, event, payload, timeout=timeout)


async def astream(app: str, event: str, payload: Any = None, *,
                  timeout: float = DEFAULT_TIMEOUT, node: str | None = None) -> AsyncIterator[Any]:
    """``stream`` for async handlers."""
    client = await _async_client(node)
    async with client.stream(app, event, payload, timeout=timeout) as replies:
        async for chunk in replies:
            yield chunk
