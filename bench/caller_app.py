"""An app calling another app, for bench/polling.py: its handler makes sequential calls
to ``bench-echo`` through a trio ``RpcClient`` of its own, polling on or off, and
reports their rate and this slave's CPU.  (``engine.acall`` makes the same kind of
client, with the default ``spin``; one made here lets the benchmark choose.)"""
import os
import time

from engine import on
from engine.client import control_guard
from transport.rpc import RpcClient


@on("calls")
async def calls(spec):
    payload = b"x" * 32
    lat = []
    node = os.environ["ENGINE_NODE"]
    async with RpcClient(node, timeout=10, spin=spec["spin"], guard=control_guard(node)) as client:
        await client.wait_connected()
        for _ in range(spec["warmup"]):
            await client.call("bench-echo", "echo", payload)
        clock = time.perf_counter
        cpu0, t0 = time.process_time(), clock()
        for _ in range(spec["n"]):
            start = clock()
            await client.call("bench-echo", "echo", payload)
            lat.append(clock() - start)
        elapsed, cpu = clock() - t0, time.process_time() - cpu0
        polls = (client.spin.polls, client.spin.hits) if client.spin is not None else (0, 0)
    lat.sort()
    return {"rate": spec["n"] / elapsed, "p50_us": lat[len(lat) // 2] * 1e6,
            "p99_us": lat[int(len(lat) * 0.99)] * 1e6, "cpu_s": cpu, "elapsed_s": elapsed,
            "polls": polls[0], "hits": polls[1]}
