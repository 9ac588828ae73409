"""Sockend over Socket.IO, side by side: cote's Sockend (node, cote 1.2.0 and its
socket.io 4.8) against ours (``python -m sockend``), both driven by the same node load
client (``bench/peers/sio_load.js``, socket.io-client 4.8, websocket transport only).

Each side is three processes on loopback, the same shape on both: the Sockend, a
Responder answering ``echo`` with the request's ``p``, and a Publisher of ``tick`` events
publishing when told (stdin), all in the default namespace.  cote's are
``bench/peers/cote_sockend.js`` and ``cote_responder.js`` (discovery kept on loopback as
in bench/cote.py); ours are a mesh Responder (``bench.servers mesh-responder``), a mesh
Publisher (``python -m bench.sockend_sio publisher``, below) and ``python -m sockend
--port 0`` with the discovery port, key and timing in its MESH_* environment.

Both stacks run for the whole comparison and the measurements take turns, ours then
cote's, so that the machine's load moves both columns alike:

- requests: ``ROUNDS`` runs of the load client per side (warm-up, then ``seq_calls``
  sequential emits with ack, then ``WINDOW`` emits kept outstanding over ``CONNS``
  sockets for ``duration`` s); medians of the rounds;
- fan-out: for each of ``FANOUT`` (clients, events, bursts) a load client connects the
  clients to ``/``; then per burst the Publisher publishes ``events`` events and the
  client waits until every socket has them all (or a quiet spell: what is missing is
  lost).  Deliveries/s is the bursts' deliveries over their first-to-last times.  A
  burst stays under our Sockend's per-browser buffer (256 events, docs/sockend.md), so
  nothing need be skipped; the bursts add up to a measurable run.

Processes' CPU (schedstat, every thread) is recorded around each measurement, the load
client's own included: on a small machine the client can be what bounds fan-out.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import trio

from .cote import SCRIPTS, _envs
from .harness import (PEERS_DIR, Child, Settings, child_process, cpu_seconds, free_udp_port,
                      python_child, python_env)

ROUNDS = 3                      # request runs per side, taking turns
WINDOW, CONNS = 100, 4          # 100 emits outstanding over 4 sockets (ours: <= 64 per socket)
FANOUT = ((100, 250, 4), (1000, 100, 3))   # (clients, events per burst, bursts at most)
FANOUT_BUDGET = 4.0             # s of bursts measured, after which no further burst starts
WARM_EVENTS = 20                # one burst first, not counted: links up, code warm
LISTENING = re.compile(r"sockend listening on http://[^:/]+:(\d+)/")


@dataclass
class Stack:
    """One side's running processes: where its Socket.IO server listens, its
    Publisher (driven by stdin), the pids whose CPU is counted."""
    name: str
    url: str
    publisher: Child
    pids: dict[str, int] = field(default_factory=dict)


def _node(script: str, *args: Any) -> list[str]:
    return [shutil.which("node") or "node", str(SCRIPTS / script), *map(str, args)]


def _node_env() -> dict[str, str]:
    return dict(os.environ, COTE_PEERS_DIR=str(PEERS_DIR))


@asynccontextmanager
async def cote_stack() -> AsyncIterator[Stack]:
    """cote's Sockend, Responder and Publisher: own loopback addresses, unicast
    discovery; the Sockend process takes three (see cote_sockend.js)."""
    envs = _envs(5)
    addresses = [env["BENCH_COTE_ADDR"] for env in envs]
    sockend_env = dict(envs[0], BENCH_COTE_ADDRS=",".join(addresses[:3]))
    async with child_process(_node("cote_responder.js"), env=envs[3]) as responder, \
            child_process(_node("cote_sockend.js", "publisher"), env=envs[4],
                          stdin=True) as publisher, \
            child_process(_node("cote_sockend.js", "sockend", 0), env=sockend_env) as sockend:
        port = json.loads(sockend.ready)["port"]
        yield Stack("cote", f"http://127.0.0.1:{port}", publisher,
                    {"sockend": sockend.pid, "responder": responder.pid,
                     "publisher": publisher.pid})


@asynccontextmanager
async def ours_stack() -> AsyncIterator[Stack]:
    """Our Sockend (``python -m sockend``), a mesh Responder and a mesh Publisher."""
    port, key = free_udp_port(), f"bench-sio-{os.getpid()}"
    env = dict(python_env(), MESH_PORT=str(port), MESH_INTERFACE="127.0.0.1",
               MESH_HELLO_INTERVAL="0.2", MESH_EXPIRY="1.0")
    argv = [sys.executable, "-m", "sockend", "--port", "0", "--key", key,
            "--max-clients", "1200"]
    async with child_process(python_child("bench.servers", "mesh-responder", port, key)) \
            as responder, \
            child_process(python_child("bench.sockend_sio", "publisher", port, key),
                          stdin=True) as publisher, \
            child_process(argv, env=env, wait_ready=False) as sockend:
        http_port = None
        with trio.move_on_after(20):
            while http_port is None and not sockend.eof.is_set():
                found = [LISTENING.search(line) for line in sockend.output]
                http_port = next((int(m.group(1)) for m in found if m), None)
                await trio.sleep(0.02)
        if http_port is None:
            raise RuntimeError("python -m sockend did not say where it listens: "
                               + " | ".join(sockend.output[-5:]))
        yield Stack("ours", f"http://127.0.0.1:{http_port}", publisher,
                    {"sockend": sockend.pid, "responder": responder.pid,
                     "publisher": publisher.pid})


async def probe_socketio(url: str) -> str | None:
    """None when ``url`` answers an Engine.IO v4 websocket handshake on /socket.io/
    with its open packet (``0{...}``); else what it did instead."""
    host, port = url.removeprefix("http://").split(":")
    request = (f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    data = b""
    with trio.move_on_after(3):
        try:
            stream = await trio.open_tcp_stream(host, int(port))
        except OSError as exc:
            return f"cannot connect to {host}:{port}: {exc}"
        async with stream:
            await stream.send_all(request.encode())
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            if " 101 " not in status + " ":
                return f"GET /socket.io/?EIO=4&transport=websocket answered {status!r}"
            while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                rest += chunk
            payload = rest[2:2 + (rest[1] & 0x7F)] if len(rest) >= 2 else b""
            if not payload.startswith(b"0{"):
                return (f"/socket.io/ upgraded (101) but its first frame is not an Engine.IO "
                        f"open packet: {rest[:80]!r}")
            return None
    return f"/socket.io/ handshake: no answer in 3 s (got {data[:80]!r})"


async def run_requests(stack: Stack, settings: Settings) -> dict[str, Any]:
    """One run of the load client in mode ``rr``; its RESULT plus the server side's
    CPU per request (Sockend, Responder; every request of the run, warm-up included)."""
    roles = ("sockend", "responder")
    cpu0 = {role: cpu_seconds([stack.pids[role]]) for role in roles}
    argv = _node("sio_load.js", stack.url, "rr", f"seq={settings.seq_calls}",
                 f"secs={settings.duration}", f"window={WINDOW}", f"conns={CONNS}")
    async with child_process(argv, env=_node_env(), wait_ready=False) as client:
        out = await client.result(timeout=40 + settings.duration)
    if "error" in out:
        raise RuntimeError(f"{stack.name}: the socket.io client saw: {out['error']}"
                           + (f" (first error: {out['first_error']})" if out.get("first_error")
                              else ""))
    if out.get("errors") or out.get("wrong"):
        raise RuntimeError(f"{stack.name}: {out['errors']} error and {out['wrong']} wrong "
                           f"answers of {out['requests']}; first: {out['first_error']}")
    per = {role: (cpu_seconds([stack.pids[role]]) - cpu0[role]) / out["requests"] * 1e6
           for role in roles}
    out["cpu_us_per_request"] = {**per, "client": out["client_cpu_s"] / out["requests"] * 1e6}
    out["server_cpu_us_per_request"] = sum(per.values())
    return out


async def _next_line(child: Child, prefix: str, seen: int, timeout: float) -> dict[str, Any]:
    """The JSON of the child's ``seen``-th (0-based) line starting with ``prefix``."""
    with trio.move_on_after(timeout):
        while not child.eof.is_set():
            lines = [line for line in child.output if line.startswith(prefix)]
            if len(lines) > seen:
                return json.loads(lines[seen][len(prefix):])
            await trio.sleep(0.01)
    raise RuntimeError(f"no {prefix.strip()} line within {timeout:g} s: "
                       + " | ".join(child.output[-3:]))


