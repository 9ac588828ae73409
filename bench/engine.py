"""The engine end to end: a node in a child process hosting ``bench/echo_app.py`` on
2 slaves, called through

- the control path: ``engine.client`` -> node control endpoint -> pool -> slave;
- the ``native-server`` driver: a plain ``transport.rpc.RpcClient`` -> the driver's
  own listener -> pool -> slave (when the driver exists).

Each returns its figures and memory samples: the idle node (before any call), node and
slaves after warm-up and after the run (the leak check).
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable

import trio

from .harness import (BENCH_DIR, PAYLOAD, Child, RRFigures, Settings, child_process,
                      measure_rr, percentile, python_child, rss_mb, tree_rss_mb)

APP = "bench-echo"
APP_ENTRY = BENCH_DIR / "echo_app.py"
SLAVES = 2


def manifest(drivers: dict[str, Any] | None = None, **engine: Any) -> dict[str, Any]:
    """The bench app's manifest: 2 slaves, a queue deep enough for 256 in flight."""
    return {
        "name": APP,
        "type": "python",
        "args": str(APP_ENTRY),
        "engine": {"pool-limit": SLAVES, "queue-limit": 2048, "grow-threshold": 1,
                   "idle-timeout": 600, **engine},
        "drivers": drivers or {},
    }


def available() -> str | None:
    try:
        import engine.client.node_client  # noqa: F401
        import engine.node.node  # noqa: F401
        import engine.pool.process  # noqa: F401
    except ImportError as exc:
        return f"skipped: engine node/client/pool not importable ({exc})"
    return None


def native_server_available() -> str | None:
    try:
        from engine.drivers import registry
    except ImportError as exc:
        return f"skipped: engine.drivers not importable ({exc})"
    if registry.get("native-server") is None:
        return f"skipped: no native-server driver yet (known: {', '.join(registry.known_types())})"
    return None


@asynccontextmanager
async def node_hosting(*app_manifests: dict[str, Any]) -> AsyncIterator[Child]:
    """A node child process hosting these apps; READY carries its control address."""
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        folders = []
        for app_manifest in app_manifests:
            folder = Path(tmp) / app_manifest["name"]
            folder.mkdir()
            (folder / "manifest.json").write_text(json.dumps(app_manifest))
            folders.append(folder)
        async with child_process(python_child("bench.servers", "node", "tcp://127.0.0.1:0",
                                              *folders)) as node:
            yield node


def _memory(node: Child) -> dict[str, Any]:
    own, slaves = tree_rss_mb(node.pid)
    return {"node": own, "slaves": slaves, "total": own + sum(slaves)}


async def control_path(settings: Settings) -> tuple[RRFigures, dict[str, Any]]:
    from engine.client import connect

    async with node_hosting(manifest()) as node:
        memory: dict[str, Any] = {"idle_node": _memory(node)["node"]}
        async with connect(node.ready, timeout=10) as client:
            figures = await _measure_echo(client, node, settings, memory)
            memory["stream_bytes"] = STREAM_BYTES_QUICK if settings.quick else STREAM_BYTES
            memory["stream_mb_s"], memory["stream_rss"] = await _sampled(
                node, stream_rate(client, settings, total=memory["stream_bytes"]))
            memory["upload_mb_s"] = await upload_rate(client, settings)
    return figures, memory


async def _measure_echo(client: Any, node: Child, settings: Settings,
                        memory: dict[str, Any]) -> RRFigures:
    """Echo round trips through ``client`` (anything with ``call(app, event, payload)``),
    with the node's memory after warm-up and after the run recorded in ``memory``."""
    async def call():
        await client.call(APP, "echo", PAYLOAD)

    # Make both slaves exist before measuring: a short burst grows the pool.
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(call)
    figures = await measure_rr(
        lambda: call, settings,
        after_warmup=lambda: memory.__setitem__("after_warmup", _memory(node)))
    memory["after_run"] = _memory(node)
    return figures


STREAM_CHUNK = 64 * 1024
STREAM_BYTES = 2**30            # the streamed reply whose memory is sampled: 1 GiB
STREAM_BYTES_QUICK = 20 * STREAM_CHUNK
RSS_EVERY = 0.05                # s between memory samples during it
RELAY_APP = "bench-relay"
RELAY_ENTRY = BENCH_DIR / "relay_app.py"


