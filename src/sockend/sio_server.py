"""Socket.IO v4 on Sockend's port: the ``/socket.io/`` endpoint on trio.

Routes, as socket.io's own server has them (``docs/sockend.md``):

- ``GET /socket.io/?EIO=4&transport=polling``: a new session (the OPEN packet);
  ``GET ...&sid=S``: a long poll, answered when the session has packets (a ping at the
  latest every ``ping_interval``); ``POST ...&sid=S``: packets from the client;
- a websocket upgrade on ``/socket.io/?EIO=4&transport=websocket``: a session on a
  websocket from the start, or, with ``&sid=S``, the upgrade of a polling session
  (probe, then ``upgrade``: :mod:`sockend.engineio`);
- ``GET /socket.io/socket.io.js`` (and its ``.min``/``.map`` siblings): the browser
  client, from an installed ``socket.io-client`` (:mod:`sockend.client_files`).

Errors are Engine.IO's: HTTP 400 with ``{"code": n, "message": ...}`` (0 transport
unknown, 1 session ID unknown, 2 bad handshake method, 3 bad request, 5 unsupported
protocol version); the Origin check of websockets (:mod:`sockend.origin`) applies to
polling too, with CORS headers for the origins it allows.
"""
from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote

import trio
from trio_websocket import ConnectionClosed

from sockend.client_files import CLIENT_FILES, HOW_TO_INSTALL
from sockend.engineio import EngineConfig, EngineProtocolError, EngineSession, Transport
from sockend.http import HeadError, HttpExchange, RequestHead, content_type
from sockend.origin import OriginPolicy
from sockend.sio_session import SessionHost, SioSession
from sockend.ws import ServerWebSocket, frame

log = logging.getLogger(__name__)

ERRORS = {0: "Transport unknown", 1: "Session ID unknown", 2: "Bad handshake method",
          3: "Bad request", 5: "Unsupported protocol version"}
POLL_TYPE = "text/plain; charset=UTF-8"


class EndpointHost(SessionHost, Protocol):
    origins: OriginPolicy

    async def start_session(self, session: SioSession) -> None:
        """Run ``session.run`` in the server's nursery; returns once it started."""


