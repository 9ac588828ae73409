"""The node's HTTP port for operators: Prometheus metrics and a dashboard
(``python -m engine run --metrics 127.0.0.1:9301``; docs/operations.md).

Routes, GET only (anything else is 405):

- ``/metrics``: Prometheus's text format, from the node's own registry
  (:mod:`engine.node.metrics`), read at each scrape;
- ``/``: the dashboard, one static page (``dashboard.html`` beside this module) that
  polls ``/api/state`` every second and draws its tables and charts itself;
- ``/api/state``: the node, its apps, pools, drivers, recent faults and cluster, as JSON.

Served by :class:`transport.page_server.PageServer` (GET only, bounded, one connection's
trouble its own; no authentication: bound to loopback by default, where only ``Host``
headers that are an IP address or ``localhost`` are answered, against DNS rebinding).
Beyond loopback, put it behind a proxy that authenticates (docs/operations.md).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING

import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from transport.page_server import (CSP as CSP, HTML, JSON, TEXT, PageServer, Response,
                                   host_allowed as host_allowed, is_loopback as is_loopback,
                                   serve_pages,
                                   shown_host)

from engine.node.metrics import node_registry, node_state, render

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from engine.node.metrics import MetricsNode

DEFAULT_METRICS = "127.0.0.1:9301"


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


def dashboard_page() -> bytes:
    """The dashboard's page, shipped beside this module (package data)."""
    return resources.files("engine.node").joinpath("dashboard.html").read_bytes()


class MetricsServer(PageServer):
    """What the HTTP port answers, for one node (reading the node at each request)."""

    what = "metrics port"
    owner = "the node"
    docs = "docs/operations.md"

    def __init__(self, node: MetricsNode, *, guard_host: bool = True) -> None:
        super().__init__(guard_host=guard_host)
        self.node = node
        self.registry: CollectorRegistry
        self.registry, self.collector = node_registry(node)
        self.page: bytes | None = None     # read on first use, then kept

    def route(self, path: str) -> Response:
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


async def serve_metrics(node: MetricsNode, address: str, *,
                        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/metrics``, ``/`` and ``/api/state`` for ``node`` on ``address``
    (``HOST:PORT``, port 0 allowed) until cancelled; ``started()`` with the bound
    ``HOST:PORT``.  Raises :class:`AddressError` or ``OSError`` (the port is taken)
    before that."""
    host, port = parse_address(address)
    await serve_pages(MetricsServer(node, guard_host=is_loopback(host)), host, port,
                      show=lambda host, port: f"{shown_host(host)}:{port}",
                      task_status=task_status)
