"""The monitor's web page: ``python -m transport monitor --web PORT`` (docs/mesh.md).

Routes, GET only (anything else is 405):

- ``/``: one static page (``monitor.html`` beside this module: plain inline script, no
  CDN, no build step) that polls ``/api/graph`` every second and draws the mesh as an
  SVG graph: who is there and who talks to whom, with the counts;
- ``/api/graph``: :meth:`Monitor.graph <transport.mesh.monitor.Monitor.graph>` as JSON.

Served by :class:`transport.page_server.PageServer` (GET only, bounded, one connection's
trouble its own), as the node's dashboard is.  No authentication: bound to loopback by
default (``--web-host``), where only ``Host`` headers that are an IP address or
``localhost`` are answered (against DNS rebinding).  What it shows is what the beacons
already tell the LAN (names, hosts, pids, types, counts); beyond loopback, put it behind
a proxy that authenticates.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Callable

import trio

from transport.page_server import (CSP as CSP, HTML, JSON, TEXT, PageServer, Response,
                                   host_allowed as host_allowed, is_loopback, serve_pages,
                                   shown_host)

Graph = Callable[[], dict[str, Any]]


def monitor_page() -> bytes:
    """The page, shipped beside this module (package data)."""
    return resources.files("transport.mesh").joinpath("monitor.html").read_bytes()


class GraphServer(PageServer):
    """What the monitor's web port answers (calling ``graph`` at each request)."""

    what = "monitor web"
    owner = "the monitor"
    docs = "docs/mesh.md"

    def __init__(self, graph: Graph, *, guard_host: bool = True) -> None:
        super().__init__(guard_host=guard_host)
        self.graph = graph
        self.page: bytes | None = None     # read on first use, then kept

    def route(self, path: str) -> Response:
        if path == "/api/graph":
            body = json.dumps(self.graph(), default=str, separators=(",", ":"))
            return 200, body.encode(), JSON
        if path in ("/", "/index.html"):
            if self.page is None:
                self.page = monitor_page()
            return 200, self.page, HTML
        return 404, b"not found (try / or /api/graph)\n", TEXT


async def serve_graph(graph: Graph, host: str, port: int, *,
                      task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/`` and ``/api/graph`` (``graph()``, as JSON) on ``host:port`` (port 0
    picks a free one) until cancelled; ``started()`` with the page's URL.  Raises
    ``OSError`` (the port is taken, no such address) before that."""
    await serve_pages(GraphServer(graph, guard_host=is_loopback(host)), host, port,
                      show=lambda host, port: f"http://{shown_host(host)}:{port}/",
                      task_status=task_status)