class SocketIOEndpoint:
    def __init__(self, host: EndpointHost, engine: EngineConfig, *, path: str = "/socket.io/",
                 client_dist: Path | None = None, max_sessions: int = 1000,
                 body_timeout: float = 10.0) -> None:
        self.host = host
        self.engine = engine
        self.path = "/" + path.strip("/") + "/"
        self.client_dist = client_dist
        self.max_sessions = max_sessions
        self.body_timeout = body_timeout
        self.sessions: dict[str, SioSession] = {}

    def handles(self, target: str) -> bool:
        path = target.split("?", 1)[0]
        return path == self.path or path == self.path.rstrip("/") or path.startswith(self.path)

    # -- sessions --------------------------------------------------------------------------
    async def _new_session(self, transport: Transport, head: RequestHead, remote: str) -> SioSession:
        sid = secrets.token_urlsafe(15)
        session = SioSession(self.host, EngineSession(sid, self.engine, transport, trio.current_time()),
                             head, remote)
        self.sessions[sid] = session
        self.host.stats["sio_sessions"] += 1
        await self.host.start_session(session)
        return session

    def forget(self, session: SioSession) -> None:
        """Called when a session's run ends."""
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]

    def _query(self, head: RequestHead) -> tuple[dict[str, str], tuple[int, int] | None]:
        """The query, and (HTTP status, Engine.IO error code) when it is refused."""
        query = dict(parse_qsl(head.target.split("?", 1)[1] if "?" in head.target else ""))
        if query.get("EIO") != "4":
            return query, (400, 5)
        transport = query.get("transport")
        if transport not in ("polling", "websocket") or (transport == "websocket") != head.is_websocket:
            return query, (400, 0)
        sid = query.get("sid")
        if sid is not None:
            session = self.sessions.get(sid)
            if session is None or session.ended.is_set():
                return query, (400, 1)
            if head.is_websocket and (session.engine.transport != "polling" or session.websocket):
                return query, (400, 3)   # upgraded already, or a websocket is probing
        elif len(self.sessions) >= self.max_sessions:
            return query, (503, 3)
        return query, None

    # -- websockets ------------------------------------------------------------------------
    def websocket_refusal(self, head: RequestHead) -> tuple[int, bytes] | None:
        """Why an upgrade must be refused before it is accepted (status, body), or None."""
        _, error = self._query(head)
        return None if error is None else (error[0], _error_body(error[1]))

    async def serve_websocket(self, ws: ServerWebSocket, head: RequestHead, remote: str) -> None:
        query, error = self._query(head)
        sid = query.get("sid")
        session = self.sessions.get(sid) if sid else None
        if error is not None or (sid and session is None):
            await ws.aclose(1008, "session unknown")
            return
        if session is None:
            session = await self._new_session("websocket", head, remote)
            await ws.send_frames(frame(session.engine.open_packet(())))
        elif session.websocket:
            await ws.aclose(1008, "a websocket is attached already")
            return
        session.websocket = True   # one at a time: two writers would split its packets
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ws_writer, session, ws)
                nursery.start_soon(_cancel_when_ended, session, nursery.cancel_scope)
                await self._ws_reader(session, ws)
                nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            session.websocket = False
            if session.engine.transport == "websocket":
                session.end("transport closed")

    async def _ws_reader(self, session: SioSession, ws: ServerWebSocket) -> None:
        engine = session.engine
        while True:
            try:
                received = await ws.get_messages()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == 1009:
                    self.host.stats["too_big"] += 1
                return
            for message in received:
                try:
                    messages = engine.receive_ws(message)
                except EngineProtocolError as exc:
                    self.host.stats["sio_protocol_errors"] += 1
                    session.end(f"protocol error: {exc}")
                    return
                answers = engine.take_probe_answers()
                if answers:
                    await ws.send_frames(b"".join(frame(a) for a in answers))
                session.receive(messages)
            session.wake()   # a probe releases the poll; an upgrade hands writing over

    @staticmethod
    async def _ws_writer(session: SioSession, ws: ServerWebSocket) -> None:
        engine = session.engine
        while True:
            if engine.transport == "websocket":
                chunks = [frame(m) for m in engine.take_ws()]
                chunks += [packet.frames() for packet in session.take_events()]
                if chunks:
                    await ws.send_frames(b"".join(chunks))
                    continue
            if session.ended.is_set():
                return
            await session.changed()

    # -- HTTP: polling and the client file ---------------------------------------------------
    async def serve_http(self, stream: trio.abc.Stream, http: HttpExchange, head: RequestHead,
                         remote: str) -> int:
        """Answer one HTTP request under the path; returns the status sent."""
        name = unquote(head.target.split("?", 1)[0])[len(self.path):]
        if name in CLIENT_FILES:
            return await self._client_file(stream, http, head, name)
        origin = head.headers.get("origin")
        refusal = self.host.origins.refusal(origin, head.headers.get("host"))
        if refusal is not None:
            self.host.stats["refused_403"] += 1
            await stream.send_all(http.response(403, f"{refusal}\n".encode()))
            return 403
        cors = [] if origin is None else [("Access-Control-Allow-Origin", origin),
                                          ("Access-Control-Allow-Credentials", "true"), ("Vary", "Origin")]
        if head.method == "OPTIONS":   # a preflight (a client that sets extra headers)
            cors += [("Access-Control-Allow-Methods", "GET, POST"),
                     ("Access-Control-Allow-Headers",
                      head.headers.get("access-control-request-headers", "content-type"))]
            await stream.send_all(http.response(204, b"", extra=cors))
            return 204
        query, error = self._query(head)
        if error is not None:
            return await self._error(stream, http, *error, cors)
        sid = query.get("sid")
        if sid is None:
            if head.method != "GET":
                return await self._error(stream, http, 400, 2, cors)
            session = await self._new_session("polling", head, remote)
            body = session.engine.open_packet(("websocket",))
            await stream.send_all(http.response(200, body.encode(), POLL_TYPE, extra=cors))
            return 200
        session = self.sessions[sid]
        if session.engine.transport != "polling":    # upgraded: the websocket carries it all
            return await self._error(stream, http, 400, 3, cors)
        if head.method == "GET":
            if session.polling:      # two polls at once: the protocol ends the session
                session.end("two polls at once")
                return await self._error(stream, http, 400, 3, cors)
            body = await session.poll()
            await stream.send_all(http.response(200, body.encode(), POLL_TYPE, extra=cors))
            return 200
        if head.method != "POST":
            return await self._error(stream, http, 400, 3, cors)
        data = None
        with trio.move_on_after(self.body_timeout):
            try:
                data = await http.read_body(stream, self.engine.max_payload)
            except HeadError as exc:
                session.end(f"bad POST: {exc}")
                self.host.stats["sio_protocol_errors"] += 1
                await stream.send_all(http.response(413 if "over" in str(exc) else 400,
                                                    f"{exc}\n".encode(), extra=cors))
                return 400
        if data is None:
            return await self._error(stream, http, 400, 3, cors)
        try:
            messages = session.engine.receive_polling(data)
        except EngineProtocolError as exc:
            self.host.stats["sio_protocol_errors"] += 1
            session.end(f"protocol error: {exc}")
            return await self._error(stream, http, 400, 3, cors)
        session.receive(messages)
        await stream.send_all(http.response(200, b"ok", "text/html", extra=cors))
        return 200

    async def _client_file(self, stream: trio.abc.Stream, http: HttpExchange, head: RequestHead,
                           name: str) -> int:
        if head.method not in ("GET", "HEAD"):
            await stream.send_all(http.response(405, b"only GET and HEAD\n"))
            return 405
        path = self.client_dist / name if self.client_dist is not None else None
        try:
            body = await trio.Path(path).read_bytes() if path is not None else None
        except OSError:
            body = None
        if body is None or path is None:
            await stream.send_all(http.response(404, f"{HOW_TO_INSTALL}\n".encode()))
            return 404
        await stream.send_all(http.response(200, body, content_type(path)))
        return 200

    async def _error(self, stream: trio.abc.Stream, http: HttpExchange, status: int, code: int,
                     cors: list[tuple[str, str]]) -> int:
        self.host.stats[f"sio_error_{code}"] += 1
        await stream.send_all(http.response(status, _error_body(code), "application/json", extra=cors))
        return status


def _error_body(code: int) -> bytes:
    return json.dumps({"code": code, "message": ERRORS[code]}).encode()


async def _cancel_when_ended(session: SioSession, scope: trio.CancelScope) -> None:
    await session.ended.wait()
    scope.cancel()