async def _burst(stack: Stack, clients: list[Child], events: int) -> dict[str, Any]:
    """Arm every load process, have the Publisher publish ``events``, merge what the
    load processes saw (their clocks are the same monotonic clock)."""
    seen = [sum(1 for line in c.output if line.startswith("BURST ")) for c in clients]
    for client in clients:
        await client.ask(f"burst {events}", "ARMED ", timeout=5)
    pids = [stack.pids["sockend"], stack.pids["publisher"]]
    cpu0 = cpu_seconds(pids)
    published = await stack.publisher.ask(f"publish {events}", "PUBLISHED ", timeout=20)
    parts = [await _next_line(c, "BURST ", n, timeout=120) for c, n in zip(clients, seen)]
    server_cpu = cpu_seconds(pids) - cpu0
    firsts = [p["first_ns"] for p in parts if p["first_ns"] is not None]
    lasts = [p["last_ns"] for p in parts if p["last_ns"] is not None]
    received = sum(p["received"] for p in parts)
    secs = (max(lasts) - min(firsts)) / 1e9 if firsts else 0.0
    return {"events": events, "expected": sum(p["expected"] for p in parts),
            "received": received, "lost": sum(p["lost"] for p in parts),
            "clients_short": sum(p["clients_short"] for p in parts), "secs": secs,
            "rate": (received - 1) / secs if secs > 0 else 0.0,
            "first_after_ms": min((p["first_after_ms"] for p in parts
                                   if p["first_after_ms"] is not None), default=None),
            "skipped": sum(p["skipped"] for p in parts),
            "disconnects": [p["disconnects"] for p in parts if p["disconnects"]],
            "client_cpu_s": sum(p["client_cpu_s"] for p in parts),
            "server_cpu_s": server_cpu, "publish_secs": published["secs"]}


