"""The node's metrics: per-event accounting (engine/event_stats.py), the Prometheus
collector over a node (engine/node/metrics.py) and the HTTP port that serves it
(engine/node/dashboard.py), every scrape read back with prometheus_client's own parser.

In process first (a fake pool's jobs, memory streams: no sockets), then a real node
(`python -m engine run --metrics 127.0.0.1:0`) driven through its control endpoint with
calls that succeed, fail, crash their slave and are refused, scraped over HTTP."""
from __future__ import annotations

import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from engine.app import App
from engine.errors import JobCancelled, QueueFull, ShuttingDown, SlaveDied
from engine.event_stats import BUCKETS, MAX_EVENTS, OTHER, EventStats, bucket_quantile
from engine.manifest import load_manifest
from transport import page_server
from engine.node.dashboard import (AddressError, MetricsServer, dashboard_page, host_allowed,
                                   parse_address)
from engine.node.metrics import node_registry, node_state, render, slave_states
from engine.pool.job import Job
from transport.errors import HandlerError, UnknownEvent

from support import free_tcp_port, start_node_process, stop_node

# -- reading a scrape ------------------------------------------------------------------------


def scrape_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, parsed by prometheus_client: (name, labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# -- EventStats --------------------------------------------------------------------------------

def job(event: str, submitted: float = 0.0) -> Job:
    return Job(1, event, None, submitted)


def test_event_stats_count_outcomes_latency_and_refusals():
    stats = EventStats()
    for latency in (0.0004, 0.002, 0.002, 0.3, 100.0):   # done
        j = job("echo", 10.0)
        stats.accepted("echo", j)
        j._finish("x", False, 10.0 + latency)
    streamed = job("count")
    stats.accepted("count", streamed)
    streamed._chunk(1)
    streamed._finish(None, True, 0.001)
    for error in (HandlerError("boom", type="ValueError"), SlaveDied("gone"),
                  UnknownEvent("no such"), JobCancelled("gave up")):
        j = job("echo")
        stats.accepted("echo", j)
        j._fail(error, 1.0)
    pending = job("echo")
    stats.accepted("echo", pending)
    stats.refused("echo", QueueFull.code)
    stats.refused("echo", QueueFull.code)
    stats.refused("new", ShuttingDown.code)

    echo = stats.get("echo")
    assert echo is not None
    assert (echo.accepted, echo.done, echo.cancelled, echo.in_flight) == (10, 5, 1, 1)
    assert echo.failed == {"handler": 1, "slave-died": 1, "unknown-event": 1}
    assert echo.refused == {"queue-full": 2}
    # per bucket: 0.0004 <= 0.0005; two in (0.001, 0.0025]; 0.3 in (0.25, 0.5]; 100 above 60
    assert echo.buckets[0] == 1 and echo.buckets[BUCKETS.index(0.0025)] == 2
    assert echo.buckets[BUCKETS.index(0.5)] == 1 and echo.buckets[-1] == 1 and sum(echo.buckets) == 5
    assert echo.seconds == pytest.approx(100.3044)
    assert echo.cumulative()[-1] == (float("inf"), 5)
    assert [n for _, n in echo.cumulative()] == sorted(n for _, n in echo.cumulative())
    count = stats.get("count")
    assert count is not None and (count.done, count.streamed) == (1, 1)
    new = stats.get("new")
    assert new is not None and (new.accepted, new.refused) == (0, {"shutting-down": 1})
    assert [c.name for c in stats.events()] == ["count", "echo", "new"]
    as_dict = stats.to_dict()
    assert as_dict["echo"]["failed"] == {"handler": 1, "slave-died": 1, "unknown-event": 1}
    assert as_dict["echo"]["latency_ms"]["p50"] == pytest.approx(2.05, abs=0.5)
    json.dumps(as_dict)   # the dashboard's JSON


def test_event_names_are_bounded():
    stats = EventStats()
    for i in range(MAX_EVENTS + 50):
        j = job(f"e{i}")
        stats.accepted(f"e{i}", j)
        j._finish(None, False, 0.0)
    stats.refused("yet-another", QueueFull.code)
    names = [c.name for c in stats.events()]
    assert len(names) == MAX_EVENTS + 1 and OTHER in names
    other = stats.get(OTHER)
    assert other is not None and other.accepted == 50 and other.done == 50
    assert other.refused == {"queue-full": 1}


def test_a_stand_in_job_without_callbacks_is_counted_as_accepted():
    class Bare:
        event = "echo"
    stats = EventStats()
    stats.accepted("echo", Bare())  # type: ignore[arg-type]
    counts = stats.get("echo")
    assert counts is not None and counts.accepted == 1 and counts.in_flight == 1


def test_bucket_quantile_interpolates_like_histogram_quantile():
    counts = [0] * (len(BUCKETS) + 1)
    assert bucket_quantile(0.5, counts) is None
    counts[1] = 10                      # all in (0.0005, 0.001]
    assert bucket_quantile(0.5, counts) == pytest.approx(0.00075)
    assert bucket_quantile(1.0, counts) == pytest.approx(0.001)
    counts[-1] = 90                     # above the last bound: answered as that bound
    assert bucket_quantile(0.99, counts) == BUCKETS[-1]


# -- the collector over an app with a fake pool --------------------------------------------------

class FakePool:
    """A pool whose jobs the test answers itself, and whose info() looks like SlavePool's."""

    def __init__(self, manifest: Any) -> None:
        self.jobs: list[Job] = []
        self.full = False

    def submit(self, event: str, payload: Any, chunks: Any = None) -> Job:
        if self.full:
            raise QueueFull("queue-limit 1 reached")
        j = Job(len(self.jobs) + 1, event, payload, trio.current_time())
        self.jobs.append(j)
        return j

    def info(self) -> dict[str, Any]:
        return {"state": "running", "reason": None, "queue": 2, "running": 1, "done": 3,
                "failed": 1, "cancelled": 0, "spawned": 4, "retired": 1, "recycled": 1,
                "crashes": 1, "latency_ms": {"p50": 1.0, "p99": 2.0},
                "slaves": [{"id": 1, "pid": None, "state": "ready", "jobs": 1},
                           {"id": 2, "pid": None, "state": "ready", "jobs": 0},
                           {"id": 3, "pid": None, "state": "spawning", "jobs": 0},
                           {"id": 4, "pid": None, "state": "terminating", "jobs": 0}],
                "faults": {"slave-died": 1},
                "recent_faults": [{"seq": 1, "time": 0.0, "part": "slave 7", "kind": "slave-died",
                                   "reason": "slave 7 exited with status 3"}]}


class FakeNode:
    def __init__(self, apps: dict[str, Any], cluster: Any = None) -> None:
        self.apps = apps
        self.cluster = cluster
        self.app_failures = 2
        self.rejected = {"/srv/bad/manifest.json": "no"}

    def info(self) -> dict[str, Any]:
        return {"pid": 1, "state": "running", "control": "tcp://127.0.0.1:1", "uptime": 5.0}


class FakeCluster:
    def describe(self) -> dict[str, Any]:
        return {"cluster": "lab", "nodes": [
            {"id": "a", "self": True, "connected": True, "cpu": 0.25, "apps": {}},
            {"id": "b", "self": False, "connected": True, "cpu": 0.5, "apps": {}},
            {"id": "c", "self": False, "connected": False, "cpu": None, "apps": {}}]}


class BrokenApp:
    name = "broken"
    events = EventStats()

    def info(self) -> dict[str, Any]:
        raise RuntimeError("a bug")


def fake_app(tmp_path: Path, name: str = "shop") -> App:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "app.py").write_text("")
    (folder / "manifest.json").write_text(json.dumps({"engine": {"pool-limit": 4}}))
    app = App(load_manifest(folder), pool_factory=FakePool)
    app.state = "running"   # as if run: the fake pool needs no nursery
    return app


