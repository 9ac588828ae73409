"""A small read-only HTTP server for operators' pages: the node's metrics and dashboard
(engine/node/dashboard.py) and the mesh monitor's graph (transport/mesh/monitor_web.py)
answer through it, each with its own routes (:meth:`PageServer.route`).

GET only (anything else is 405).  Each request on a connection of its own
(``Connection: close``), parsed and answered by an h11 server connection: the head is
bounded (:data:`MAX_HEAD`), the whole exchange too (:data:`CLIENT_TIMEOUT`), at most
:data:`MAX_CONNECTIONS` at once (more are closed unanswered); whatever goes wrong on one
connection ends that connection only.

No authentication: such pages bind to loopback by default, and a loopback server
answers only requests whose ``Host`` is an IP address or ``localhost`` (so a web page
elsewhere cannot reach it through DNS rebinding).  Beyond loopback they belong behind a
proxy that authenticates.
"""
from __future__ import annotations

import ipaddress
import logging
from http import HTTPStatus
from typing import Any, Callable

import h11
import trio

log = logging.getLogger(__name__)

MAX_HEAD = 8192           # bytes of a request head
CLIENT_TIMEOUT = 10.0     # seconds for one whole exchange (a slow client is dropped)
MAX_CONNECTIONS = 64      # served at once; more are closed at once
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
JSON = "application/json"
# The page's own inline script and styles, and requests to this origin only.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

Response = tuple[int, bytes, str]     # (status, body, content type)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(header: str) -> bool:
    """A loopback server's guard against DNS rebinding: the request's ``Host`` must be
    an IP address or ``localhost`` (a name an attacker controls is refused)."""
    host = header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class PageServer:
    """What one such port answers: :meth:`answer` maps a request to a response (pure but
    for what :meth:`route` reads), :meth:`serve_connection` runs one connection.  A
    subclass names itself (``what``: for logs; ``owner``: who logs a failure; ``docs``:
    where its security note is) and writes :meth:`route`."""

    what = "page server"
    owner = "the server"
    docs = "docs/architecture.md"

    def __init__(self, *, guard_host: bool = True) -> None:
        self.guard_host = guard_host       # refuse Hosts that are not IPs or localhost
        self.requests = 0
        self.failures = 0                  # connections that ended in an error

    def route(self, path: str) -> Response:
        """The response for a GET of ``path`` (query and fragment removed)."""
        raise NotImplementedError

    def answer(self, method: str, target: str, host: str | None) -> Response:
        """``(status, body, content type)`` for one request."""
        if method != "GET":
            return 405, b"only GET\n", TEXT
        if self.guard_host and not host_allowed(host or ""):
            return 403, (b"this port answers requests to an IP address or localhost only "
                         b"(a DNS rebinding guard; see " + self.docs.encode() + b")\n"), TEXT
        return self.route(target.split("?", 1)[0].split("#", 1)[0])

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Answer one request on ``stream`` and close it; never raises (but Cancelled)."""
        try:
            with trio.move_on_after(CLIENT_TIMEOUT):
                await self._exchange(stream)
        except Exception as exc:   # one connection's trouble is that connection's only
            self.failures += 1
            log.debug("%s: a connection failed: %s: %s", self.what, type(exc).__name__, exc)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        request: h11.Request | None = None
        while request is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send(stream, conn, exc.error_status_hint,
                                 f"bad request: {exc}\n".encode(), TEXT)
                return
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    return             # closed before a whole request head
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
            else:
                return
        self.requests += 1
        host = None
        for name, value in request.headers:
            if name == b"host":
                host = value.decode("latin-1")
        try:
            status, body, ctype = self.answer(request.method.decode("ascii", "replace"),
                                              request.target.decode("latin-1"), host)
        except Exception:
            log.exception("%s: could not answer %s", self.what, request.target[:100])
            status, body, ctype = 500, f"internal error (logged by {self.owner})\n".encode(), TEXT
        await self._send(stream, conn, status, body, ctype)

    async def _send(self, stream: trio.abc.Stream, conn: h11.Connection, status: int,
                    body: bytes, ctype: str) -> None:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                   ("Connection", "close")]
        if status == 405:
            headers.append(("Allow", "GET"))
        if ctype == HTML:
            headers += [("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY"),
                        ("Referrer-Policy", "no-referrer")]
        out = conn.send(h11.Response(status_code=status, headers=headers,
                                     reason=HTTPStatus(status).phrase)) or b""
        out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


async def serve_pages(server: PageServer, host: str, port: int, *,
                      show: Callable[[str, int], str] = lambda host, port: f"{host}:{port}",
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``server`` on ``host:port`` (port 0 picks a free one) until cancelled;
    ``started()`` with ``show(bound host, bound port)``.  Raises ``OSError`` (the port
    is taken, no such address) before that."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await server.serve_connection(stream)
        finally:
            limit.release()

    sockname: Any = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(show(sockname[0], sockname[1]))


def shown_host(host: str) -> str:
    """``host`` as it goes before ``:PORT`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host
