"""Polling on or off, for the clients that are not mesh components (issue 11, item 4).

``python -m bench.polling [--rounds 5] [--calls 2000] [--quick]``: sequential round trips
per second and CPU per round trip with the client's polling (``RpcClient(spin=...)``,
transport/_spin.py) on and off, interleaved round by round (on/off, then off/on) so that
a neighbour's load falls on both; prints the range over the rounds.  Shapes:

- ``rpc``: an ``RpcClient`` (this process) -> an ``RpcServer`` echo in a child process,
  the server not polling (the plain transport: what a cluster link talks to);
- ``cli``: ``RpcClient`` -> a node's control endpoint -> a Python slave (what
  ``engine.client.connect``, the CLI and a cluster link do);
- ``app->app``: an async handler in one app's slave -> its node -> another app's slave
  (``engine.acall``; bench/caller_app.py);
- ``sync``: ``SyncRpcClient`` -> node -> slave (``engine.call`` from a sync handler; it
  never polls: a blocking ``recv``, the reference).

Then the checks that used to be assertions of the test suite (they need real timing and
a quiet machine, so they are figures here, not tests): against a polling ``RpcServer``
in another process, how many of a run of sequential calls the client and the server
got by polling, and how many polls 16 concurrent callers made (a poll only when a call
is truly alone).

Not part of ``make bench`` (about a minute).  The figures and the decision taken from
them are in docs/architecture.md (transport/_spin.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from .engine import APP, manifest, node_hosting
from .harness import BENCH_DIR, PAYLOAD, Child, child_process, cpu_seconds, percentile

CALLER_APP = "bench-caller"
CALLER_ENTRY = BENCH_DIR / "caller_app.py"


def tree_pids(pid: int) -> list[int]:
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


async def sequential(call, n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        await call()
    lat = []
    clock = time.perf_counter
    cpu0, t0 = time.process_time(), clock()
    for _ in range(n):
        start = clock()
        await call()
        lat.append(clock() - start)
    elapsed, cpu = clock() - t0, time.process_time() - cpu0
    lat.sort()
    return {"rate": n / elapsed, "p50_us": percentile(lat, 0.5) * 1e6,
            "p99_us": percentile(lat, 0.99) * 1e6, "client_us": cpu / n * 1e6}


async def rpc_client_round(address: str, server_pids: list[int], spin: bool, n: int,
                           warmup: int, guard: Any = None) -> dict[str, float]:
    """Sequential echo calls through an RpcClient of this process; the server side's
    CPU per round trip too (its processes, over the timed calls and the warm-up).
    ``guard``: a node's token (engine.client.control_guard), for a node."""
    from transport.rpc import RpcClient

    async with RpcClient(address, timeout=10, spin=spin, guard=guard) as client:
        await client.wait_connected()
        before = cpu_seconds(server_pids)
        figures = await sequential(lambda: client.call(APP, "echo", PAYLOAD), n, warmup)
        figures["server_us"] = (cpu_seconds(server_pids) - before) / (n + warmup) * 1e6
        if client.spin is not None:
            figures["polls"], figures["hits"] = client.spin.polls, client.spin.hits
    return figures


def sync_round(address: str, server_pids: list[int], n: int, warmup: int) -> dict[str, float]:
    from engine.client import control_guard
    from transport.sync_client import SyncRpcClient

    with SyncRpcClient(address, timeout=10, guard=control_guard(address)) as client:
        for _ in range(warmup):
            client.call(APP, "echo", PAYLOAD)
        before = cpu_seconds(server_pids)
        lat = []
        clock = time.perf_counter
        cpu0, t0 = time.process_time(), clock()
        for _ in range(n):
            start = clock()
            client.call(APP, "echo", PAYLOAD)
            lat.append(clock() - start)
        elapsed, cpu = clock() - t0, time.process_time() - cpu0
        server = cpu_seconds(server_pids) - before
    lat.sort()
    return {"rate": n / elapsed, "p50_us": percentile(lat, 0.5) * 1e6,
            "p99_us": percentile(lat, 0.99) * 1e6, "client_us": cpu / n * 1e6,
            "server_us": server / n * 1e6}


async def app_round(node: Child, spin: bool, n: int, warmup: int) -> dict[str, float]:
    """The caller app's handler makes the calls; its own CPU it measures itself, the
    rest of the node's tree (node, both apps' slaves) is measured here over the whole
    request, and the caller's part taken off."""
    from engine.client import control_guard
    from transport.rpc import RpcClient

    pids = tree_pids(node.pid)
    async with RpcClient(node.ready, timeout=60, spin=False,
                         guard=control_guard(node.ready)) as control:
        await control.wait_connected()
        before = cpu_seconds(pids)
        out = await control.call(CALLER_APP, "calls", {"n": n, "warmup": warmup, "spin": spin})
        tree = cpu_seconds(pids) - before
    return {"rate": out["rate"], "p50_us": out["p50_us"], "p99_us": out["p99_us"],
            "client_us": out["cpu_s"] / n * 1e6,
            "server_us": (tree - out["cpu_s"]) / (n + warmup) * 1e6,
            "polls": out["polls"], "hits": out["hits"]}


async def warm_pool(address: str) -> None:
    """Both echo slaves started (a short burst grows the pool) before anything is timed."""
    from engine.client import control_guard
    from transport.rpc import RpcClient

    async with RpcClient(address, timeout=20, spin=False,
                         guard=control_guard(address)) as client:
        await client.wait_connected()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client.call, APP, "echo", PAYLOAD)