async def test_the_collector_reads_apps_events_and_the_node(tmp_path):
    app = fake_app(tmp_path)
    pool = app.pool
    assert isinstance(pool, FakePool)
    jobs = [app.submit("quote", None) for _ in range(3)]
    jobs[0]._finish(1, False, jobs[0].submitted_at + 0.003)
    jobs[1]._fail(HandlerError("declined", type="ValueError"), trio.current_time())
    pool.full = True
    with pytest.raises(QueueFull):
        app.submit("quote", None)
    app.state = "stopping"
    with pytest.raises(ShuttingDown):
        app.submit("checkout", None)

    node = FakeNode({"shop": app, "broken": BrokenApp()}, FakeCluster())
    registry, collector = node_registry(node)
    text = render(registry).decode()
    s = scrape_samples(text)
    kinds = families(text)
    assert kinds["engine_jobs_accepted"] == "counter" and kinds["engine_job_duration_seconds"] == "histogram"
    assert kinds["engine_slaves"] == "gauge"

    assert value(s, "engine_jobs_accepted_total", app="shop", event="quote") == 3
    assert value(s, "engine_jobs_done_total", app="shop", event="quote") == 1
    assert value(s, "engine_jobs_failed_total", app="shop", event="quote", error="handler") == 1
    assert value(s, "engine_jobs_in_flight", app="shop", event="quote") == 1
    assert value(s, "engine_jobs_refused_total", app="shop", event="quote", error="queue-full") == 1
    assert value(s, "engine_jobs_refused_total", app="shop", event="checkout", error="shutting-down") == 1
    assert value(s, "engine_job_duration_seconds_count", app="shop", event="quote") == 1
    assert value(s, "engine_job_duration_seconds_bucket", app="shop", event="quote", le="0.0025") == 0
    assert value(s, "engine_job_duration_seconds_bucket", app="shop", event="quote", le="0.005") == 1
    assert value(s, "engine_job_duration_seconds_sum", app="shop", event="quote") == pytest.approx(0.003)

    assert value(s, "engine_app_state", app="shop", state="stopping") == 1
    assert value(s, "engine_app_state", app="shop", state="running") == 0
    assert value(s, "engine_pool_state", app="shop", state="running") == 1
    for state, n in {"busy": 1, "idle": 1, "starting": 1, "stopping": 1}.items():
        assert value(s, "engine_slaves", app="shop", state=state) == n
    assert value(s, "engine_queue_depth", app="shop") == 2
    assert value(s, "engine_jobs_running", app="shop") == 1
    assert value(s, "engine_pool_limit", app="shop") == 4
    assert value(s, "engine_slave_crashes_total", app="shop") == 1
    assert value(s, "engine_slaves_spawned_total", app="shop") == 4
    assert value(s, "engine_slaves_recycled_total", app="shop") == 1
    assert value(s, "engine_app_faults_total", app="shop", kind="slave-died") == 1

    assert value(s, "engine_node_resident_memory_bytes") > 0
    assert value(s, "engine_node_cpu_seconds_total") > 0
    assert value(s, "engine_node_apps") == 2
    assert value(s, "engine_node_app_failures_total") == 2
    assert value(s, "engine_node_rejected_manifests") == 1
    assert value(s, "engine_cluster_peers", cluster="lab", connected="true") == 1
    assert value(s, "engine_cluster_peers", cluster="lab", connected="false") == 1
    assert value(s, "engine_cluster_node_cpu", cluster="lab", node="b") == 0.5
    # The broken app costs its own figures only, counted.
    assert not any(labels and ("app", "broken") in labels for _, labels in s)
    assert value(s, "engine_metrics_errors_total") == 1 and collector.errors == 1

    state = node_state(node)
    json.dumps(state)
    shop = next(a for a in state["apps"] if a["name"] == "shop")
    assert shop["pool"]["slaves"] == {"busy": 1, "idle": 1, "starting": 1, "stopping": 1}
    assert shop["events"]["quote"]["accepted"] == 3
    assert shop["recent_faults"][0]["kind"] == "slave-died"
    assert next(a for a in state["apps"] if a["name"] == "broken")["error"] == "RuntimeError: a bug"
    assert state["node"]["rss_bytes"] > 0 and state["cluster"]["cluster"] == "lab"