async def stream_rate(client, settings: Settings, app: str = APP, event: str = "chunks",
                      total: int | None = None) -> float:
    """MB/s of one streamed reply (64 KiB chunks) from a slave through the node;
    ``total`` bytes (default 200 chunks)."""
    n = 20 if settings.quick else 200
    if total is not None:
        n = max(1, total // STREAM_CHUNK)
    spec = {"n": n, "size": STREAM_CHUNK}
    received = 0
    with trio.fail_after(120):
        t0 = time.perf_counter()
        async for chunk in client.stream(app, event, spec):
            received += len(chunk)
        elapsed = time.perf_counter() - t0
    if received != n * STREAM_CHUNK:
        raise RuntimeError(f"streamed {received} bytes, expected {n * STREAM_CHUNK}")
    return received / elapsed / 1e6


async def _sampled(node: Child, measure: Awaitable[float]) -> tuple[float, dict[str, float]]:
    """``measure``'s result, and the RSS (MB) of the node, its slaves and this client
    before it and at their highest while it ran (sampled every RSS_EVERY s)."""
    def sample() -> dict[str, float]:
        own, slaves = tree_rss_mb(node.pid)
        return {"node": own, "slaves": sum(slaves), "client": rss_mb()}

    before = sample()
    peak = dict(before)
    result = 0.0
    async with trio.open_nursery() as nursery:
        async def run() -> None:
            nonlocal result
            result = await measure
            nursery.cancel_scope.cancel()

        nursery.start_soon(run)
        while True:
            await trio.sleep(RSS_EVERY)
            for key, value in sample().items():
                peak[key] = max(peak[key], value)
    rss = {f"{k}_before": v for k, v in before.items()}
    rss.update({f"{k}_peak": v for k, v in peak.items()})
    rss["total_before"], rss["total_peak"] = sum(before.values()), sum(peak.values())
    return result, rss


async def upload_rate(client, settings: Settings) -> float:
    """MB/s of one chunked request (64 KiB chunks) from the client through the node to a
    slave's handler, which counts them."""
    n = 20 if settings.quick else 200
    block = b"u" * STREAM_CHUNK
    with trio.fail_after(60):
        t0 = time.perf_counter()
        received = await client.call(APP, "sink", None, chunks=[block] * n)
        elapsed = time.perf_counter() - t0
    if received != n * STREAM_CHUNK:
        raise RuntimeError(f"uploaded {received} bytes, expected {n * STREAM_CHUNK}")
    return received / elapsed / 1e6


PIPELINE_BYTES = 64 * 2**20     # per stream of the pipeline comparison
PIPELINE_ROUNDS = 3


async def pipeline_rate(settings: Settings) -> tuple[float, float]:
    """(pipeline, one app) MB/s on one node hosting both apps, medians of rounds taking
    turns: the client streams ``bench-relay``'s reply, which relays ``bench-echo``'s
    chunks (engine.astream: slave -> node -> slave -> node -> client), against the
    client streaming ``bench-echo``'s reply directly."""
    from statistics import median

    from engine.client import connect

    relay = dict(manifest(), name=RELAY_APP, args=str(RELAY_ENTRY))
    total = STREAM_BYTES_QUICK if settings.quick else PIPELINE_BYTES
    piped, direct = [], []
    async with node_hosting(manifest(), relay) as node:
        async with connect(node.ready, timeout=10) as client:
            await stream_rate(client, Settings.quick_mode(), RELAY_APP, "relay")  # warm up
            await stream_rate(client, Settings.quick_mode())
            for _ in range(1 if settings.quick else PIPELINE_ROUNDS):
                piped.append(await stream_rate(client, settings, RELAY_APP, "relay", total))
                direct.append(await stream_rate(client, settings, total=total))
    return median(piped), median(direct)


# The driver's options: its listening address on loopback, port chosen by nng.  If the
# driver names this option differently, the deploy fails with a ManifestError naming
# the field, and the native-server row says so: adjust here.
NATIVE_SERVER_OPTIONS: dict[str, Any] = {"endpoint": "tcp://127.0.0.1:0"}


def _find_address(value: Any) -> str | None:
    """The first tcp:// address anywhere in a driver's info()."""
    if isinstance(value, str) and value.startswith(("tcp://", "nng+tcp://")) \
            and not value.endswith(":0"):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _find_address(item)
        if found:
            return found
    return None


# The separate "concurrency 32" row: the same app with each slave taking up to 32 jobs
# at once (the manifest's engine.concurrency), so the node batches INVOKEs per frame.
# The main native-server row keeps the default (1 job per slave at a time).
CONCURRENT = 32
# The separate "prefetch 0" row: the target's configuration but with the manifest's
# engine.prefetch turned off (it defaults to "auto"), so a slave always waits a node round
# trip between jobs: what the engine did before auto prefetch.
NO_PREFETCH = 0


async def native_server_concurrent(settings: Settings) -> tuple[RRFigures, dict[str, Any]]:
    return await native_server(settings, concurrency=CONCURRENT)


async def native_server_no_prefetch(settings: Settings) -> tuple[RRFigures, dict[str, Any]]:
    return await native_server(settings, prefetch=NO_PREFETCH)


async def native_server_threads(settings: Settings) -> tuple[RRFigures, dict[str, Any]]:
    """The same app with ``engine.backend: "thread"``: handlers in the node process."""
    return await native_server(settings, backend="thread")


async def native_server(settings: Settings, *, concurrency: int | None = None,
                        prefetch: int | None = None,
                        backend: str | None = None) -> tuple[RRFigures, dict[str, Any]]:
    from engine.client import connect
    from transport.rpc import RpcClient

    drivers = {"rpc": {"type": "native-server", "emit": "echo", **NATIVE_SERVER_OPTIONS}}
    engine_options: dict[str, Any] = {}
    if concurrency is not None:
        engine_options["concurrency"] = concurrency
    if prefetch is not None:
        engine_options["prefetch"] = prefetch
    if backend is not None:
        engine_options["backend"] = backend
    async with node_hosting(manifest(drivers, **engine_options)) as node:
        async with connect(node.ready, timeout=10) as control:
            info = await control.info(APP)
        address = _find_address(info.get("drivers", {}).get("rpc"))
        if address is None:
            raise RuntimeError(f"no tcp:// address in the native-server driver's info: "
                               f"{info.get('drivers')}")
        memory: dict[str, Any] = {}
        async with RpcClient(address, timeout=10) as client:
            await client.wait_connected()
            figures = await _measure_echo(client, node, settings, memory)
        memory["sync_client"] = await trio.to_thread.run_sync(sync_sequential, address, settings)
    return figures, memory


def sync_sequential(address: str, settings: Settings) -> RRFigures:
    """Sequential round trips through :class:`transport.sync_client.SyncRpcClient`: the
    same requests from a blocking client, which puts no scheduler of its own between a
    reply and the next request (run in a thread, off the bench's trio loop)."""
    from transport.sync_client import SyncRpcClient

    clock = time.perf_counter
    with SyncRpcClient(address, timeout=10) as client:
        for _ in range(settings.warmup_calls):
            client.call(APP, "echo", PAYLOAD)
        lat = []
        t0 = clock()
        for _ in range(settings.seq_calls):
            s = clock()
            client.call(APP, "echo", PAYLOAD)
            lat.append(clock() - s)
        elapsed = clock() - t0
    lat.sort()
    return RRFigures(settings.seq_calls / elapsed, percentile(lat, 0.5) * 1e6,
                     percentile(lat, 0.99) * 1e6, {})


# -- the pool alone, in this process (no client, no node process) -----------------------

async def pool_direct(settings: Settings, *, prefetch: int | str = "auto") -> RRFigures:
    """``SlavePool.submit(...).result()`` from this process to 2 slaves: the engine's
    own share of the request path, without the client -> node hop."""
    from engine.manifest import EngineConfig
    from engine.pool.process import SlavePool

    config = EngineConfig(pool_limit=SLAVES, queue_limit=4096, idle_timeout=600, prefetch=prefetch)
    pool = SlavePool(APP, APP_ENTRY, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)

        async def call():
            await pool.submit("echo", PAYLOAD).result()

        with trio.fail_after(20):   # grow the pool to both slaves first
            async with trio.open_nursery() as burst:
                for _ in range(8):
                    burst.start_soon(pool.submit("sleep", 0.05).result)
        figures = await measure_rr(lambda: call, settings)
        nursery.cancel_scope.cancel()
    return figures


def main() -> None:
    """``python -m bench.engine``: the engine rows only (native-server with and without
    prefetch, and the in-process pool), for quick before/after comparisons."""
    from .report import print_rr_table

    settings = Settings()
    systems: dict[str, RRFigures | str] = {}
    for label, fn in (("native-server (2 slaves, concurrency 1)", native_server),
                      ("native-server, prefetch 0", native_server_no_prefetch)):
        systems[label] = trio.run(fn, settings)[0]
    for prefetch in ("auto", NO_PREFETCH):
        systems[f"SlavePool in-process, prefetch {prefetch}"] = trio.run(
            lambda s: pool_direct(s, prefetch=prefetch), settings)
    print_rr_table(systems, settings.inflight)


if __name__ == "__main__":
    main()
