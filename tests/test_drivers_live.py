"""Drivers through a REAL node (`python -m engine run`) and real slaves: cron,
manual-scheduler (CLI and from a handler), nng-sink results and the state on the
maintenance channel, `engine top`, `make demo`'s command, and apps whose driver
cannot start beside one that serves.  Every process a test starts is ended in the
`start_node` fixture's teardown (tests/conftest.py: SIGTERM, then SIGKILL), which also
checks with psutil that no node or slave is left behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgpack
import pynng
import pytest
import trio
from transport.errors import RemoteError
from transport.rpc import RpcClient
from transport.sockets import TrioSocket, bound_address

from engine.app import App
from engine.client import connect
from engine.drivers.cron import CronDriver
from engine.node.maintenance import split_frame
from engine.manifest import load_manifest
from support import free_tcp_port, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ENGINE = [sys.executable, "-m", "engine"]


def write_app(root: Path, name: str, app_py: str, drivers: dict, **extra) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "app.py").write_text(app_py)
    manifest = {"name": name, "args": "app.py", "drivers": drivers,
                "engine": {"pool-limit": 2, "queue-limit": 20, "termination-timeout": 5}, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def nng_request(address: str, payload) -> dict:
    with pynng.Req0(dial=address, recv_timeout=15_000, send_timeout=15_000) as sock:
        sock.send(msgpack.packb(payload))
        return msgpack.unpackb(sock.recv())


# Handlers leave marker files (written atomically) that the test reads: proof that a
# job ran in a slave process, with what payload, when.
MARKER_APP = '''
import json, os, time
from pathlib import Path
from engine import on
from engine.drivers.scheduler import schedule

OUT = Path(__file__).resolve().parent / "out"

def mark(name, payload):
    OUT.mkdir(exist_ok=True)
    tmp = OUT / (name + ".tmp")
    tmp.write_text(json.dumps({"payload": payload, "pid": os.getpid(), "time": time.time()}))
    tmp.rename(OUT / (name + ".json"))

@on("fire")
def fire(payload):
    mark(payload["name"], payload)
    return payload["name"]

@on("cron")
def cron(payload):
    mark("cron-%d" % payload["tick"], payload)
    return payload["tick"]

@on("chain")
async def chain(payload):
    # from inside a handler: app and node come from ENGINE_APP / ENGINE_NODE
    return await schedule("later", in_=0.2, payload={"name": "from-handler", "app": os.environ["ENGINE_APP"]})

@on("job")
def job(x):
    if x == "fail":
        raise ValueError("asked to fail")
    return {"doubled": x * 2}

@on("tick")
def tick(payload):
    return payload["tick"]

@on("slow")
def slow(seconds):
    time.sleep(float(seconds))
    return "slept"

@on("line")
def line(text):
    return text.upper()
'''


def marker(folder: Path, name: str) -> dict | None:
    path = folder / "out" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# -- cron -------------------------------------------------------------------------------------

async def test_cron_fires_in_a_real_slave_at_the_minute(tmp_path, monkeypatch):
    """A real App and real slaves; the cron driver's wall clock is shifted so the next
    minute boundary is ~0.5 s after the driver first reads it."""
    offset: list[timedelta] = []
    first_read: list[datetime] = []

    def shifted_now(tz):
        real = datetime.now(tz)
        if not offset:
            to_boundary = 60 - real.second - real.microsecond / 1e6
            offset.append(timedelta(seconds=to_boundary - 0.5))
            first_read.append(real + offset[0])
        return real + offset[0]

    monkeypatch.setattr(CronDriver, "now", staticmethod(shifted_now))
    folder = write_app(tmp_path, "crontest", MARKER_APP,
                       {"minutely": {"type": "cron", "emit": "cron", "schedule": "* * * * *"}})
    app = App(load_manifest(folder))
    async with trio.open_nursery() as nursery:
        with trio.fail_after(25):
            await nursery.start(app.run)
            seen = await wait_until(lambda: marker(folder, "cron-1"), "the cron job leaves its marker",
                                    timeout=20, interval=0.05)
            driver = app.drivers["minutely"]
            await wait_until(lambda: driver.stats.done == 1, "the driver counts the job done")
            info = app.info()
        await app.stop(5)
    scheduled = datetime.fromisoformat(seen["payload"]["scheduled"])
    assert (scheduled.second, scheduled.microsecond) == (0, 0)
    assert seen["pid"] != os.getpid()                               # ran in a slave
    assert seen["pid"] in {s["pid"] for s in info["pool"]["slaves"]}
    # the first boundary after the driver first read its clock, not the minute after
    assert timedelta(0) < scheduled - first_read[0] < timedelta(minutes=1)
    d = info["drivers"]["minutely"]
    assert d["ticks"] == 1 and d["skipped"] == 0 and d["errors"] == 0
    assert datetime.fromisoformat(d["next"]) == scheduled + timedelta(minutes=1)


# -- manual-scheduler -------------------------------------------------------------------------

async def test_manual_scheduler_from_the_cli_and_from_a_handler(tmp_path, start_node):
    folder = write_app(tmp_path / "apps", "sched", MARKER_APP,
                       {"later": {"type": "manual-scheduler", "emit": "fire"}})
    node = await start_node(tmp_path / "apps")

    at_aware = (datetime.now(timezone.utc) + timedelta(seconds=3.5)).isoformat()
    at_naive = (datetime.now() + timedelta(seconds=3.5)).replace(tzinfo=None).isoformat()
    replies, answered = {}, {}
    async with trio.open_nursery() as nursery:
        async def run(key, *args):
            replies[key] = await node.cli(*args)
            answered[key] = time.time()
        nursery.start_soon(run, "in", "schedule", "sched", "later", "--in", "0.3", '{"name": "in"}')
        nursery.start_soon(run, "at", "schedule", "sched", "later", "--at", at_aware, '{"name": "at"}')
        # the payload may also come before the time
        nursery.start_soon(run, "naive", "schedule", "sched", "later", '{"name": "naive"}', "--at", at_naive)
        nursery.start_soon(run, "twopayloads", "schedule", "sched", "later", "1", "--in", "1", "2")
        nursery.start_soon(run, "chain", "call", "sched", "chain")
        nursery.start_soon(run, "nodriver", "schedule", "sched", "nope", "--in", "1")
    for key in ("in", "at", "naive", "chain"):
        assert replies[key].returncode == 0, (key, replies[key].stderr)
    dues = {key: json.loads(replies[key].stdout)["due"] for key in ("in", "at", "naive", "chain")}
    assert replies["nodriver"].returncode == 1
    assert b"no manual-scheduler driver 'nope'" in replies["nodriver"].stderr
    assert replies["twopayloads"].returncode == 1
    assert b"one JSON payload" in replies["twopayloads"].stderr

    names = {"in": "in", "at": "at", "naive": "naive", "chain": "from-handler"}
    await wait_until(lambda: all(marker(folder, n) for n in names.values()),
                     "every scheduled job leaves its marker", timeout=15, interval=0.05)
    for key, name in names.items():
        seen = marker(folder, name)
        assert seen["pid"] != node.proc.pid
        # never early (small margin: the due time is computed on the node's wall clock)
        assert seen["time"] >= datetime.fromisoformat(dues[key]).timestamp() - 0.05, key
    assert marker(folder, "from-handler")["payload"]["app"] == "sched"
    at_ts, due_ts = datetime.fromisoformat(at_aware).timestamp(), datetime.fromisoformat(dues["at"]).timestamp()
    if answered["at"] < at_ts:   # scheduled in time: due exactly when asked (else: at once)
        assert abs(due_ts - at_ts) < 0.01
    assert due_ts >= at_ts - 0.01
    async with connect(node.address, timeout=10) as client:
        info = (await client.info("sched"))["drivers"]["later"]
    assert (info["pending"], info["ticks"], info["done"], info["skipped"]) == (0, 4, 4, 0)


# -- top ----------------------------------------------------------------------------------------

async def test_top_once_and_live_against_a_live_node(tmp_path, start_node):
    write_app(tmp_path / "apps", "toptest", MARKER_APP, {
        "beat": {"type": "recurring-timer", "emit": "tick", "interval": 200},
        "later": {"type": "manual-scheduler", "emit": "fire"},
    })
    node = await start_node(tmp_path / "apps")
    done = await node.cli("top", "--once")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.splitlines()[0].split()[:3] == ["APP", "STATE", "SLAVES"]
    assert re.search(r"^toptest +running +[12] ", out, re.M), out   # from the channel: no '*'
    assert re.search(r"^  beat +recurring-timer +ticks \d+", out, re.M), out
    assert re.search(r"^  later +manual-scheduler ", out, re.M), out

    # live mode: redraws until interrupted; SIGINT ends it cleanly
    log = tmp_path / "top.out"
    with open(log, "wb") as out_file:
        proc = subprocess.Popen(["timeout", "-s", "KILL", "30", *ENGINE, "top", "--node", node.address,
                                 "--interval", "0.5"], stdout=out_file, stderr=subprocess.PIPE)
    try:
        # 3 frames (~1.2 KB) show within seconds only if each is flushed as drawn
        await wait_until(lambda: log.read_bytes().count(b"\x1b[H\x1b[2J") >= 3
                         or proc.poll() is not None, "top has drawn three frames",
                         timeout=8, interval=0.05)
        assert proc.poll() is None, proc.stderr.read()
        # Real time on purpose: a user's ^C finds top waiting between redraws (0.5 s).
        await trio.sleep(0.5)
        proc.send_signal(signal.SIGINT)        # timeout forwards it to top
        await wait_until(lambda: proc.poll() is not None, "top exits on SIGINT", interval=0.05)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()
    assert proc.returncode in (0, 130), stderr
    assert "Traceback" not in stderr, stderr
    frames = log.read_text().split("\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 3
    assert all("toptest" in f and "beat" in f for f in frames)


# -- nng-sink results and state on the maintenance channel ------------------------------------

async def test_sink_results_and_state_on_the_maintenance_channel(tmp_path, start_node):
    write_app(tmp_path / "apps", "sinkapp", MARKER_APP, {
        "sink": {"type": "nng-sink", "emit": "job", "endpoint": "tcp://127.0.0.1:0", "publish": True},
    })
    node = await start_node(tmp_path / "apps")
    done = await node.cli("info", "sinkapp", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    pubsub, sink = info["pubsub"], info["drivers"]["sink"]["endpoint"]
    assert pubsub.startswith("tcp://127.0.0.1:") and not pubsub.endswith(":0")

    states, results = [], {}
    sub = TrioSocket(pynng.Sub0())
    try:
        sub.sock.subscribe(b"")
        sub.sock.dial(pubsub, block=False)
        with trio.fail_after(20):
            while not states:                      # connected: states arrive
                topic, body = split_frame(await sub.recv())
                if topic == "state":
                    states.append(body)

            def push():
                with pynng.Push0(dial=sink, send_timeout=10_000) as s:
                    s.send(msgpack.packb(21))
                    s.send(msgpack.packb("fail"))
            await trio.to_thread.run_sync(push)
            while len(results) < 2 or len(states) < 4:
                topic, body = split_frame(await sub.recv())
                if topic == "state":
                    states.append(body)
                else:
                    assert topic == "result.sink", topic
                    results[json.dumps(body["payload"])] = body
    finally:
        sub.close()
    assert results["21"] == {"driver": "sink", "payload": 21, "result": {"doubled": 42}}
    failed = results['"fail"']["error"]
    assert failed["code"] == "handler" and failed["type"] == "ValueError" and "asked to fail" in failed["message"]
    bodies = states
    assert [b["seq"] for b in bodies] == list(range(bodies[0]["seq"], bodies[0]["seq"] + len(bodies)))
    # (once a second: tests/test_drivers_maintenance.py, on MockClock)
    last = bodies[-1]
    assert last["app"] == "sinkapp" and last["state"] == "running" and last["slaves"] >= 1
    assert last["drivers"]["sink"]["done"] == 1 and last["drivers"]["sink"]["errors"] == 1
    assert last["done"] >= 1 and last["errors"] >= 1


# -- make demo ------------------------------------------------------------------------------------

async def test_make_demo_command_starts_every_example_app(tmp_path, start_node):
    examples = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", examples, ignore=shutil.ignore_patterns("__pycache__", "*.sock"))
    for leftover in (examples / "pipeline" / "inbox").glob("*.txt"):
        if leftover.name != "README.txt":
            leftover.unlink()
    api_port, pubsub_port = free_tcp_port(), free_tcp_port()
    manifest_path = examples / "pipeline" / "manifest.json"
    text = manifest_path.read_text()
    assert ":9210" in text and ":9211" in text   # the demo's fixed ports, rewritten here
    manifest_path.write_text(text.replace(":9210", f":{api_port}").replace(":9211", f":{pubsub_port}"))

    node = await start_node(examples)            # what `make demo` runs: engine run examples/
    assert re.search(r"serving 3 app\(s\): echo, js-echo, pipeline", node.stderr), node.stderr
    assert "not hosting" not in node.stderr, node.stderr
    async with connect(node.address, timeout=15) as client:
        assert await client.call("echo", "echo", {"hi": 1}) == {"hi": 1}
        assert await client.call("js-echo", "echo", {"hi": 1}) == {"hi": 1}   # a Node.js app
        assert await client.call("js-echo", "sum", 1, chunks=[2, 3]) == 6
        assert await client.call("echo", "count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert await client.call("pipeline", "squares", 4) == [0, 1, 4, 9]   # app -> app

        (examples / "pipeline" / "inbox" / "note.txt").write_text("hello brave new world\n")
        reply = await trio.to_thread.run_sync(nng_request, f"tcp://127.0.0.1:{api_port}", "inbox/note.txt")
        assert reply == {"result": {"file": "inbox/note.txt", "lines": 1, "words": 4}}

        async def counted_and_ticked():
            drivers = (await client.info("pipeline"))["drivers"]
            return drivers if drivers["inbox"]["done"] >= 1 and drivers["heartbeat"]["done"] >= 1 else None
        drivers = await wait_until(counted_and_ticked, "the inbox file is counted and the heartbeat "
                                   "ticked (every 5 s)", timeout=20, interval=0.2)
        info = await client.info("pipeline")
    assert info["pubsub"] == f"tcp://127.0.0.1:{pubsub_port}"
    assert drivers["api"]["done"] == 1
    assert all(d["errors"] == 0 for d in drivers.values()), drivers


# -- drivers that cannot start, beside an app that serves ----------------------------------------

async def test_apps_whose_drivers_cannot_start_are_reported_and_the_good_one_serves(tmp_path, start_node):
    apps = tmp_path / "apps"
    held_tcp = socket.socket()
    held_tcp.bind(("127.0.0.1", 0))
    held_tcp.listen()
    held_nng = pynng.Rep0(listen="tcp://127.0.0.1:0")
    try:
        tcp_port = held_tcp.getsockname()[1]
        nng_addr = bound_address(held_nng)
        write_app(apps, "good", MARKER_APP, {
            "raw": {"type": "raw-socket-server", "emit": "line", "endpoint": "127.0.0.1:0"},
            "rpc": {"type": "nng-server", "emit": "job", "endpoint": "tcp://127.0.0.1:0"},
        })
        write_app(apps, "taken-raw", MARKER_APP, {
            "raw": {"type": "raw-socket-server", "emit": "line", "endpoint": f"127.0.0.1:{tcp_port}"}})
        write_app(apps, "taken-nng", MARKER_APP, {
            "rpc": {"type": "zeromq-server", "emit": "job", "endpoint": nng_addr}})
        write_app(apps, "taken-native", MARKER_APP, {
            "rpc": {"type": "native-server", "emit": "job", "endpoint": f"tcp://127.0.0.1:{tcp_port}"}})
        write_app(apps, "taken-pubsub", MARKER_APP, {}, pubsub={"endpoint": nng_addr})
        write_app(apps, "no-path", MARKER_APP, {
            "spool": {"type": "filesystem-monitor", "emit": "fire", "path": "missing"}})
        write_app(apps, "bad-endpoint", MARKER_APP, {
            "rpc": {"type": "nng-server", "emit": "job", "endpoint": "tcp://127.0.0.1:99999"}})
        write_app(apps, "bad-option", MARKER_APP, {
            "raw": {"type": "raw-socket-server", "emit": "line", "endpoint": "127.0.0.1:1", "framing": "xml"}})

        node = await start_node(apps)
        assert re.search(r"serving 1 app\(s\): good", node.stderr), node.stderr
        done = await node.cli("list", "--json")
        rejected = {Path(k).parent.name: v for k, v in json.loads(done.stdout)["rejected"].items()}
        assert set(rejected) == {"taken-raw", "taken-nng", "taken-native", "taken-pubsub", "no-path",
                                 "bad-endpoint", "bad-option"}
        for name in ("taken-raw", "taken-nng", "taken-native"):
            # The app, its file and the field path, then why.
            assert re.search(rf"app {name} \(\S+/{name}/manifest.json\): drivers\.r(aw|pc) "
                             r"\([a-z-]+\) could not start: cannot listen on", rejected[name]), \
                rejected[name]
        assert re.search(r"app taken-pubsub \(\S+manifest.json\): pubsub.endpoint: cannot listen on",
                         rejected["taken-pubsub"]), rejected["taken-pubsub"]
        assert "drivers.spool (filesystem-monitor) could not start: path" in rejected["no-path"]
        assert "does not exist" in rejected["no-path"]
        assert "drivers.raw.framing: expected one of 'line', 'length-prefixed'" in rejected["bad-option"]
        assert "drivers.rpc.endpoint: expected tcp://host:port with a port in 0-65535" in rejected["bad-endpoint"]

        async with connect(node.address, timeout=15) as client:
            drivers = (await client.info("good"))["drivers"]
            host, port = drivers["raw"]["endpoint"].rsplit(":", 1)

            # a client that resets its connection mid-reply must not stop the app
            for _ in range(3):
                s = socket.create_connection((host, int(port)))
                s.sendall(b"pending\n" * 3)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            async def reset_seen_and_idle():
                # "idle" alone holds before the resets are even accepted: wait for one
                info = await client.info("good")
                return (info["drivers"]["raw"]["resets"] >= 1
                        and info["drivers"]["raw"]["connections"] == 0 and info["pool"]["queue"] == 0
                        and info["pool"]["running"] == 0)
            await wait_until(reset_seen_and_idle, "a reset is counted and the app is idle",
                             timeout=15, interval=0.1)

            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"still here\n")
            data = b""
            with trio.fail_after(15):
                while not data.endswith(b"\n"):
                    data += await stream.receive_some(1024)
            await stream.aclose()
            assert data == b"STILL HERE\n"
            reply = await trio.to_thread.run_sync(nng_request, drivers["rpc"]["endpoint"], 4)
            assert reply == {"result": {"doubled": 8}}

            # deploying at runtime onto a taken port: a clear error, the node goes on
            done = await node.cli("deploy", str(apps / "taken-raw"))
            assert done.returncode == 1
            assert re.search(rb"error: .*could not start: cannot listen on 127\.0\.0\.1:\d+", done.stderr), \
                done.stderr
            assert (await client.info("good"))["state"] == "running"
            assert (await client.list())["apps"].keys() == {"good"}
            assert node.proc.poll() is None
    finally:
        held_tcp.close()
        held_nng.close()


# -- servers when the pool is saturated ----------------------------------------------------------

async def test_servers_answer_queue_full_at_once_through_a_real_node(tmp_path, start_node):
    write_app(tmp_path / "apps", "busy", MARKER_APP, {
        "rpc": {"type": "nng-server", "emit": "slow", "endpoint": "tcp://127.0.0.1:0"},
        "raw": {"type": "raw-socket-server", "emit": "slow", "endpoint": "127.0.0.1:0"},
        "nat": {"type": "native-server", "emit": "slow", "endpoint": "tcp://127.0.0.1:0"},
    }, engine={"pool-limit": 1, "queue-limit": 1, "concurrency": 1, "termination-timeout": 5})
    node = await start_node(tmp_path / "apps")
    slow_replies = []
    async with connect(node.address, timeout=20) as client:
        drivers = (await client.info("busy"))["drivers"]
        rpc, nat = drivers["rpc"]["endpoint"], drivers["nat"]["endpoint"]
        host, port = drivers["raw"]["endpoint"].rsplit(":", 1)
        assert await trio.to_thread.run_sync(nng_request, rpc, 0) == {"result": "slept"}   # a slave is up

        async with trio.open_nursery() as nursery:
            async def slow_one():
                slow_replies.append(await trio.to_thread.run_sync(nng_request, rpc, 2.5))
            for _ in range(2):              # one running, one queued: the pool is full
                nursery.start_soon(slow_one)
            async def saturated():
                pool = (await client.info("busy"))["pool"]
                return pool["running"] == 1 and pool["queue"] == 1
            await wait_until(saturated, "one job runs and one waits", timeout=10)

            refused = await trio.to_thread.run_sync(nng_request, rpc, 0)
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"0\n")
            line = b""
            with trio.fail_after(10):
                while not line.endswith(b"\n"):
                    line += await stream.receive_some(1024)
            await stream.aclose()
            async with RpcClient(nat, timeout=10) as native:
                with pytest.raises(RemoteError) as native_refusal:
                    await native.call("busy", "slow", 0)
            assert slow_replies == []          # all three answered while the pool was still full
            info = await client.info("busy")   # and the node answered too
    assert refused["error"]["code"] == "queue-full" and refused["error"]["retryable"] is True
    assert line.startswith(b"ERROR queue-full: ")
    assert native_refusal.value.code == "queue-full"
    assert slow_replies == [{"result": "slept"}] * 2
    assert [info["drivers"][d]["skipped"] for d in ("rpc", "raw", "nat")] == [1, 1, 1]