def test_each_node_has_a_registry_of_its_own(tmp_path):
    one = FakeNode({})
    two = FakeNode({})
    two.app_failures = 5
    (r1, _), (r2, _) = node_registry(one), node_registry(two)
    assert value(scrape_samples(render(r1).decode()), "engine_node_app_failures_total") == 2
    assert value(scrape_samples(render(r2).decode()), "engine_node_app_failures_total") == 5
    from prometheus_client import REGISTRY
    assert "engine_node_apps" not in {m.name for m in REGISTRY.collect()}


def test_slave_states():
    assert slave_states([{"state": "ready", "jobs": 2}, {"state": "ready", "jobs": 0},
                         {"state": "spawning"}, {"state": "killing"}]) == \
        {"busy": 1, "idle": 1, "starting": 1, "stopping": 1}


# -- the HTTP port, in memory ------------------------------------------------------------------------

def test_addresses():
    assert parse_address("127.0.0.1:9301") == ("127.0.0.1", 9301)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("9301") == ("127.0.0.1", 9301)
    assert parse_address("http://0.0.0.0:80/") == ("0.0.0.0", 80)
    for bad in ("127.0.0.1:http", ":9301", "host:70000"):
        with pytest.raises(AddressError):
            parse_address(bad)
    assert host_allowed("127.0.0.1:9301") and host_allowed("localhost:1") and host_allowed("[::1]:9")
    assert host_allowed("10.1.2.3")
    assert not host_allowed("evil.example:9301") and not host_allowed("")


