"""The Sockend server: one TCP port for Socket.IO (``/socket.io/``: :mod:`sockend.sio_server`),
Sockend's own websockets (one namespace per path) and the static browser clients.

Per connection: read the HTTP request head (bounded in size and time); a websocket
upgrade from an allowed origin (:mod:`sockend.origin`: the same origin, the allow-list,
or no browser at all) is answered by :mod:`sockend.ws` (both protocols' websockets) from
the head already read, anything else gets a static file or an error.  Per browser: a reader task parses frames and starts one
task per request (at most ``max_inflight`` at a time), each of which answers exactly
once (the Responder's answer, a typed error, or a timeout); a writer task drains the
browser's event outbox.  Per namespace: a :class:`~sockend.hub.NamespaceHub`.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio
from trio_websocket import ConnectionClosed

from transport.errors import Forbidden, QueueFull, RemoteError
from transport.inbound import InputStream

from sockend.bridge import Mesh, NamespaceLink
from sockend.calls import TYPES_REQUEST, call_mesh
from sockend.client_files import HOW_TO_INSTALL, find_client_dist
from sockend.engineio import EngineConfig
from sockend.hooks import BridgeHooks, Browser, Handshake, call_hook
from sockend.http import HeadError, HttpExchange, RequestHead, serve_static
from sockend.hub import Client, NamespaceHub
from sockend.origin import OriginPolicy
from sockend.protocol import (BadFrame, BadPath, ClientChunk, ClientRequest, EventOutbox, credit_frame,
                              error_frame, event_frame, namespace_from_path, ok_frame, parse_request)
from sockend.sio_server import SocketIOEndpoint
from sockend.sio_session import EVENT_FORMAT, SessionLimits, SioSession
from sockend.ws import ServerWebSocket, accept_websocket
from sockend.sio_session import event_frame as sio_event_frame

log = logging.getLogger(__name__)

__all__ = ["Sockend", "SockendConfig", "TYPES_REQUEST"]


@dataclass(frozen=True)
class SockendConfig:
    host: str = "127.0.0.1"
    port: int = 5555
    static_dir: Path | None = None
    max_clients: int = 1000            # websocket clients, all namespaces together
    max_connections: int = 1100        # TCP connections, websocket or not
    max_message_size: int = 64 * 1024  # browser frames; bigger ones close with 1009
    max_inflight: int = 64             # requests per browser
    request_timeout: float = 10.0      # default and ceiling of a request's timeout
    event_buffer: int = 256            # events queued per browser before it skips
    max_skipped: int = 4096            # skips in a row (no read at all) before eviction
    max_namespaces: int = 64
    namespaces: tuple[str, ...] | None = None   # allow-list; None allows any valid name
    linger: float = 30.0               # keep a namespace's mesh link after its last browser
    handshake_timeout: float = 10.0
    # Origins whose pages may open a websocket besides the same origin ("*": any);
    # sockend/origin.py says why and what counts as the same origin.
    allowed_origins: tuple[str, ...] = ()
    # Socket.IO v4 (sio_server.py): on by default, at the path socket.io uses.
    socketio: bool = True
    socketio_path: str = "/socket.io/"
    socketio_client: Path | None = None   # socket.io.js (or its package); None: look for it
    ping_interval: float = 25.0           # Engine.IO's, socket.io's defaults
    ping_timeout: float = 20.0
    # What an ack carries (docs/sockend.md): "answer": (answer) / ({"error": {...}});
    # "node": cote's promise responders' (null, answer) / ({code, type, message, ...}).
    ack_style: Literal["answer", "node"] = "answer"

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be 0..65535, got {self.port}")
        for name in ("max_clients", "max_connections", "max_message_size", "max_inflight",
                     "event_buffer", "max_namespaces"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if self.ack_style not in ("answer", "node"):
            raise ValueError(f"ack_style must be 'answer' or 'node', got {self.ack_style!r}")
        if self.socketio_client is not None:
            object.__setattr__(self, "socketio_client", Path(self.socketio_client))
        for name in ("request_timeout", "handshake_timeout", "ping_interval", "ping_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.linger < 0 or self.max_skipped < 0:
            raise ValueError("linger and max_skipped must be >= 0")
        if self.static_dir is not None:
            object.__setattr__(self, "static_dir", Path(self.static_dir))
        if self.namespaces is not None:
            names = tuple(self.namespaces)
            for n in names:
                namespace_from_path("/" + n)   # raises BadPath (a ValueError) if invalid
            object.__setattr__(self, "namespaces", names)
        # Checked (ValueError naming the entry) and kept normalised.
        object.__setattr__(self, "allowed_origins", OriginPolicy(tuple(self.allowed_origins)).allowed)


class Sockend:
    """``port = (await nursery.start(Sockend(mesh, config, hooks=...).run)).port``."""

    def __init__(self, mesh: Mesh, config: SockendConfig | None = None, *,
                 hooks: BridgeHooks | None = None):
        self.mesh = mesh
        self.config = config or SockendConfig()
        self.hooks = hooks or BridgeHooks()
        self.origins = OriginPolicy(self.config.allowed_origins)
        self.hubs: dict[str, NamespaceHub] = {}
        self.clients = 0
        self.connections = 0
        self.port: int | None = None
        self.stats: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None
        self._formats = {"sockend": lambda _ns, topic, data: event_frame(topic, data),
                         EVENT_FORMAT: sio_event_frame}
        cfg = self.config
        self.socketio: SocketIOEndpoint | None = None
        if cfg.socketio:
            self.socketio = SocketIOEndpoint(
                self, EngineConfig(cfg.ping_interval, cfg.ping_timeout, cfg.max_message_size),
                path=cfg.socketio_path, client_dist=find_client_dist(cfg.socketio_client, cfg.static_dir),
                max_sessions=cfg.max_clients, body_timeout=cfg.handshake_timeout)

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "clients": self.clients, "connections": self.connections,
                "sessions": len(self.socketio.sessions) if self.socketio else 0,
                "namespaces": {ns: len(h.clients) for ns, h in self.hubs.items()},
                "stats": dict(self.stats)}

    # -- what Socket.IO sessions use (sio_session.SessionHost) ------------------------------
    def limits(self) -> SessionLimits:
        cfg = self.config
        return SessionLimits(cfg.max_inflight, cfg.request_timeout, cfg.event_buffer, cfg.max_skipped,
                             cfg.max_message_size, cfg.ack_style, cfg.handshake_timeout)

    def admit(self, namespace: str) -> str | None:
        cfg = self.config
        if cfg.namespaces is not None and namespace not in cfg.namespaces:
            return f"no namespace {namespace!r}"
        if self.clients >= cfg.max_clients:
            return "too many clients"
        if namespace not in self.hubs and len(self.hubs) >= cfg.max_namespaces:
            return "too many namespaces"
        self.clients += 1
        return None

    def release(self) -> None:
        self.clients -= 1

    def hub_for(self, namespace: str) -> NamespaceHub:
        return self._hub(namespace)

    async def start_session(self, session: SioSession) -> None:
        if self._nursery is None:
            raise RuntimeError("Sockend is not running")
        await self._nursery.start(self._run_session, session)

    async def _run_session(self, session: SioSession, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await session.run(task_status=task_status)
        finally:
            assert self.socketio is not None
            self.socketio.forget(session)

    async def run(self, *, task_status: trio.TaskStatus[Sockend] = trio.TASK_STATUS_IGNORED) -> None:
        if self.socketio is not None and self.socketio.client_dist is None:
            log.warning("sockend: /socket.io/socket.io.js will answer 404: %s", HOW_TO_INSTALL)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listeners = await nursery.start(functools.partial(
                trio.serve_tcp, self._on_connection, self.config.port, host=self.config.host))
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self)

    # -- connections ---------------------------------------------------------------------
    async def _on_connection(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.config.max_connections:
            self.stats["refused_connections"] += 1
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        try:
            await self._serve_connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass   # the peer went away mid-answer: nothing left to tell it
        except Exception:
            # One connection's surprise must never take the server (and every other
            # browser) down with it: serve_tcp would propagate it.
            self.stats["connection_errors"] += 1
            log.exception("sockend: connection failed")
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        cfg = self.config
        http = HttpExchange()
        head = None
        with trio.move_on_after(cfg.handshake_timeout):
            try:
                head = await http.read_head(stream)
            except HeadError as exc:
                self.stats["bad_http"] += 1
                await stream.send_all(http.response(400, f"{exc}\n".encode()))
                return
        if head is None:
            self.stats["handshake_timeouts"] += 1
            return
        if self.socketio is not None and self.socketio.handles(head.target):
            return await self._serve_socketio(stream, http, head)
        if not head.is_websocket:
            status = await serve_static(stream, http, head, cfg.static_dir)
            self.stats[f"http_{status}"] += 1
            return
        refusal = self.origins.refusal(head.headers.get("origin"), head.headers.get("host"))
        if refusal is not None:
            # A page of another site, in a visitor's browser: before anything else, so it
            # learns nothing (not even which namespaces exist).
            return await self._refuse(stream, http, 403, refusal)
        try:
            namespace = namespace_from_path(head.target)
        except BadPath as exc:
            return await self._refuse(stream, http, 404, str(exc))
        if cfg.namespaces is not None and namespace not in cfg.namespaces:
            return await self._refuse(stream, http, 404, f"no namespace {namespace!r}")
        refusal = self.admit(namespace)   # counted before any checkpoint, so the limit holds
        if refusal is not None:
            return await self._refuse(stream, http, 404 if refusal.startswith("no ") else 503, refusal)
        try:
            handshake = Handshake.build("sockend", namespace, head.headers, head.target, None, _remote(stream))
            try:
                identity = await call_hook(self.hooks.authenticate(handshake))
            except Forbidden as exc:
                return await self._refuse(stream, http, 403, exc.message or "forbidden")
            await self._websocket(stream, head, functools.partial(
                self._serve_client, namespace=namespace, browser=Browser(handshake, identity)))
        finally:
            self.release()

    async def _websocket(self, stream: trio.SocketStream, head: RequestHead, serve: Any) -> None:
        """Accept the upgrade (within the handshake timeout), run ``serve(ws)``, close."""
        ws = None
        with trio.move_on_after(self.config.handshake_timeout):
            ws = await accept_websocket(stream, head.raw, max_message_size=self.config.max_message_size)
        if ws is None:
            return
        try:
            await serve(ws)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await ws.aclose()

    async def _serve_socketio(self, stream: trio.SocketStream, http: HttpExchange, head: RequestHead) -> None:
        assert self.socketio is not None
        endpoint, remote = self.socketio, _remote(stream)
        if not head.is_websocket:
            status = await endpoint.serve_http(stream, http, head, remote)
            self.stats[f"sio_http_{status}"] += 1
            return
        refusal = self.origins.refusal(head.headers.get("origin"), head.headers.get("host"))
        if refusal is not None:
            return await self._refuse(stream, http, 403, refusal)
        error = endpoint.websocket_refusal(head)
        if error is not None:
            self.stats[f"refused_{error[0]}"] += 1
            await stream.send_all(http.response(error[0], error[1], "application/json"))
            return
        await self._websocket(stream, head, functools.partial(endpoint.serve_websocket, head=head,
                                                              remote=remote))

    async def _refuse(self, stream: trio.SocketStream, http: HttpExchange, status: int, why: str) -> None:
        self.stats[f"refused_{status}"] += 1
        await stream.send_all(http.response(status, f"{why}\n".encode()))

    # -- one browser ---------------------------------------------------------------------
    def _hub(self, namespace: str) -> NamespaceHub:
        hub = self.hubs.get(namespace)
        if hub is None or hub.closing:
            if self._nursery is None:
                raise RuntimeError("Sockend is not running")   # browsers arrive only in run()
            hub = NamespaceHub(namespace, self.mesh, self.stats, linger=self.config.linger,
                               formats=self._formats)
            self.hubs[namespace] = hub
            self._nursery.start_soon(hub.run, self._hub_gone)
        return hub

    def _hub_gone(self, hub: NamespaceHub) -> None:
        if self.hubs.get(hub.namespace) is hub:
            del self.hubs[hub.namespace]

    async def _serve_client(self, ws: ServerWebSocket, *, namespace: str, browser: Browser) -> None:
        cfg = self.config
        client = Client(namespace, EventOutbox(cfg.event_buffer, cfg.max_skipped), browser, ws=ws)
        hub = self._hub(namespace)
        hub.add(client)
        self.stats["clients_accepted"] += 1
        try:
            with client.scope:   # cancelled to evict the browser, or when the hub fails
                await hub.ready.wait()
                if hub.failure is None and hub.link is not None:
                    try:
                        await call_hook(self.hooks.joined(browser))
                    except Exception:
                        log.exception("sockend: the joined hook failed")
                        await ws.aclose(1011, "sockend's joined hook failed")
                        return
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._write_events, client)
                        await self._read_requests(client, hub.link, nursery)
                        nursery.cancel_scope.cancel()
            with trio.move_on_after(1):
                if client.evicted:
                    await ws.aclose(1008, "too slow: events skipped")
                elif hub.failure is not None:
                    # 1011: the browser may reconnect, and gets a fresh mesh link
                    await ws.aclose(1011, f"mesh link failed: {hub.failure}"[:120])
        finally:
            hub.remove(client)

    async def _read_requests(self, client: Client, link: NamespaceLink, nursery: trio.Nursery) -> None:
        while True:
            try:
                message = await client.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == 1009:
                    self.stats["too_big"] += 1
                return
            try:
                request = parse_request(message)
            except BadFrame as exc:
                self.stats["malformed"] += 1
                await self._send(client, error_frame(exc.id, exc.error))
                continue
            if isinstance(request, ClientChunk):  # a chunk of an upload in progress
                chunks = client.uploads.get(request.id)
                if chunks is not None:
                    if request.end:
                        chunks.end()
                        del client.uploads[request.id]
                    else:
                        chunks.feed(request.value)
                continue  # (an upload that already ended or failed: its chunks are moot)
            self.stats["requests"] += 1
            if client.inflight >= self.config.max_inflight:
                self.stats["refused_requests"] += 1
                await self._send(client, error_frame(request.id, QueueFull(
                    f"at most {self.config.max_inflight} requests in flight per connection")))
                continue
            client.inflight += 1
            chunks = None
            if request.chunked:
                rid = request.id
                chunks = client.uploads[rid] = InputStream(
                    lambda n: nursery.start_soon(self._send, client, credit_frame(rid, n)))
            nursery.start_soon(self._answer, client, link, request, chunks)

    async def _answer(self, client: Client, link: NamespaceLink, req: ClientRequest,
                      chunks: InputStream | None = None) -> None:
        limit = min(req.timeout or self.config.request_timeout, self.config.request_timeout)
        try:
            result = await call_mesh(link, self.hooks, client.browser, {**req.data, "type": req.type},
                                     limit, chunks)
            frame = ok_frame(req.id, result)
            if req.type != TYPES_REQUEST:
                self.stats["answered"] += 1
        except RemoteError as exc:
            frame = error_frame(req.id, exc)
            self.stats["failed"] += 1
        finally:
            client.inflight -= 1
            if chunks is not None:
                client.uploads.pop(req.id, None)
        await self._send(client, frame)

    async def _write_events(self, client: Client) -> None:
        while True:
            frame = await client.next_frame()
            if not await self._send(client, frame):
                return
            self.stats["events_sent"] += 1

    async def _send(self, client: Client, frame: str) -> bool:
        try:
            await client.ws.send_message(frame)
            return True
        except ConnectionClosed:
            return False


def _remote(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return ""
