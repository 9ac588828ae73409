"""One Socket.IO client on trio: its Engine.IO session, its namespaces, its requests.

A :class:`SioSession` lives in the server's nursery (a polling client's session
outlives every HTTP request it makes) and owns a nursery of its own: the ping clock,
one task per namespace being connected (the authentication hook may take its time),
one per request in flight.  Transports come and go around it: a poll
(:meth:`SioSession.poll`) or a websocket writer waits for :meth:`changed`, then takes
what :meth:`flush_events` and the Engine.IO session hold.  It ends (:meth:`end`) on a
close packet, a ping timeout, a protocol error, a lost websocket, or eviction; then
every namespace leaves its hub.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio

from transport.errors import BadMessage, Forbidden, QueueFull, RemoteError, error_to_body

from sockend import socketio as sio
from sockend.calls import call_mesh, publish_to_mesh
from sockend.engineio import EngineSession, Message
from sockend.hooks import BridgeHooks, Browser, Handshake, call_hook
from sockend.http import RequestHead
from sockend.hub import Client, NamespaceHub
from sockend.protocol import BadPath, EventOutbox, namespace_from_path
from sockend.ws import frame

log = logging.getLogger(__name__)

AckStyle = Literal["answer", "node"]
EVENT_FORMAT = "socketio"
MAX_QUEUED = 4096        # answers and control packets a client may leave unread


class SessionHost(Protocol):
    """What a session needs of the server (sockend.server.Sockend)."""
    hooks: BridgeHooks
    stats: Counter[str]

    def limits(self) -> "SessionLimits": ...

    def admit(self, namespace: str) -> str | None:
        """Count one more browser in ``namespace``, or say why not (limits, allow-list)."""

    def release(self) -> None: ...

    def hub_for(self, namespace: str) -> NamespaceHub: ...


@dataclass(frozen=True)
class SessionLimits:
    max_inflight: int
    request_timeout: float
    event_buffer: int
    max_skipped: int
    max_attachment_bytes: int
    ack_style: AckStyle
    connect_timeout: float      # a session that joins no namespace by then ends (socket.io's)


class EventPacket:
    """One published event as Engine.IO messages, shared by every client of the
    namespace; its websocket frames are built once, by the first writer that needs them."""
    __slots__ = ("messages", "_frames")

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self._frames: bytes | None = None

    def frames(self) -> bytes:
        if self._frames is None:
            self._frames = b"".join(frame("4" + m if isinstance(m, str) else m) for m in self.messages)
        return self._frames


def event_frame(namespace: str, topic: str, data: Any) -> EventPacket | None:
    """A published event as Socket.IO messages (the hub's ``socketio`` format)."""
    try:
        return EventPacket(sio.event("/" + namespace, topic, data))
    except (TypeError, ValueError, RecursionError):
        return None


@dataclass(eq=False)
class _Socket:
    """One namespace joined by the client."""
    client: Client
    hub: NamespaceHub
    left: bool = False      # the client left it (its scope is cancelled for that too)


class SioSession:
    def __init__(self, host: SessionHost, engine: EngineSession, head: RequestHead, remote: str) -> None:
        self.host = host
        self.engine = engine
        self.limits = host.limits()
        self.sio = sio.SocketIOConnection(self.limits.max_attachment_bytes)
        self.head = head
        self.remote = remote
        self.sockets: dict[str, _Socket] = {}
        self.inflight = 0
        self.polling = False              # a GET waits for this session's packets
        self.websocket = False            # a websocket is attached (probing, or the transport)
        self.ended = trio.Event()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._socket_ids = 0
        self._joining: set[str] = set()   # namespaces being joined (hooks running)

    @property
    def sid(self) -> str:
        return self.engine.sid

    # -- lifetime ------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                nursery.start_soon(self._clock)
                nursery.start_soon(self._joins_in_time)
                await self.ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            for sock in self.sockets.values():
                sock.hub.remove(sock.client)
                self.host.release()
            self.sockets.clear()

    def end(self, reason: str) -> None:
        if not self.ended.is_set():
            self.engine.close(reason)
            self.ended.set()
            self.wake()

    async def _clock(self) -> None:
        while True:
            await trio.sleep_until(self.engine.deadline())
            self.engine.tick(trio.current_time())
            if self.engine.state == "closed":
                self.host.stats["sio_ping_timeouts"] += 1
                self.end(self.engine.close_reason)
                return
            self.wake()

    async def _joins_in_time(self) -> None:
        await trio.sleep(self.limits.connect_timeout)
        if not self.sockets and not self._joining:
            self.host.stats["sio_connect_timeouts"] += 1
            self.end("no namespace joined in time")

    # -- waking transports -----------------------------------------------------------------
    def wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def changed(self) -> None:
        """Wait for the next :meth:`wake` (check, then call: no checkpoint between)."""
        await self._changed.wait()

    def take_events(self, limit: int = 1024) -> list[EventPacket]:
        """Published events waiting in the namespaces' outboxes (at most ``limit`` of
        each), for the transport about to write."""
        out: list[EventPacket] = []
        for sock in list(self.sockets.values()):
            outbox = sock.client.outbox
            for _ in range(limit):
                packet = outbox.pop()
                if packet is None:
                    break
                out.append(packet)
        return out

    def flush_events(self, limit: int = 1024) -> None:
        """Published events into the Engine.IO session (polling writes them from there)."""
        for packet in self.take_events(limit):
            for message in packet.messages:
                self.engine.send(message)

    async def poll(self) -> str:
        """A long poll's body: waits until there is something to say."""
        self.polling = True
        try:
            while True:
                self.flush_events()
                if self.engine.pending():
                    return self.engine.take_polling()
                await self.changed()
        finally:
            self.polling = False

    # -- what the client did ---------------------------------------------------------------
    def receive(self, messages: list[Message]) -> None:
        for message in messages:
            try:
                action = self.sio.receive(message)
            except sio.SocketIOProtocolError as exc:
                self.host.stats["sio_protocol_errors"] += 1
                self.end(f"protocol error: {exc}")
                return
            if action is not None:
                self._dispatch(action)
        if self.engine.state == "closed":
            self.end(self.engine.close_reason)

    def _dispatch(self, action: sio.ClientAction) -> None:
        assert self._nursery is not None
        if isinstance(action, sio.Connect):
            if action.namespace in self._joining or action.namespace in self.sockets:
                self.host.stats["sio_protocol_errors"] += 1
                self.end(f"protocol error: namespace {action.namespace} joined twice")
                return
            self._joining.add(action.namespace)
            self._nursery.start_soon(self._connect, action)
        elif isinstance(action, sio.Leave):
            sock = self.sockets.pop(action.namespace, None)
            if sock is not None:
                sock.left = True
                sock.client.scope.cancel()
                sock.hub.remove(sock.client)
                self.host.release()
        elif isinstance(action, sio.BadEmit):
            self.host.stats["malformed"] += 1
            if action.ack_id is not None:
                self._ack(action.namespace, action.ack_id, self._error_args(BadMessage(action.reason)))
        else:
            self._emit(action)

    def send(self, messages: list[Message]) -> None:
        for message in messages:
            self.engine.send(message)
        if self.engine.queued() > MAX_QUEUED:
            # answers the client does not read (a stalled socket, a flood of bad emits)
            self.host.stats["evicted"] += 1
            self.end("evicted: answers not read")
        self.wake()

    async def _connect(self, action: sio.Connect) -> None:
        nsp = action.namespace
        try:
            await self._join(nsp, action.auth)
        finally:
            self._joining.discard(nsp)

    async def _join(self, nsp: str, auth: Any) -> None:
        try:
            namespace = namespace_from_path(nsp)
        except BadPath:
            self.send(self.sio.connect_error(nsp, "Invalid namespace"))
            return
        refusal = self.host.admit(namespace)
        if refusal is not None:
            self.host.stats["sio_refused_connects"] += 1
            self.send(self.sio.connect_error(nsp, refusal))
            return
        admitted = True
        try:
            handshake = Handshake.build("socket.io", namespace, self.head.headers, self.head.target,
                                        auth, self.remote)
            browser = Browser(handshake, await call_hook(self.host.hooks.authenticate(handshake)))
            hub = self.host.hub_for(namespace)
            client = Client(namespace, EventOutbox(
                self.limits.event_buffer, self.limits.max_skipped,
                lambda n: EventPacket(sio.event(nsp, "$skipped", {"count": n}))), browser,
                event_format=EVENT_FORMAT, wake=self.wake)
            hub.add(client)
            try:
                await hub.ready.wait()
                if hub.failure is not None:
                    raise RemoteError(f"mesh link failed: {hub.failure}"[:200], type="Unreachable")
                await call_hook(self.host.hooks.joined(browser))
            except BaseException:
                hub.remove(client)
                raise
            self._socket_ids += 1
            sock = self.sockets[nsp] = _Socket(client, hub)
            self._joining.discard(nsp)
            admitted = False   # the socket holds the count now
            self.send(self.sio.connected(nsp, f"{self.sid}#{self._socket_ids}"))
            self.host.stats["clients_accepted"] += 1
            with client.scope:    # cancelled when the hub evicts the client or fails
                await trio.sleep_forever()
            if not sock.left:     # (the client may reconnect: a fresh session, a fresh link)
                self.end("evicted: events skipped" if client.evicted else "mesh link failed")
        except Forbidden as exc:
            self.host.stats["sio_refused_connects"] += 1
            self.send(self.sio.connect_error(nsp, exc.message or "forbidden", exc.data))
        except RemoteError as exc:
            self.send(self.sio.connect_error(nsp, exc.message))
        except Exception as exc:
            log.exception("sockend: a hook failed for namespace %r", nsp)
            self.send(self.sio.connect_error(nsp, f"sockend failed: {type(exc).__name__}"))
        finally:
            if admitted:
                self.host.release()

    def _emit(self, emit: sio.Emit) -> None:
        assert self._nursery is not None
        sock = self.sockets.get(emit.namespace)
        if sock is None or sock.hub.link is None:
            return   # (joined by the protocol's count but not ours: mid-connect)
        self.host.stats["requests" if emit.ack_id is not None else "sio_publishes"] += 1
        if self.inflight >= self.limits.max_inflight:
            self.host.stats["refused_requests"] += 1
            if emit.ack_id is not None:
                self._ack(emit.namespace, emit.ack_id, self._error_args(QueueFull(
                    f"at most {self.limits.max_inflight} requests in flight per connection")))
            return
        self.inflight += 1
        self._nursery.start_soon(self._answer, sock, emit)

    async def _answer(self, sock: _Socket, emit: sio.Emit) -> None:
        link, browser = sock.hub.link, sock.client.browser
        assert link is not None
        args: list[Any]
        try:
            if emit.ack_id is None:
                data = emit.args[0] if len(emit.args) == 1 else list(emit.args) or None
                await publish_to_mesh(link, self.host.hooks, browser, emit.name, data)
                return
            request = _request_of(emit)
            result = await call_mesh(link, self.host.hooks, browser, request, self.limits.request_timeout)
            args = [result] if self.limits.ack_style == "answer" else [None, result]
            self.host.stats["answered"] += 1
        except RemoteError as exc:
            self.host.stats["failed"] += 1
            if emit.ack_id is None:
                log.info("sockend: a browser's %r event was not published: %s", emit.name, exc)
                return
            args = self._error_args(exc)
        finally:
            self.inflight -= 1
        self._ack(emit.namespace, emit.ack_id, args)

    def _ack(self, nsp: str, ack_id: int, args: list[Any]) -> None:
        try:
            messages = sio.ack(nsp, ack_id, args)
        except (TypeError, ValueError, RecursionError) as exc:
            messages = sio.ack(nsp, ack_id, self._error_args(RemoteError(
                f"the answer cannot be sent as JSON: {exc}"[:300], type="Unserializable")))
        self.send(messages)

    def _error_args(self, exc: RemoteError) -> list[Any]:
        body = error_to_body(exc)
        return [{"error": body}] if self.limits.ack_style == "answer" else [body]


def _request_of(emit: sio.Emit) -> dict[str, Any]:
    """``emit(type, data, ack)``: the request is ``data`` plus ``type`` (cote's)."""
    if len(emit.args) > 1:
        raise BadMessage("a request has one argument before its ack: an object")
    data = emit.args[0] if emit.args else None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadMessage("a request's argument is an object (it becomes the request, plus 'type')")
    return {**data, "type": emit.name}
