"""Responder: answers the request types it advertises, on an RpcServer.

``@responder.on("user.*")`` registers a handler ``handler(req)`` where ``req`` is the
request as the Requester sent it (a dict with ``type``); the return value is the answer,
a raised :class:`~transport.errors.RemoteError` keeps its code and ``retryable`` flag,
anything else reaches the caller as a ``HandlerError``.

The handler may be ``async def`` (it runs on a task and may await anything) or a plain
``def``: that one runs where the request arrives, with no task and no scheduler pass,
which is the fastest way to answer quick work, but it blocks the Responder while it
runs, so keep it to computation that takes microseconds, not I/O.  A chunked request
(``requester.send(req, chunks=...)``) goes to ``async def handler(req, chunks)``, which
reads the chunks with ``async for`` at its own pace.
"""
from __future__ import annotations

from typing import Any, Callable

import trio

from transport.errors import UnknownEvent
from transport.mesh.component import Component, _names, count_unmatched
from transport.mesh.peers import matches
from transport.codec import DEFAULT_MAX_MESSAGE
from transport.rpc import Request, RpcServer
from transport.rpc.connection import (DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, check_limits,
                                       check_max_message)

# ``handler(req)``, plain or async def; ``async def handler(req, chunks)`` for chunked requests.
Handler = Callable[..., Any]


class Responder(Component):
    role = "responder"

    def __init__(self, name: str, *, responds_to: list[str] | tuple[str, ...] = (),
                 max_inflight: int = 10_000, spin: bool = True,
                 max_message: int = DEFAULT_MAX_MESSAGE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT, subset: str = "",
                 **kw: Any) -> None:
        """``subset``: a label Requesters may direct requests to (cote's ``subset``:
        ``requester.send(req, subset="eu")``, or ``"__subset"`` in the request)."""
        super().__init__(name, **kw)
        if not isinstance(subset, str):
            raise ValueError("subset must be a string")
        self.subset = subset
        self.responds_to = _names(responds_to, "responds_to")
        self.max_inflight = max_inflight
        # The RpcServer's limits (docs/protocol.md), checked when the Responder is made
        # rather than when it starts serving.
        check_max_message(max_message, "Responder")
        check_limits("Responder", max_connections, idle_timeout)
        self.max_message = max_message
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.spin = spin
        self._handlers: dict[str, Handler] = {}
        self._resolved: dict[str, Handler | None] = {}
        self.server: RpcServer | None = None
        self.unmatched: dict[str, int] = {}  # request type no handler took -> how many

    def on(self, pattern: str) -> Callable[[Handler], Handler]:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("event pattern must be a non-empty string")

        def register(fn: Handler) -> Handler:
            self._handlers[pattern] = fn
            self._resolved.clear()
            self._readvertise()    # added after start: Requesters learn of it at once
            return fn
        return register

    def advertised(self) -> tuple[str, ...]:
        # Routing is strictly by advertised type: what the user declared, plus every
        # handler pattern (declaring nothing must not mean "send me everything").
        return tuple(dict.fromkeys(self.responds_to + tuple(self._handlers)))

    def _handler_for(self, event: str) -> Handler | None:
        try:
            return self._resolved[event]
        except KeyError:
            pass
        fn = self._handlers.get(event)
        if fn is None:
            for pattern, candidate in self._handlers.items():
                if matches(pattern, event):
                    fn = candidate
                    break
        if len(self._resolved) < 10_000:
            self._resolved[event] = fn
        return fn

    def _dispatch(self, req: Request) -> Any:
        """A value (plain handler) or a coroutine the RpcServer awaits on a task."""
        fn = self._handler_for(req.event)
        if fn is None:
            count_unmatched(self.unmatched, req.event, f"responder {self.name!r}", "request")
            raise UnknownEvent(f"responder {self.name!r} has no handler for {req.event!r}")
        if req.chunks is not None:  # a chunked request: async def handler(req, chunks)
            return fn(req.payload, req.chunks)
        return fn(req.payload)

    async def _serve(self, nursery: trio.Nursery) -> None:
        me = self.id.encode()  # requests sealed for this run of this Responder only
        self.server = RpcServer(f"tcp://{self.bind}:0", self._dispatch,
                                max_inflight=self.max_inflight,
                                guard=self.guard(seals=b"answer:" + me, opens=b"request:" + me),
                                spin=self.spin, max_message=self.max_message,
                                max_connections=self.max_connections,
                                idle_timeout=self.idle_timeout)
        address = await nursery.start(self.server.run)
        await self._start_discovery(nursery, address)

    async def drain(self, timeout: float = 30.0, *, close: bool = True) -> None:
        """Leave gracefully: stop advertising (its peers hear a ``bye`` and send it no
        new requests), let the requests in flight finish (up to ``timeout`` s), then
        close (``close=False``: its owner closes it).  Requesters move to the other Responders without an error; one that
        sends before it heard the ``bye`` is still answered, or, after the close, fails
        over (an unreachable Responder is retried elsewhere)."""
        discovery = self.discovery
        if discovery is not None and discovery.me is not None:
            discovery.announce("bye")
            discovery.me = None              # no more hellos, no answers to asks
        with trio.move_on_after(timeout):
            while self.server is not None and self.server.inflight:
                await trio.sleep(0.02)
        if close:
            self.close()

    @property
    def address(self) -> str | None:
        return self.server.address if self.server else None