def test_routes(tmp_path):
    server = MetricsServer(FakeNode({"shop": fake_app(tmp_path)}))
    status, body, ctype = server.answer("GET", "/metrics?x=1", "127.0.0.1:9301")
    assert status == 200 and ctype == CONTENT_TYPE_LATEST
    assert "engine_node_apps" in families(body.decode())
    status, body, ctype = server.answer("GET", "/api/state", "localhost")
    assert status == 200 and ctype == "application/json"
    assert [a["name"] for a in json.loads(body)["apps"]] == ["shop"]
    status, body, ctype = server.answer("GET", "/", "127.0.0.1")
    assert status == 200 and ctype.startswith("text/html") and b"/api/state" in body
    assert server.answer("GET", "/nope", "127.0.0.1")[0] == 404
    assert server.answer("POST", "/metrics", "127.0.0.1")[0] == 405
    assert server.answer("GET", "/api/state", "attacker.example")[0] == 403
    assert MetricsServer(FakeNode({}), guard_host=False).answer("GET", "/", "node1.lan")[0] == 200


def test_the_page_is_self_contained():
    page = dashboard_page().decode()
    assert "fetch(\"/api/state\"" in page
    # Nothing fetched from elsewhere: the only URL in it is SVG's namespace.
    assert set(re.findall(r"https?://[^\s\"'`)]+", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)


async def exchange(server: MetricsServer, request: bytes) -> bytes:
    client, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, server_end)
        await client.send_all(request)
        data = b""
        while chunk := await client.receive_some(65536):
            data += chunk
    return data


