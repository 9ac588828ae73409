"""Shared fixtures for the test suite."""
from __future__ import annotations

import pytest

from support import NodeProcess, start_node_process, stop_node


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
