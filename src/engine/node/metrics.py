"""What the node tells a Prometheus scrape, and its dashboard: read from its state at
the moment it is asked, nothing kept on the side.

:class:`NodeCollector` is a ``prometheus_client`` collector over one node (each node a
:func:`node_registry` of its own, never the process-wide default: a test may run
several nodes in one process).  Every figure comes from what the node already keeps:
``App.info()`` (its pool, drivers, faults, restarts), the app's :class:`EventStats`
(per event: accepted, refused, outcomes, the latency histogram), the node's process
(RSS from ``/proc/self/status``, CPU from ``os.times()``) and, in a cluster, what the
``nodes`` verb shows (:meth:`NodeCluster.describe`).  :func:`render` is the scrape's
body; :func:`node_state` the JSON ``/api/state`` the dashboard polls
(``engine/node/dashboard.py`` serves both).

One app whose figures cannot be read (a bug) costs that app's figures only, counted in
``engine_metrics_errors_total``; the scrape still answers.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, Metric)
from prometheus_client.registry import CollectorRegistry

from engine.event_stats import BUCKETS

if TYPE_CHECKING:
    from engine.app import App
    from engine.node.clustering import NodeCluster

log = logging.getLogger(__name__)

APP_STATES = ("created", "starting", "running", "stopping", "stopped")
POOL_STATES = ("running", "broken", "draining")
SLAVE_STATES = ("busy", "idle", "starting", "stopping")
# Counters every driver keeps (engine.drivers.base.DriverStats), metric name -> field.
DRIVER_COUNTERS = {"ticks": "events the driver saw (timer firings, requests, file changes)",
                   "submitted": "jobs the driver handed to the pool",
                   "skipped": "events dropped because the pool had no room",
                   "done": "the driver's jobs answered successfully",
                   "errors": "the driver's jobs that failed",
                   "held": "times the driver waited for room in the pool"}


class MetricsNode(Protocol):
    """What the metrics read of a node (:class:`engine.node.node.Node`)."""

    @property
    def apps(self) -> Mapping[str, App]: ...

    @property
    def cluster(self) -> NodeCluster | None: ...

    @property
    def app_failures(self) -> int: ...

    @property
    def rejected(self) -> Mapping[str, str]: ...

    def info(self) -> dict[str, Any]: ...


# -- the node's process -------------------------------------------------------------------

def rss_bytes() -> int:
    """The resident set of this process now (``VmRSS``; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds() -> float:
    """User and system CPU time of this process so far (its children not included)."""
    times = os.times()
    return times.user + times.system


def slave_rss(pids: Iterable[int]) -> int:
    """The slaves' resident sets, summed (a slave that just exited counts 0)."""
    import psutil

    total = 0
    for pid in pids:
        try:
            total += int(psutil.Process(pid).memory_info().rss)
        except (psutil.Error, OSError):
            pass
    return total


def slave_states(slaves: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """A pool's slaves (``info()["slaves"]``) counted as busy, idle, starting, stopping."""
    counts = dict.fromkeys(SLAVE_STATES, 0)
    for slave in slaves:
        state = slave.get("state")
        if state == "ready":
            counts["busy" if slave.get("jobs") else "idle"] += 1
        elif state == "spawning":
            counts["starting"] += 1
        else:   # terminating, killing, dead: on its way out
            counts["stopping"] += 1
    return counts


def le_label(bound: float) -> str:
    """A bucket's ``le`` as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


# -- the collector --------------------------------------------------------------------------

class NodeCollector:
    """A ``prometheus_client`` collector: :meth:`collect` reads ``node`` at each scrape."""

    def __init__(self, node: MetricsNode) -> None:
        self.node = node
        self.errors = 0           # apps (or the cluster) whose figures could not be read
        self._logged = False

    def _failed(self, what: str) -> None:
        self.errors += 1
        if not self._logged:     # the first one with its traceback; the others counted
            self._logged = True
            log.exception("metrics: could not read %s", what)

    def collect(self) -> Iterable[Metric]:
        node = self.node

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        ev = ["app", "event"]
        accepted = counter("engine_jobs_accepted", "Jobs accepted by App.submit.", ev)
        refused = counter("engine_jobs_refused", "Submits refused at once (error: "
                          "queue-full, app-broken, shutting-down).", [*ev, "error"])
        done = counter("engine_jobs_done", "Jobs answered successfully.", ev)
        failed = counter("engine_jobs_failed", "Jobs answered with an error (error: its code, "
                         "e.g. handler, slave-died, slave-hung, unknown-event).", [*ev, "error"])
        cancelled = counter("engine_jobs_cancelled", "Jobs their caller gave up on.", ev)
        streamed = counter("engine_jobs_streamed", "Done jobs that answered with a stream "
                           "of chunks.", ev)
        in_flight = gauge("engine_jobs_in_flight", "Jobs accepted and not answered yet.", ev)
        latency = HistogramMetricFamily("engine_job_duration_seconds", "Seconds from a job's "
                                        "acceptance to its answer, of done jobs.", labels=ev)

        state = gauge("engine_app_state", "1 for the app's state, 0 for the others.",
                      ["app", "state"])
        pool_state = gauge("engine_pool_state", "1 for the pool's state, 0 for the others.",
                           ["app", "state"])
        uptime = gauge("engine_app_uptime_seconds", "Seconds since the app started.", ["app"])
        queue = gauge("engine_queue_depth", "Jobs waiting for a free slot.", ["app"])
        running = gauge("engine_jobs_running", "Jobs on slaves or threads (prefetched ones "
                        "included).", ["app"])
        slaves = gauge("engine_slaves", "Slave processes by state.", ["app", "state"])
        pool_limit = gauge("engine_pool_limit", "The app's pool-limit.", ["app"])
        queue_limit = gauge("engine_queue_limit", "The app's queue-limit.", ["app"])
        spawned = counter("engine_slaves_spawned", "Slaves started.", ["app"])
        retired = counter("engine_slaves_retired", "Slaves retired (idle, worn or drained).",
                          ["app"])
        recycled = counter("engine_slaves_recycled", "Slaves retired for "
                           "max-jobs-per-slave or max-rss-per-slave.", ["app"])
        timed_out = counter("engine_jobs_timed_out", "Jobs answered RequestTimeout "
                            "(engine.request-timeout) by the app's current pool.", ["app"])
        redeploys = counter("engine_app_redeploys", "Versions deployed over the app's first "
                            "(deploy of its name, engine reload).", ["app"])
        crashes = counter("engine_slave_crashes", "Slaves that died while they mattered "
                          "(crashes, hangs killed, rlimits).", ["app"])
        slave_memory = gauge("engine_slaves_resident_memory_bytes", "The app's slaves' "
                             "resident memory, summed.", ["app"])
        faults = counter("engine_app_faults", "Failures of the app's parts by kind "
                         "(docs/architecture.md, Faults).", ["app", "kind"])
        restarts = counter("engine_app_restarts", "Parts of the app started again after "
                           "a failure.", ["app", "part"])
        dl = ["app", "driver", "type"]
        drivers = {field: counter(f"engine_driver_{field}", doc.capitalize() + ".", dl)
                   for field, doc in DRIVER_COUNTERS.items()}

        for name, app in sorted(node.apps.items()):
            try:
                info = app.info()
                events = app.events.events()
                pool = info.get("pool") or {}
                for c in events:
                    labels = [name, c.name]
                    accepted.add_metric(labels, c.accepted)
                    done.add_metric(labels, c.done)
                    cancelled.add_metric(labels, c.cancelled)
                    streamed.add_metric(labels, c.streamed)
                    in_flight.add_metric(labels, c.in_flight)
                    for code, n in sorted(c.refused.items()):
                        refused.add_metric([*labels, code], n)
                    for code, n in sorted(c.failed.items()):
                        failed.add_metric([*labels, code], n)
                    latency.add_metric(labels, [(le_label(le), n)
                                                for le, n in c.cumulative()], c.seconds)
                for s in APP_STATES:
                    state.add_metric([name, s], 1.0 if info.get("state") == s else 0.0)
                for s in POOL_STATES:
                    pool_state.add_metric([name, s], 1.0 if pool.get("state") == s else 0.0)
                uptime.add_metric([name], float(info.get("uptime") or 0.0))
                queue.add_metric([name], pool.get("queue") or 0)
                running.add_metric([name], pool.get("running") or 0)
                pool_slaves = pool.get("slaves") or []
                for s, n in slave_states(pool_slaves).items():
                    slaves.add_metric([name, s], n)
                limits = info.get("limits") or {}
                pool_limit.add_metric([name], limits.get("pool-limit") or 0)
                queue_limit.add_metric([name], limits.get("queue-limit") or 0)
                spawned.add_metric([name], pool.get("spawned") or 0)
                retired.add_metric([name], pool.get("retired") or 0)
                recycled.add_metric([name], pool.get("recycled") or 0)
                crashes.add_metric([name], pool.get("crashes") or 0)
                timed_out.add_metric([name], pool.get("timed_out") or 0)
                redeploys.add_metric([name], info.get("redeploys") or 0)
                slave_memory.add_metric([name], slave_rss(
                    s["pid"] for s in pool_slaves if isinstance(s.get("pid"), int)))
                for kind, n in sorted((info.get("faults") or {}).items()):
                    faults.add_metric([name, kind], n)
                for part, n in sorted((info.get("restarts") or {}).items()):
                    restarts.add_metric([name, part], n)
                for driver, entry in sorted((info.get("drivers") or {}).items()):
                    for field, family in drivers.items():
                        if isinstance(entry.get(field), int):
                            family.add_metric([name, driver, str(entry.get("type"))],
                                              entry[field])
            except Exception:
                self._failed(f"app {name}")

        yield from (accepted, refused, done, failed, cancelled, streamed, in_flight, latency,
                    state, pool_state, uptime, queue, running, slaves, pool_limit, queue_limit,
                    spawned, retired, recycled, timed_out, redeploys, crashes, slave_memory, faults, restarts,
                    *drivers.values())
        yield from self._node_metrics()

    def _node_metrics(self) -> Iterable[Metric]:
        node = self.node
        yield GaugeMetricFamily("engine_node_resident_memory_bytes",
                                "The node process's resident memory (VmRSS).", rss_bytes())
        yield CounterMetricFamily("engine_node_cpu_seconds", "The node process's user and "
                                  "system CPU time (slaves not included).", cpu_seconds())
        info = node.info()
        yield GaugeMetricFamily("engine_node_uptime_seconds", "Seconds since the node started.",
                                float(info.get("uptime") or 0.0))
        yield GaugeMetricFamily("engine_node_apps", "Apps hosted.", len(node.apps))
        yield GaugeMetricFamily("engine_node_rejected_manifests", "Manifests found and not "
                                "hosted (engine list shows why).", len(node.rejected))
        yield CounterMetricFamily("engine_node_app_failures", "Apps started again after "
                                  "failing whole (a bug in App).", node.app_failures)
        cluster = cluster_state(node)
        if cluster is not None and "error" not in cluster:
            name = str(cluster.get("cluster", ""))
            peers = GaugeMetricFamily("engine_cluster_peers", "Other nodes of the cluster this "
                                      "node knows, connected or not.", labels=["cluster", "connected"])
            load = GaugeMetricFamily("engine_cluster_node_cpu", "Each node's machine CPU use "
                                     "(0..1) as its last load report said.",
                                     labels=["cluster", "node"])
            counts = {"true": 0, "false": 0}
            for entry in cluster.get("nodes") or []:
                if not entry.get("self"):
                    counts["true" if entry.get("connected") else "false"] += 1
                if entry.get("cpu") is not None:
                    load.add_metric([name, str(entry.get("id"))], float(entry["cpu"]))
            for connected, n in counts.items():
                peers.add_metric([name, connected], n)
            yield peers
            yield load
        yield CounterMetricFamily("engine_metrics_errors", "Apps (or the cluster) whose "
                                  "figures a scrape could not read (a bug; logged once).",
                                  self.errors)


def node_registry(node: MetricsNode) -> tuple[CollectorRegistry, NodeCollector]:
    """A registry of the node's own (never the process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = NodeCollector(node)
    registry.register(collector)
    return registry, collector


def render(registry: CollectorRegistry) -> bytes:
    """The scrape's body, Prometheus's text format (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)


# -- the dashboard's JSON -------------------------------------------------------------------

def cluster_state(node: MetricsNode) -> dict[str, Any] | None:
    """What ``nodes`` shows of the node's cluster; None for a node on its own,
    ``{"error": ...}`` if it cannot be read."""
    cluster = node.cluster
    if cluster is None:
        return None
    try:
        return cluster.describe()
    except Exception as exc:
        log.debug("metrics: could not read the cluster", exc_info=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


def app_state(app: App) -> dict[str, Any]:
    """One app as the dashboard shows it."""
    info = app.info()
    pool = info.get("pool") or {}
    pool_slaves = pool.get("slaves") or []
    return {
        "name": info.get("name", app.name),
        "state": info.get("state"),
        "backend": app.manifest.engine.backend,
        "uptime": info.get("uptime"),
        "limits": info.get("limits"),
        "pool": {"state": pool.get("state"), "reason": pool.get("reason"),
                 "queue": pool.get("queue", 0), "running": pool.get("running", 0),
                 "done": pool.get("done", 0), "failed": pool.get("failed", 0),
                 "cancelled": pool.get("cancelled", 0), "crashes": pool.get("crashes", 0),
                 "spawned": pool.get("spawned", 0), "retired": pool.get("retired", 0),
                 "latency_ms": pool.get("latency_ms"),
                 "slaves": slave_states(pool_slaves),
                 "slave_rss": slave_rss(s["pid"] for s in pool_slaves
                                        if isinstance(s.get("pid"), int))},
        "events": info.get("events") or {},
        "drivers": info.get("drivers") or {},
        "faults": info.get("faults") or {},
        "recent_faults": info.get("recent_faults") or [],
        "restarts": info.get("restarts") or {},
    }


def node_state(node: MetricsNode) -> dict[str, Any]:
    """``/api/state``: the node, its apps and its cluster, now.  ``time`` is the node's
    clock (``time.time()``): the dashboard computes rates from it, not from its own."""
    apps = []
    for name, app in sorted(node.apps.items()):
        try:
            apps.append(app_state(app))
        except Exception as exc:
            log.debug("dashboard: could not read app %s", name, exc_info=True)
            apps.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    info = node.info()
    return {
        "time": time.time(),
        "buckets": list(BUCKETS),
        "node": {"pid": info.get("pid"), "state": info.get("state"),
                 "control": info.get("control"), "uptime": info.get("uptime"),
                 "rss_bytes": rss_bytes(), "cpu_seconds": round(cpu_seconds(), 3),
                 "cpus": os.cpu_count() or 1, "app_failures": node.app_failures,
                 "rejected": dict(node.rejected)},
        "apps": apps,
        "cluster": cluster_state(node),
    }