async def test_one_connection_at_a_time_over_h11(tmp_path, autojump_clock):
    server = MetricsServer(FakeNode({}))
    reply = await exchange(server, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert "engine_node_apps" in families(body.decode())
    assert (await exchange(server, b"DELETE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
    assert (await exchange(server, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
    huge = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
    assert (await exchange(server, huge)).startswith(b"HTTP/1.1 431")
    # A client that sends half a head and waits is dropped after CLIENT_TIMEOUT.
    start = trio.current_time()
    assert await exchange(server, b"GET / HTTP/1.1\r\n") == b""
    assert trio.current_time() - start == pytest.approx(page_server.CLIENT_TIMEOUT)
    assert server.failures == 0 and server.requests == 2


async def test_a_failing_page_is_a_500_not_a_crash(tmp_path):
    class Exploding(FakeNode):
        def info(self) -> dict[str, Any]:
            raise RuntimeError("boom")
    server = MetricsServer(Exploding({}))
    reply = await exchange(server, b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500")


# -- a real node ----------------------------------------------------------------------------------------

METRICS_RE = re.compile(r"metrics and dashboard on http://(127\.0\.0\.1:\d+)/")

APP = '''
import os, time
from engine import on

@on("ok")
def ok(data):
    return data

@on("fail")
def fail(data):
    raise ValueError("no")

@on("slow")
def slow(data):
    time.sleep(0.3)
    return "slept"

@on("crash")
def crash(data):
    os._exit(3)
'''


def shop(tmp_path: Path) -> Path:
    folder = tmp_path / "apps" / "shop"
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(APP)
    # One slave, one queued job: a burst of slow calls is refused beyond that.
    (folder / "manifest.json").write_text(json.dumps({"engine": {
        "pool-limit": 1, "queue-limit": 1, "concurrency": 1, "idle-timeout": 600,
        "termination-timeout": 5}}))
    return folder.parent


def metrics_address(stderr: str) -> str:
    match = METRICS_RE.search(stderr)
    assert match, f"the node logs no metrics address:\n{stderr}"
    return match.group(1)


def http_get(address: str, path: str) -> tuple[int, str, bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


async def scrape(address: str) -> dict:
    status, ctype, body = await trio.to_thread.run_sync(http_get, address, "/metrics")
    assert status == 200 and ctype == CONTENT_TYPE_LATEST
    return scrape_samples(body.decode())


@pytest.mark.e2e
async def test_a_real_node_counts_calls_per_app_and_event(tmp_path, start_node):
    from engine.client import connect

    node = await start_node(shop(tmp_path), extra=("--metrics", "127.0.0.1:0"))
    address = metrics_address(node.stderr)
    seen: dict[str, int] = {"ok": 0, "fail": 0, "slow": 0, "refused": 0, "crash": 0}
    with trio.fail_after(50):
        async with connect(node.address, timeout=30) as client:
            for i in range(20):
                assert await client.call("shop", "ok", i) == i
                seen["ok"] += 1
            for _ in range(3):
                with pytest.raises(HandlerError):
                    await client.call("shop", "fail")
                seen["fail"] += 1
            with pytest.raises(SlaveDied):
                await client.call("shop", "crash")
            seen["crash"] += 1

            async def slow_call() -> None:
                try:
                    assert await client.call("shop", "slow") == "slept"
                    seen["slow"] += 1
                except QueueFull:
                    seen["refused"] += 1
            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(slow_call)
            assert seen["slow"] >= 1 and seen["refused"] >= 1

            # A peer that sends garbage, one that sends half a head and stays: the port
            # still answers everyone else.
            host, port = address.split(":")
            garbage = await trio.open_tcp_stream(host, int(port))
            await garbage.send_all(b"\x00\xff not http\r\n\r\n")
            lingering = await trio.open_tcp_stream(host, int(port))
            await lingering.send_all(b"GET /metrics HTTP/1.1\r\n")

            s = await scrape(address)
            await garbage.aclose()
            await lingering.aclose()

    def v(name: str, **labels: str) -> float:
        return value(s, name, app="shop", **labels)

    assert v("engine_jobs_accepted_total", event="ok") == seen["ok"] == 20
    assert v("engine_jobs_done_total", event="ok") == 20
    assert v("engine_job_duration_seconds_count", event="ok") == 20
    assert v("engine_job_duration_seconds_bucket", event="ok", le="+Inf") == 20
    assert 0 < v("engine_job_duration_seconds_sum", event="ok") < 20
    assert v("engine_jobs_failed_total", event="fail", error="handler") == 3
    assert v("engine_jobs_done_total", event="fail") == 0
    assert v("engine_jobs_failed_total", event="crash", error="slave-died") == 1
    assert v("engine_slave_crashes_total") == 1
    assert v("engine_app_faults_total", kind="slave-died") == 1
    # Every slow call was either accepted and done (at least 0.3 s each) or refused.
    assert v("engine_jobs_accepted_total", event="slow") == seen["slow"]
    assert v("engine_jobs_refused_total", event="slow", error="queue-full") == seen["refused"]
    assert v("engine_job_duration_seconds_bucket", event="slow", le="0.25") == 0
    assert v("engine_job_duration_seconds_bucket", event="slow", le="60.0") == seen["slow"]
    assert v("engine_jobs_in_flight", event="slow") == 0
    # One slave (pool-limit 1), idle now; the crashed one was replaced.
    assert v("engine_slaves", state="idle") + v("engine_slaves", state="busy") == 1
    assert v("engine_slaves", state="starting") == 0
    assert v("engine_slaves_spawned_total") == 2
    assert v("engine_pool_limit") == 1 and v("engine_queue_depth") == 0
    assert v("engine_app_state", state="running") == 1
    assert v("engine_slaves_resident_memory_bytes") > 0
    assert value(s, "engine_node_resident_memory_bytes") > 1_000_000
    assert value(s, "engine_node_cpu_seconds_total") > 0
    assert value(s, "engine_node_apps") == 1

    status, ctype, body = await trio.to_thread.run_sync(http_get, address, "/api/state")
    state = json.loads(body)
    assert status == 200 and state["apps"][0]["events"]["ok"]["done"] == 20
    assert state["apps"][0]["recent_faults"][-1]["kind"] == "slave-died"
    status, ctype, body = await trio.to_thread.run_sync(http_get, address, "/")
    assert status == 200 and ctype.startswith("text/html") and b"/api/state" in body


@pytest.mark.e2e
async def test_a_node_whose_metrics_port_is_taken_says_so_and_stops(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = None
        try:
            with pytest.raises(AssertionError, match="node exited early"):
                node = await start_node_process(
                    [shop(tmp_path)], tmp_path / "node.log", tmp_path, "--metrics", f"127.0.0.1:{port}")
            log = (tmp_path / "node.log").read_text()
            assert f"cannot serve metrics on 127.0.0.1:{port}" in log
        finally:
            if node is not None:
                stop_node(node)


@pytest.mark.e2e
async def test_a_bad_metrics_address_is_a_usage_error(tmp_path):
    import sys
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "engine", "run", "--control", "tcp://127.0.0.1:0",
             "--metrics", "127.0.0.1:http"], capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 2 and b"--metrics" in done.stderr


@pytest.mark.e2e
async def test_engine_metrics_from_the_environment(tmp_path, monkeypatch):
    port = free_tcp_port()
    monkeypatch.setenv("ENGINE_METRICS", f"127.0.0.1:{port}")
    node = await start_node_process([shop(tmp_path)], tmp_path / "node.log", tmp_path)
    try:
        assert metrics_address(node.stderr) == f"127.0.0.1:{port}"
        s = await scrape(f"127.0.0.1:{port}")
        assert value(s, "engine_node_apps") == 1
    finally:
        assert not stop_node(node)


@pytest.mark.e2e
async def test_a_clustered_node_counts_its_peers(tmp_path, monkeypatch):
    import uuid

    from support import free_udp_port, wait_until

    monkeypatch.setenv("ENGINE_CLUSTER_SECRET", "the metrics test's cluster secret")
    port, name = free_udp_port(), f"m-{uuid.uuid4().hex[:8]}"
    nodes = []
    try:
        for i, extra in enumerate((("--metrics", "127.0.0.1:0"), ())):
            nodes.append(await start_node_process(
                [], tmp_path / f"node{i}.log", tmp_path, "--cluster", name,
                "--state-dir", str(tmp_path / f"state{i}"), "--discovery-port", str(port),
                "--discovery-interface", "127.0.0.1", *extra))
        address = metrics_address(nodes[0].stderr)

        async def peers_linked() -> dict | None:
            s = await scrape(address)
            linked = s.get(("engine_cluster_peers", frozenset({("cluster", name), ("connected", "true")})))
            return s if linked == 1 else None
        with trio.fail_after(30):
            s = await wait_until(peers_linked, "A's metrics count B as a connected peer",
                                 timeout=20, interval=0.2)
        loads = {dict(labels)["node"] for (metric, labels) in s if metric == "engine_cluster_node_cpu"}
        assert len(loads) == 2, "both nodes' load, as their reports said"
        status, _, body = await trio.to_thread.run_sync(http_get, address, "/api/state")
        state = json.loads(body)
        assert status == 200 and state["cluster"]["cluster"] == name
        assert len(state["cluster"]["nodes"]) == 2
    finally:
        for node in nodes:
            assert not stop_node(node)
