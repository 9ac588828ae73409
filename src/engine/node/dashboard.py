"""The node's HTTP port for operators: Prometheus metrics and a dashboard
(``python -m engine run --metrics 127.0.0.1:9301``; docs/operations.md).

Routes, GET only (anything else is 405):

- ``/metrics``: Prometheus's text format, from the node's own registry
  (:mod:`engine.node.metrics`), read at each scrape;
- ``/``: the dashboard, one static page (``dashboard.html`` beside this module) that
  polls ``/api/state`` every second and draws its tables and charts itself;
- ``/api/state``: the node, its apps, pools, drivers, recent faults and cluster, as JSON.

Each request on a connection of its own (``Connection: close``), parsed and answered by
an h11 server connection: the head is bounded (:data:`MAX_HEAD`), the whole exchange
too (:data:`CLIENT_TIMEOUT`), at most :data:`MAX_CONNECTIONS` at once (more are closed
unanswered); whatever goes wrong on one connection ends that connection only.

No authentication: bound to loopback by default, and a loopback server answers only
requests whose ``Host`` is an IP address or ``localhost`` (so a web page elsewhere
cannot reach it through DNS rebinding).  Beyond loopback, put it behind a proxy that
authenticates (docs/operations.md).
"""
from __future__ import annotations

import ipaddress
import json
import logging
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

import h11
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.node.metrics import node_registry, node_state, render

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from engine.node.metrics import MetricsNode

log = logging.getLogger(__name__)

DEFAULT_METRICS = "127.0.0.1:9301"
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


class AddressError(ValueError):
    """A --metrics address that is not HOST:PORT."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9301`` for IPv6; a bare ``PORT`` is on 127.0.0.1) ->
    ``(host, port)``; port 0 picks a free one."""
    text = address.strip()
    if text.startswith("http://"):
        text = text[len("http://"):].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise AddressError(f"--metrics: no host in {address!r} (HOST:PORT, e.g. {DEFAULT_METRICS})")
    try:
        number = int(port)
    except ValueError:
        raise AddressError(f"--metrics: {address!r} is not HOST:PORT "
                           f"(e.g. {DEFAULT_METRICS})") from None
    if not 0 <= number < 65536:
        raise AddressError(f"--metrics: port {number} out of range")
    return host, number


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


def dashboard_page() -> bytes:
    """The dashboard's page, shipped beside this module (package data)."""
    return resources.files("engine.node").joinpath("dashboard.html").read_bytes()


class MetricsServer:
    """What the HTTP port answers, for one node: :meth:`answer` maps a request to a
    response (pure but for reading the node), :meth:`serve_connection` runs one
    connection."""

    def __init__(self, node: MetricsNode, *, guard_host: bool = True) -> None:
        self.node = node
        self.registry: CollectorRegistry
        self.registry, self.collector = node_registry(node)
        self.guard_host = guard_host       # refuse Hosts that are not IPs or localhost
        self.page: bytes | None = None     # read on first use, then kept
        self.requests = 0
        self.failures = 0                  # connections that ended in an error

    def answer(self, method: str, target: str, host: str | None) -> tuple[int, bytes, str]:
        """``(status, body, content type)`` for one request."""
        if method != "GET":
            return 405, b"only GET\n", TEXT
        if self.guard_host and not host_allowed(host or ""):
            return 403, (b"this port answers requests to an IP address or localhost only "
                         b"(a DNS rebinding guard; see docs/operations.md)\n"), TEXT
        path = target.split("?", 1)[0].split("#", 1)[0]
        if path == "/metrics":
            return 200, render(self.registry), CONTENT_TYPE_LATEST
        if path == "/api/state":
            body = json.dumps(node_state(self.node), default=str, separators=(",", ":"))
            return 200, body.encode(), JSON
        if path in ("/", "/index.html"):
            if self.page is None:
                self.page = dashboard_page()
            return 200, self.page, HTML
        return 404, b"not found (try /, /metrics or /api/state)\n", TEXT

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Answer one request on ``stream`` and close it; never raises (but Cancelled)."""
        try:
            with trio.move_on_after(CLIENT_TIMEOUT):
                await self._exchange(stream)
        except Exception as exc:   # one connection's trouble is that connection's only
            self.failures += 1
            log.debug("metrics port: a connection failed: %s: %s", type(exc).__name__, exc)
        finally:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        request: h11.Request | None = None
        status: int
        while request is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._send(stream, conn, status, f"bad request: {exc}\n".encode(), TEXT)
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
            log.exception("metrics port: could not answer %s", request.target[:100])
            status, body, ctype = 500, b"internal error (logged by the node)\n", TEXT
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


async def serve_metrics(node: MetricsNode, address: str, *,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/metrics``, ``/`` and ``/api/state`` for ``node`` on ``address``
    (``HOST:PORT``, port 0 allowed) until cancelled; ``started()`` with the bound
    ``HOST:PORT``.  Raises :class:`AddressError` or ``OSError`` (the port is taken)
    before that."""
    host, port = parse_address(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = MetricsServer(node, guard_host=is_loopback(host))
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
    bound_host, bound_port = sockname[0], sockname[1]
    bound = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(bound)