async def run_fanout(stack: Stack, clients: int, events: int, bursts: int) -> dict[str, Any]:
    """``clients`` sockets on '/' (over ``fanout_procs()`` load processes), one warm-up
    burst, then up to ``bursts`` bursts of ``events`` (fewer once FANOUT_BUDGET s of
    bursts are measured: the slower side is not made to run for minutes)."""
    procs = fanout_procs()
    async with AsyncExitStack() as exits:
        loaders = [await exits.enter_async_context(child_process(
            _node("sio_load.js", stack.url, "fanout", f"clients={share}"), env=_node_env(),
            stdin=True, ready_timeout=60)) for share in _split(clients, procs)]
        subs = await stack.publisher.ask("subscribers 1 10", "SUBS ", timeout=15)
        if subs["subscribers"] < 1:
            raise RuntimeError(f"{stack.name}: its Publisher saw no subscriber (the Sockend) "
                               "within 10 s of the clients connecting")
        warm = await _burst(stack, loaders, WARM_EVENTS)
        runs: list[dict[str, Any]] = []
        while len(runs) < bursts and sum(r["secs"] for r in runs) < FANOUT_BUDGET:
            runs.append(await _burst(stack, loaders, events))
        connect_secs = max(json.loads(c.ready)["connect_secs"] for c in loaders)
    received = sum(r["received"] for r in runs)
    secs = sum(r["secs"] for r in runs)
    return {"clients": clients, "load_processes": procs, "events": events * len(runs),
            "received": received, "lost": sum(r["lost"] for r in runs),
            "warm_lost": warm["lost"], "secs": secs,
            "deliveries_per_s": received / secs if secs > 0 else 0.0,
            "connect_secs": connect_secs,
            "client_cpu_share": sum(r["client_cpu_s"] for r in runs) / secs if secs else None,
            "sockend_cpu_us_per_delivery": (sum(r["server_cpu_s"] for r in runs) / received * 1e6
                                            if received else None),
            "bursts": runs}