async def measure(rounds: int, n: int, warmup: int, shapes: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def record(shape: str, mode: str, figures: dict[str, float]) -> None:
        results.setdefault(shape, {}).setdefault(mode, []).append(figures)

    async def pairs(shape: str, run) -> None:
        for r in range(rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for spin in order:
                record(shape, "on" if spin else "off", await run(spin))

    if "rpc" in shapes:
        async with child_process([sys.executable, "-m", "bench.polling", "serve",
                                  "tcp://127.0.0.1:0"]) as server:
            pids = [server.pid]
            await pairs("rpc", lambda spin: rpc_client_round(server.ready, pids, spin, n, warmup))

    if shapes & {"cli", "sync"}:
        async with node_hosting(manifest()) as node:
            await warm_pool(node.ready)
            pids = tree_pids(node.pid)
            if "cli" in shapes:
                from engine.client import control_guard

                await pairs("cli", lambda spin: rpc_client_round(
                    node.ready, pids, spin, n, warmup, guard=control_guard(node.ready)))
            if "sync" in shapes:
                for _ in range(rounds):
                    record("sync", "-", await trio.to_thread.run_sync(
                        sync_round, node.ready, pids, n, warmup))

    if "app" in shapes:
        caller = dict(manifest(), name=CALLER_APP, args=str(CALLER_ENTRY))
        caller["engine"] = dict(caller["engine"], **{"pool-limit": 1})
        async with node_hosting(manifest(), caller) as node:
            await warm_pool(node.ready)
            await pairs("app->app", lambda spin: app_round(node, spin, n, warmup))
    return results


# -- the checks that need real timing ----------------------------------------------

async def polling_checks(n: int) -> dict[str, Any]:
    """Against a polling RpcServer in another process: sequential calls, and 16
    concurrent callers (each 100 calls)."""
    from transport.rpc import RpcClient

    async with child_process([sys.executable, "-m", "bench.polling", "serve",
                              "tcp://127.0.0.1:0", "--spin"]) as server:
        async with RpcClient(server.ready, timeout=10) as client:
            await client.wait_connected()
            for i in range(n):
                await client.call("t", "echo", i)
            polled = await client.call("t", "polled")
            sequential = {"calls": n, "client_polls": client.spin.polls,
                          "client_hits": client.spin.hits, "server_polled": polled}
        async with RpcClient(server.ready, timeout=10) as client:
            await client.wait_connected()

            async def caller() -> None:
                for i in range(100):
                    await client.call("t", "echo", i)

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(caller)
            concurrent = {"callers": 16, "calls": 1600, "client_polls": client.spin.polls}
    return {"sequential": sequential, "concurrent": concurrent}


def serve(address: str, spin: bool) -> None:
    """The child: an RpcServer echo (event ``polled``: how many requests it polled for)."""
    from transport.rpc import RpcServer

    def echo(req):
        return server.polled if req.event == "polled" else req.payload

    server = RpcServer(address, echo, spin=spin)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            print("READY", await nursery.start(server.run), flush=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


# -- report -------------------------------------------------------------------------

def _span(values: list[float], fmt: str) -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(lo)}-{fmt.format(hi)} ({fmt.format(mid)})"


def report(results: dict[str, Any]) -> None:
    print(f"\n{'shape':10} {'polling':7} {'round trips/s':>26} {'p50 us':>18} {'p99 us':>20} "
          f"{'client CPU us/rt':>22} {'server CPU us/rt':>22}")
    for shape, modes in results.items():
        for mode, runs in modes.items():
            print(f"{shape:10} {mode:7} {_span([r['rate'] for r in runs], '{:,.0f}'):>26} "
                  f"{_span([r['p50_us'] for r in runs], '{:.0f}'):>18} "
                  f"{_span([r['p99_us'] for r in runs], '{:.0f}'):>20} "
                  f"{_span([r['client_us'] for r in runs], '{:.1f}'):>22} "
                  f"{_span([r['server_us'] for r in runs], '{:.1f}'):>22}")
    for shape, modes in results.items():
        if "on" in modes and "off" in modes:
            ratios = [on["rate"] / off["rate"] for on, off in zip(modes["on"], modes["off"])]
            cpu = [(on["client_us"] + on["server_us"]) / (off["client_us"] + off["server_us"])
                   for on, off in zip(modes["on"], modes["off"])]
            hits = [r.get("hits", 0) / max(1, r.get("polls", 0)) for r in modes["on"]]
            print(f"{shape:10} on/off: rate {_span(ratios, '{:.2f}x')}, total CPU per round "
                  f"trip {_span(cpu, '{:.2f}x')}; polls that got their answer "
                  f"{_span(hits, '{:.0%}')}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(argv[1], "--spin" in argv)
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.polling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--only", default="rpc,cli,app,sync,checks")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 200 calls")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.warmup = 2, 200, 50
    shapes = set(args.only.split(","))
    load = os.getloadavg()
    print(f"bench.polling: {args.rounds} rounds x {args.calls} calls, load "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores", flush=True)
    t0 = time.perf_counter()
    results = trio.run(measure, args.rounds, args.calls, args.warmup, shapes)
    report(results)
    checks = None
    if "checks" in shapes:
        checks = trio.run(polling_checks, max(args.calls, 2000))
        seq, conc = checks["sequential"], checks["concurrent"]
        print(f"\nagainst a polling RpcServer: {seq['calls']} sequential calls, the client "
              f"polled {seq['client_polls']} times and got {seq['client_hits']} answers "
              f"so; the server got {seq['server_polled']} requests by polling.  16 "
              f"concurrent callers, 1,600 calls: {conc['client_polls']} polls (only when "
              f"a call was truly alone)")
    print(f"\n{time.perf_counter() - t0:.0f} s; load now {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shapes": results, "checks": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
