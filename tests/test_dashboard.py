"""The node's dashboard in a real browser: a node (`python -m engine run --metrics
127.0.0.1:0`) hosting the echo example under steady traffic, its page loaded by headless
Chromium, which runs the page's script (polling /api/state, drawing tables and charts):
the DOM it leaves shows the app, its slaves and charts with points, and a screenshot is
taken.  Skipped, saying why, where Chromium is not installed (.ci/run installs it)."""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import trio

from engine.client import connect
from browser_support import chromium, chromium_or_skip

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo"
METRICS_RE = re.compile(r"metrics and dashboard on (http://127\.0\.0\.1:\d+/)")


async def traffic(address: str, calls: dict[str, int]) -> None:
    """Keep requests flowing until cancelled: echoes, streams and a failing event."""
    async with connect(address, timeout=30) as client:
        async def caller(event: str, payload: object, pause: float) -> None:
            while True:
                try:
                    await client.call("echo", event, payload)
                except Exception:
                    pass
                calls[event] = calls.get(event, 0) + 1
                await trio.sleep(pause)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller, "echo", {"hello": 1}, 0.002)
            nursery.start_soon(caller, "count", {"n": 3}, 0.02)
            nursery.start_soon(caller, "no-such-event", None, 0.2)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_the_dashboard_shows_apps_slaves_and_live_charts_under_traffic(tmp_path, start_node):
    binary = chromium_or_skip("dashboard's")
    apps = tmp_path / "apps"
    shutil.copytree(ECHO, apps / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    node = await start_node(apps, extra=("--metrics", "127.0.0.1:0"))
    match = METRICS_RE.search(node.stderr)
    assert match, node.stderr
    url = match.group(1)
    calls: dict[str, int] = {}
    with trio.fail_after(55):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, node.address, calls)
            while calls.get("echo", 0) < 50:         # traffic flows before the page loads
                await trio.sleep(0.05)
            # The page polls every second of *virtual* time: a budget of 6 s runs its
            # script through several polls (each a real request to the node) and then
            # dumps the DOM it drew.
            dom = (await chromium(binary, tmp_path, "dom", "--virtual-time-budget=6000",
                                  "--dump-dom", url)).decode()
            shot = tmp_path / "dashboard.png"
            await chromium(binary, tmp_path, "shot", "--window-size=1280,900",
                           "--virtual-time-budget=6000", f"--screenshot={shot}", url)
            nursery.cancel_scope.cancel()
    (tmp_path / "dashboard.html").write_text(dom)      # kept with the test's files, to look at

    polls = int(re.search(r'<body data-polls="(\d+)"', dom).group(1))
    assert polls >= 3, "the page polled /api/state a few times"
    # The apps table: the app, running, with its slaves counted.
    row = re.search(r'<tr data-app="echo">(.*?)</tr>', dom, re.S)
    assert row, "the apps table has a row for echo"
    assert "running" in row.group(1)
    slaves = re.search(r'class="l slaves" data-busy="(\d+)" data-idle="(\d+)" data-starting="(\d+)"',
                       row.group(1))
    assert slaves, row.group(1)
    busy, idle, starting = map(int, slaves.groups())
    assert 1 <= busy + idle + starting <= 4, "echo's pool-limit is 4, and traffic keeps one up"
    assert f"{busy}/{idle}/{starting} of 4" in row.group(1)
    # The events table saw the traffic, failures included.
    assert re.search(r'<tr data-app="echo" data-event="echo">', dom)
    assert "unknown-event" in dom
    # Both charts have a line with points for echo.
    for chart in ("chart-rate", "chart-latency"):
        svg = re.search(rf'<svg[^>]*id="{chart}"[^>]*data-points="(\d+)"', dom)
        assert svg and int(svg.group(1)) >= 2, f"{chart} has points"
    line = re.search(r'<path d="(M[^"]+)"[^>]*data-series="echo" data-points="(\d+)"', dom)
    assert line and int(line.group(2)) >= 2 and "L" in line.group(1), "a line for echo's rate"
    assert re.search(r'<span id="live-text">live · ', dom), "the last poll got its answer"

    data = shot.read_bytes()
    assert png_size(data) == (1280, 900)
    assert len(data) > 20_000, "a screenshot with something drawn in it"
    json.dumps(calls)  # (what was sent, for a failure's report)