def fanout_procs() -> int:
    """Load processes for fan-out: one per two cores, up to 4.  A socket.io-client
    process spends ~3 us of CPU per delivery, so one process cannot take much more
    than ~300,000 deliveries/s; on a 2-core machine a second one only competes with the
    server for the same cores."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def compare(settings: Settings) -> dict[str, Any]:
    """Both sides, taking turns.  ``{"cote": {...}, "ours": {...}}``: per side
    ``requests`` (list of rounds), ``fanout`` ({clients: figures}), and ``error`` for
    what failed (a failure of ours never stops cote's measurements)."""
    out: dict[str, dict[str, Any]] = {"cote": {"requests": [], "fanout": {}},
                                      "ours": {"requests": [], "fanout": {}}}
    async with AsyncExitStack() as stack:
        stacks = {"cote": await stack.enter_async_context(cote_stack())}
        try:
            ours = await stack.enter_async_context(ours_stack())
        except Exception as exc:  # noqa: BLE001 - ours failing must not stop cote's
            out["ours"]["error"] = f"our Sockend did not start: {_why(exc)}"[:400]
        else:
            reason = await probe_socketio(ours.url)
            if reason is None:
                stacks["ours"] = ours
            else:
                out["ours"]["unavailable"] = reason
        for _ in range(ROUNDS):
            for name in ("ours", "cote"):
                if name in stacks and "error" not in out[name]:   # a failed side stops
                    try:
                        out[name]["requests"].append(await run_requests(stacks[name], settings))
                    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                        out[name]["error"] = _why(exc)[:400]
        for clients, events, bursts in FANOUT:
            for name in ("ours", "cote"):
                if name in stacks:
                    try:
                        out[name]["fanout"][clients] = await run_fanout(
                            stacks[name], clients, events, bursts)
                    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                        out[name]["fanout"][clients] = {"error": _why(exc)[:400]}
    return out


def _why(exc: BaseException) -> str:
    """The message of the one exception inside trio's (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"


# -- our Publisher, a child process: python -m bench.sockend_sio publisher PORT KEY ---------

def serve_publisher(port: str, key: str) -> None:
    """A mesh Publisher of ``tick`` driven by stdin lines, as cote_sockend.js's is:
    ``subscribers N SECS`` -> ``SUBS {json}``, ``publish N`` -> ``PUBLISHED {json}``."""
    from transport.mesh.pubsub import Publisher

    from .servers import _mesh_discovery

    async def main() -> None:
        payload, seq = "x" * 32, 0
        async with Publisher("bench-pub", broadcasts=["tick"], key=key,
                             discovery=_mesh_discovery(port)) as publisher:
            print("READY", publisher.address, flush=True)
            stdin, buf = trio.lowlevel.FdStream(os.dup(0)), b""
            while data := await stdin.receive_some(4096):
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode().split() or [""]
                    if words[0] == "subscribers":
                        with trio.move_on_after(float(words[2])):
                            while publisher.subscribers < int(words[1]):
                                await trio.sleep(0.01)
                        await trio.sleep(0.3)   # as cote's: let the link settle
                        print("SUBS", json.dumps({"subscribers": publisher.subscribers}),
                              flush=True)
                    elif words[0] == "publish":
                        t0 = time.perf_counter()
                        for i in range(int(words[1])):
                            publisher.publish("tick", {"seq": seq, "p": payload})
                            seq += 1
                            if i % 1000 == 999:
                                await publisher.flush()
                        await publisher.flush()
                        print("PUBLISHED", json.dumps({"published": int(words[1]),
                                                       "secs": time.perf_counter() - t0}),
                              flush=True)

    trio.run(main)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    if sys.argv[1:2] == ["publisher"] and len(sys.argv) == 4:
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            serve_publisher(sys.argv[2], sys.argv[3])
        except KeyboardInterrupt:
            pass
    else:   # python -m bench.sockend_sio: just this comparison
        from .cote import ensure_installed
        print("cote", ensure_installed())
        print(json.dumps(trio.run(compare, Settings()), indent=1))
