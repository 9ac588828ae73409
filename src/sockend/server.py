"""The Sockend server: one TCP port for websockets (one namespace per path) and the
static browser client.

Per connection: read the HTTP request head (bounded in size and time); a websocket
upgrade from an allowed origin (:mod:`sockend.origin`: the same origin, the allow-list,
or no browser at all) is handed to trio-websocket with the head replayed, anything else
gets a static file or an error.  Per browser: a reader task parses frames and starts one
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

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from transport.errors import QueueFull, RemoteError, TimeoutError_, TransportError, Unreachable
from transport.inbound import InputStream

from sockend.bridge import Mesh, NamespaceLink
from sockend.http import HeadError, HttpExchange, PrefixedStream, serve_static
from sockend.hub import Client, NamespaceHub
from sockend.origin import OriginPolicy
from sockend.protocol import (BadFrame, BadPath, ClientChunk, ClientRequest, EventOutbox, credit_frame,
                       error_frame, namespace_from_path, ok_frame, parse_request)

log = logging.getLogger(__name__)

TYPES_REQUEST = "$types"   # answered by Sockend itself: the namespace's Responder types


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

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536):
            raise ValueError(f"port must be 0..65535, got {self.port}")
        for name in ("max_clients", "max_connections", "max_message_size", "max_inflight",
                     "event_buffer", "max_namespaces"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        for name in ("request_timeout", "handshake_timeout"):
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
    """``port = (await nursery.start(Sockend(mesh, config).run)).port``."""

    def __init__(self, mesh: Mesh, config: SockendConfig | None = None):
        self.mesh = mesh
        self.config = config or SockendConfig()
        self.origins = OriginPolicy(self.config.allowed_origins)
        self.hubs: dict[str, NamespaceHub] = {}
        self.clients = 0
        self.connections = 0
        self.port: int | None = None
        self.stats: Counter[str] = Counter()
        self._nursery: trio.Nursery | None = None

    def info(self) -> dict:
        return {"port": self.port, "clients": self.clients, "connections": self.connections,
                "namespaces": {ns: len(h.clients) for ns, h in self.hubs.items()},
                "stats": dict(self.stats)}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
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
        if self.clients >= cfg.max_clients:
            return await self._refuse(stream, http, 503, "too many clients")
        if namespace not in self.hubs and len(self.hubs) >= cfg.max_namespaces:
            return await self._refuse(stream, http, 503, "too many namespaces")
        self.clients += 1   # counted before any checkpoint, so the limit holds
        try:
            async with trio.open_nursery() as conn_nursery:
                ws = None
                with trio.move_on_after(cfg.handshake_timeout):
                    request = await wrap_server_stream(
                        conn_nursery, PrefixedStream(head.raw, stream),
                        message_queue_size=4, max_message_size=cfg.max_message_size)
                    ws = await request.accept()
                if ws is not None:
                    try:
                        await self._serve_client(ws, namespace, _remote(stream))
                    finally:
                        with trio.move_on_after(1) as cleanup:
                            cleanup.shield = True
                            await ws.aclose()
                conn_nursery.cancel_scope.cancel()
        finally:
            self.clients -= 1

    async def _refuse(self, stream: trio.SocketStream, http: HttpExchange, status: int, why: str) -> None:
        self.stats[f"refused_{status}"] += 1
        await stream.send_all(http.response(status, f"{why}\n".encode()))

    # -- one browser ---------------------------------------------------------------------
    def _hub(self, namespace: str) -> NamespaceHub:
        hub = self.hubs.get(namespace)
        if hub is None or hub.closing:
            if self._nursery is None:
                raise RuntimeError("Sockend is not running")   # browsers arrive only in run()
            hub = NamespaceHub(namespace, self.mesh, self.stats, linger=self.config.linger)
            self.hubs[namespace] = hub
            self._nursery.start_soon(hub.run, self._hub_gone)
        return hub

    def _hub_gone(self, hub: NamespaceHub) -> None:
        if self.hubs.get(hub.namespace) is hub:
            del self.hubs[hub.namespace]

    async def _serve_client(self, ws: WebSocketConnection, namespace: str, remote: str) -> None:
        cfg = self.config
        client = Client(ws, namespace, EventOutbox(cfg.event_buffer, cfg.max_skipped), remote)
        hub = self._hub(namespace)
        hub.add(client)
        self.stats["clients_accepted"] += 1
        try:
            with client.scope:   # cancelled to evict the browser, or when the hub fails
                await hub.ready.wait()
                if hub.failure is None and hub.link is not None:
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
            if req.type == TYPES_REQUEST:
                frame = ok_frame(req.id, link.responder_types())
            else:
                # Past the link's own timeout, a grace second: a link that misbehaves
                # still cannot leave the browser without an answer.
                with trio.move_on_after(limit + 1) as guard:
                    request = {**req.data, "type": req.type}
                    if chunks is None:
                        result = await link.request(request, limit)
                    else:
                        result = await link.request(request, limit, chunks=chunks)
                if guard.cancelled_caught:
                    raise TimeoutError_(f"no answer to {req.type!r} within {limit:g} s")
                frame = ok_frame(req.id, result)
                self.stats["answered"] += 1
        except RemoteError as exc:
            frame = error_frame(req.id, exc)
            self.stats["failed"] += 1
        except TransportError as exc:
            frame = error_frame(req.id, Unreachable(f"mesh: {exc}"))
            self.stats["failed"] += 1
        except Exception as exc:
            log.exception("sockend: request %r failed inside sockend", req.type)
            frame = error_frame(req.id, RemoteError(f"sockend failed: {exc}", type=type(exc).__name__))
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
