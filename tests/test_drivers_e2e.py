"""Every driver end to end: an App built from a manifest in tmp_path, real slave
processes running an app.py that uses ``from engine import on``."""
from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pynng
import pytest
import trio
from transport.rpc import RpcClient

from engine.app import App
from engine.manifest import load_manifest
from support import wait_until

pytestmark = pytest.mark.e2e

APP_PY = '''
from engine import on

@on("tick")
def tick(payload):
    return payload["tick"]

@on("changed")
def changed(payload):
    return payload["kind"]

@on("request")
def request(payload):
    if payload == "fail":
        raise ValueError("asked to fail")
    return {"got": payload}

@on("line")
def line(payload):
    return payload.upper()

@on("count")
def count(n):
    for i in range(n):
        yield i
'''


def write_app(tmp_path: Path, drivers: dict, engine: dict | None = None) -> App:
    (tmp_path / "app.py").write_text(APP_PY)
    manifest = {"name": "e2e", "args": "app.py", "drivers": drivers,
                "engine": engine or {"pool-limit": 2, "queue-limit": 20}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return App(load_manifest(tmp_path))


def req(address, payload):
    with pynng.Req0(dial=address, recv_timeout=20_000, send_timeout=20_000) as sock:
        sock.send(msgpack.packb(payload))
        return msgpack.unpackb(sock.recv())


async def test_timers_fs_monitor_and_servers_through_real_slaves(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    app = write_app(tmp_path, {
        "every": {"type": "recurring-timer", "emit": "tick", "interval": 100},
        "drift": {"type": "drifting-timer", "emit": "tick", "interval": 100},
        "spool": {"type": "filesystem-monitor", "emit": "changed", "path": "spool"},
        "rpc": {"type": "zeromq-server", "emit": "request", "endpoint": "tcp://127.0.0.1:0"},
        "sink": {"type": "nng-sink", "emit": "request", "endpoint": "tcp://127.0.0.1:0"},
        "raw": {"type": "raw-socket-server", "emit": "line", "endpoint": "127.0.0.1:0"},
        "native": {"type": "native-server", "emit": "count", "endpoint": "tcp://127.0.0.1:0"},
    })
    async with trio.open_nursery() as nursery:
        with trio.fail_after(60):
            await nursery.start(app.run)
            d = app.drivers
            # nng-server: msgpack in, {"result"} / {"error"} out
            assert await trio.to_thread.run_sync(req, d["rpc"].address, [1, "a"]) == {"result": {"got": [1, "a"]}}
            failed = await trio.to_thread.run_sync(req, d["rpc"].address, "fail")
            assert failed["error"]["type"] == "ValueError" and "asked to fail" in failed["error"]["message"]
            # raw socket, line framing
            host, port = d["raw"].address
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"hello\nworld\n")
            data = b""
            while data.count(b"\n") < 2:
                data += await stream.receive_some(1024)
            assert data == b"HELLO\nWORLD\n"
            await stream.aclose()
            # native-server: a streamed reply arrives chunk by chunk
            async with RpcClient(d["native"].server.address, timeout=20) as client:
                assert [c async for c in client.stream("e2e", "ignored", 3)] == [0, 1, 2]
            # nng-sink: fire and forget
            def push():
                with pynng.Push0(dial=d["sink"].address, send_timeout=10_000) as s:
                    for i in range(3):
                        s.send(msgpack.packb(i))
            await trio.to_thread.run_sync(push)
            await wait_until(lambda: d["sink"].stats.done == 3, "the sink ran the three jobs", timeout=30)
            # filesystem monitor
            (spool / "in.txt").write_text("x")
            await wait_until(lambda: d["spool"].stats.done >= 1, "the monitor ran a job for the file",
                             timeout=30)
            # timers have been ticking all along
            await wait_until(lambda: d["every"].stats.done >= 3 and d["drift"].stats.done >= 3,
                             "both timers ticked three times", timeout=30)
            info = app.info()["drivers"]
            assert info["drift"]["in_flight"] <= 1 and info["every"]["errors"] == 0
        await app.stop(5)


async def test_driver_that_cannot_start_fails_the_app(tmp_path):
    with pynng.Rep0(listen="tcp://127.0.0.1:0") as squatter:
        from transport.sockets import bound_address
        app = write_app(tmp_path, {"rpc": {"type": "nng-server", "emit": "request",
                                           "endpoint": bound_address(squatter)}})
        from engine.errors import DriverError
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                with pytest.raises(DriverError, match="cannot listen"):
                    await nursery.start(app.run)
        assert app.state == "stopped"
