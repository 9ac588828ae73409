"""Shared fixtures for the test suite."""
from __future__ import annotations

import pytest

from support import NodeProcess, free_udp_port, start_node_process, stop_node
from transport.mesh.discovery import DiscoveryConfig


@pytest.fixture
def start_node(tmp_path):
    """``node = await start_node(*paths)``: a real node on loopback, stopped after the test."""
    started: list[NodeProcess] = []

    async def start(*paths, extra: tuple[str, ...] = ()) -> NodeProcess:
        node = await start_node_process(paths, tmp_path / f"node{len(started)}.log", tmp_path, *extra)
        started.append(node)
        return node

    yield start
    left = [p for node in started for p in stop_node(node)]
    assert not left, f"processes left behind after the node stopped: {left}"


@pytest.fixture
def disco():
    """Mesh discovery confined to loopback on a port of this test's own, so tests
    running side by side never see each other's components."""
    return DiscoveryConfig(port=free_udp_port(), interface="127.0.0.1",
                           hello_interval=0.5, expiry=2.0)
