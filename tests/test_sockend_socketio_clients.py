"""Sockend's Socket.IO v4 endpoint against real clients, end to end.

- the official Node ``socket.io-client`` (examples/sockend/node_modules, ``make js``),
  driven by tests/sockend_clients/sio_driver.js, with the default transports (polling,
  then the upgrade to a websocket) and websocket only: acks on ``/`` and ``/rnd``, an
  error ack, binary attachments both ways, Publisher events per namespace, an emit
  without ack reaching a mesh Subscriber, and reconnection after Sockend restarts; and
  cote's node-style acks (``--ack node``);
- ``python-socketio``'s client (in a thread): both namespaces, calls (an error, bytes),
  events through handlers, reconnection after a restart;
- headless Chromium loading examples/sockend/seed.html verbatim (it connects to
  ``http://localhost``, port 80: so Sockend, the services and Chromium run in a network
  namespace of their own);
- the bearer-token hooks (examples/sockend/bearer_hooks.py) and rooms.

Sockend and the example services run as processes (``python -m sockend``,
``examples/sockend/services.py``); the test's own mesh components run in-process on the
same private discovery port.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import trio

from support import free_udp_port, wait_until
from transport import DiscoveryConfig, Publisher, Responder, Subscriber

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "sockend_clients"
NODE_MODULES = ROOT / "examples" / "sockend" / "node_modules"
LISTENING_RE = re.compile(r"sockend listening on http://[0-9.]+:(\d+)/")
HELLO, EXPIRY = 0.5, 2.0    # discovery timing: components find each other within ~0.5 s
BLOB = bytes(range(256)) + b"\x00sockend\xff"
# A short heartbeat, so that pings and pongs flow many times in a test, and a client
# whose pings stopped coming would give up (after interval + timeout) within it.
FAST_PINGS = ("--ping-interval", "0.3", "--ping-timeout", "1.5")


def socketio_client_or_skip() -> None:
    if not (NODE_MODULES / "socket.io-client" / "package.json").is_file():
        pytest.skip("examples/sockend/node_modules/socket.io-client is not installed: run "
                    "`make js` (npm ci --prefix examples/sockend); CI does")


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node on PATH: install Node.js and run `make js` to test the official "
                    "socket.io-client against Sockend (CI does)")
    socketio_client_or_skip()
    return node


def to_wire(value: Any) -> Any:
    """bytes as the driver's {"$bytes": base64}."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    return value


def from_wire(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    return value


# -- processes ------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, process: trio.Process, log: Path):
        self.name, self.process, self.log = name, process, log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def printed(self, marker: str) -> bool:
        text = self.text()
        if marker in text:
            return True
        if self.process.returncode is not None:
            raise AssertionError(f"{self.name} exited ({self.process.returncode}) before printing "
                                 f"{marker!r}:\n{text[-3000:]}")
        return False


class Harness:
    """The processes of one test (each ended in any case) and the mesh they share."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery):
        self.tmp_path = tmp_path
        self.nursery = nursery
        self.mesh_port = free_udp_port()
        self.env = dict(os.environ, MESH_PORT=str(self.mesh_port), MESH_INTERFACE="127.0.0.1",
                        MESH_HELLO_INTERVAL=str(HELLO), MESH_EXPIRY=str(EXPIRY),
                        PYTHONUNBUFFERED="1", NODE_PATH=str(NODE_MODULES))
        self.disco = DiscoveryConfig(port=self.mesh_port, interface="127.0.0.1",
                                     hello_interval=HELLO, expiry=EXPIRY)
        self.procs: list[trio.Process] = []
        self._logs = itertools.count()

    async def start(self, name: str, argv: list[str], *, marker: str | None,
                    env: dict[str, str] | None = None, timeout: float = 20, **options: Any) -> Proc:
        log = self.tmp_path / f"{name}-{next(self._logs)}.log"
        with open(log, "wb") as out:
            process = await trio.lowlevel.open_process(
                argv, cwd=ROOT, env=env or self.env, stdout=options.pop("stdout", out),
                stderr=out, stdin=options.pop("stdin", subprocess.DEVNULL), **options)
        self.procs.append(process)
        proc = Proc(name, process, log)
        if marker is not None:
            await wait_until(lambda: proc.printed(marker), f"{name} prints {marker!r}",
                             timeout=timeout, interval=0.05)
        return proc

    async def services(self, *prefix: str, interval: float = 0.2) -> Proc:
        return await self.start("services", [*prefix, sys.executable, "examples/sockend/services.py",
                                             "--interval", str(interval)], marker="services ready")

    async def sockend(self, *args: str, prefix: tuple[str, ...] = (), port: int = 0,
                      env: dict[str, str] | None = None) -> tuple[Proc, int]:
        proc = await self.start("sockend", [*prefix, sys.executable, "-m", "sockend", "--port", str(port),
                                            "--static", "examples/sockend", *args],
                                marker="sockend listening on", env=env)
        match = LISTENING_RE.search(proc.text())
        assert match, proc.text()
        return proc, int(match.group(1))

    async def kill(self, proc: Proc) -> None:
        proc.process.kill()
        await proc.process.wait()

    async def node_driver(self) -> "NodeDriver":
        node = node_or_skip()
        proc = await self.start("node-driver", [node, str(CLIENTS / "sio_driver.js")], marker=None,
                                stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        driver = NodeDriver(proc)
        self.nursery.start_soon(driver.pump)
        await driver.wait_for(lambda m: m["ev"] == "ready", "the node driver starts")
        return driver

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            for process in self.procs:
                if process.returncode is None:
                    process.terminate()
            for process in self.procs:
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()


@asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = None
    try:
        async with trio.open_nursery() as nursery:
            h = Harness(tmp_path, nursery)
            try:
                yield h
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if h is not None:
            await h.stop_all()


class NodeDriver:
    """tests/sockend_clients/sio_driver.js: commands in, JSON reports out (self.seen)."""

    def __init__(self, proc: Proc):
        self.proc = proc
        self.seen: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self._reqs = itertools.count(1)

    async def pump(self) -> None:
        assert self.proc.process.stdout is not None
        buf = b""
        while chunk := await self.proc.process.stdout.receive_some(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    self.seen.append(from_wire(json.loads(line)))
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def send(self, **command: Any) -> None:
        assert self.proc.process.stdin is not None
        await self.proc.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    def where(self, predicate: Callable[[dict], bool], since: int = 0) -> list[dict]:
        return [m for m in self.seen[since:] if predicate(m)]

    async def wait_for(self, predicate: Callable[[dict], bool], what: str, *, since: int = 0,
                       count: int = 1, timeout: float = 10) -> dict:
        """The ``count``-th report (after index ``since``) that ``predicate`` accepts."""
        with trio.move_on_after(timeout):
            while True:
                found = self.where(predicate, since)
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.process.returncode is not None or self.proc.process.stdout is None:
                    break
                await self._changed.wait()
        errors = self.where(lambda m: m["ev"] in ("driver_error", "connect_error", "disconnect"))
        raise AssertionError(f"timed out after {timeout} s waiting until {what}; last reports: "
                             f"{self.seen[-8:]}; errors: {errors[-5:]}; "
                             f"stderr: {self.proc.text()[-1500:]}")

    async def open(self, sock: str, url: str, **opts: Any) -> None:
        await self.send(op="open", id=sock, url=url, opts=opts)

    async def connected(self, sock: str, since: int = 0, timeout: float = 10) -> dict:
        return await self.wait_for(lambda m: m["ev"] == "connect" and m["id"] == sock,
                                   f"socket {sock} connects", since=since, timeout=timeout)

    async def emit(self, sock: str, event: str, *args: Any, ack: str | None = "promise",
                   timeout: float = 5) -> dict:
        """One emit; with an ack, the driver's ack report ({"args": [...]} or {"error"})."""
        req = next(self._reqs)
        await self.send(op="emit", id=sock, req=req, event=event, args=to_wire(list(args)),
                        ack=ack, timeout=int(timeout * 1000))
        if ack is None:
            return await self.wait_for(lambda m: m["ev"] == "emitted" and m["req"] == req,
                                       f"emit {req} is sent")
        return await self.wait_for(lambda m: m["ev"] == "ack" and m["req"] == req,
                                   f"the ack of {event} #{req} on {sock}", timeout=timeout + 2)

    async def answer(self, sock: str, event: str, data: Any, *, timeout: float = 5) -> Any:
        """emitWithAck's value (the Socket.IO ack's one argument)."""
        got = await self.emit(sock, event, data, ack="promise", timeout=timeout)
        assert "error" not in got, f"emitWithAck({event!r}, {data!r}) on {sock} failed: {got}"
        return got["args"][0]

    def events(self, sock: str, name: str, since: int = 0) -> list[Any]:
        return [m["args"] for m in self.where(
            lambda m: m["ev"] == "event" and m["id"] == sock and m["name"] == name, since)]


# -- in-process mesh components ----------------------------------------------------------------


def echo_responder(disco: DiscoveryConfig, namespace: str = "") -> Responder:
    """``binaryEcho``: what bytes arrived (type and value) and the bytes back, reversed
    too; ``whoami``/``adminReset``: the request as the Responder got it."""
    rep = Responder("test-echo", namespace=namespace,
                    responds_to=["binaryEcho", "whoami", "adminReset"], discovery=disco)

    @rep.on("binaryEcho")
    async def echo(req):
        blob = req.get("blob")
        return {"got": type(blob).__name__, "echo": blob,
                "reversed": blob[::-1] if isinstance(blob, bytes) else None,
                "nested": [req.get("n"), {"again": blob}]}

    @rep.on("whoami")
    async def whoami(req):
        return req

    @rep.on("adminReset")
    async def admin(req):
        return req
    return rep


async def collect(sub: Subscriber, into: list) -> None:
    async for event in sub:
        into.append((event.topic, event.data))


async def publish_every(pub: Publisher, interval: float, make: Callable[[int], list[tuple[str, Any]]]) -> None:
    for k in itertools.count():
        for topic, data in make(k):
            pub.publish(topic, data)
        await trio.sleep(interval)


def random_answer(answer: Any, namespace: str, val: int) -> None:
    assert isinstance(answer, dict) and answer.get("namespace") == namespace \
        and answer.get("val") == val and isinstance(answer.get("answer"), int), \
        f"expected the {namespace!r} Responder's answer to val={val}, got {answer!r}"


# -- 1. the official Node client -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("transports", [None, ["websocket"], ["polling"]],
                         ids=["polling-then-upgrade", "websocket", "polling"])
async def test_node_socketio_client_requests_events_binary_publishes_and_reconnects(tmp_path, transports):
    node_or_skip()
    with trio.fail_after(45):
        async with harness(tmp_path) as h, \
                echo_responder(h.disco), \
                Publisher("test-pub", broadcasts=["binUpdate"], discovery=h.disco) as pub0, \
                Publisher("test-pub-rnd", namespace="rnd", broadcasts=["rndTick"], discovery=h.disco) as pub1, \
                Subscriber("test-sub", subscribes_to=["browserNote"], discovery=h.disco) as sub0, \
                Subscriber("test-sub-rnd", namespace="rnd", subscribes_to=["browserNote"],
                           discovery=h.disco) as sub1:
            notes0: list = []
            notes1: list = []
            h.nursery.start_soon(collect, sub0, notes0)
            h.nursery.start_soon(collect, sub1, notes1)
            h.nursery.start_soon(publish_every, pub0, 0.1,
                                 lambda k: [("binUpdate", {"ns": "default", "k": k, "bin": BLOB[:16]})])
            h.nursery.start_soon(publish_every, pub1, 0.1, lambda k: [("rndTick", {"ns": "rnd", "k": k})])
            await h.services()
            sockend, port = await h.sockend(*FAST_PINGS)
            driver = await h.node_driver()
            opts: dict[str, Any] = {"reconnectionDelay": 100, "reconnectionDelayMax": 500}
            if transports:
                opts["transports"] = transports
            await driver.open("a", f"http://127.0.0.1:{port}/", **opts)
            await driver.open("b", f"http://127.0.0.1:{port}/rnd", **opts)
            await driver.connected("a")
            await driver.connected("b")

            # the transports: polling first and an upgrade, or a websocket from the start
            first_open = await driver.wait_for(lambda m: m["ev"] == "open", "the engine opens")
            if transports:
                assert first_open["transport"] == transports[0]
            else:
                assert first_open["transport"] == "polling"
                up = await driver.wait_for(lambda m: m["ev"] == "upgrade", "the engine upgrades")
                assert up["transport"] == "websocket"

            # requests with acks, each namespace to its own Responders
            random_answer(await driver.answer("a", "randomRequest", {"val": 3}), "default", 3)
            random_answer(await driver.answer("b", "randomRequest", {"val": 4}), "rnd", 4)
            cb = await driver.emit("a", "randomRequest", {"val": 5}, ack="callback")
            assert cb["error"] is None and len(cb["args"]) == 1, cb   # ack(answer): one argument
            random_answer(cb["args"][0], "default", 5)

            # a failure: one argument, {"error": {...}}
            bad = await driver.emit("b", "randomRequest", {"val": "x"}, ack="callback")
            assert bad["error"] is None and len(bad["args"]) == 1, bad
            error = bad["args"][0]["error"]
            assert (error["code"], error["type"], error["retryable"]) == ("handler", "ValueError", False)
            assert "integer" in error["message"]

            # bytes both ways, as binary attachments
            echoed = await driver.answer("a", "binaryEcho", {"blob": BLOB, "n": 7})
            assert echoed == {"got": "bytes", "echo": BLOB, "reversed": BLOB[::-1],
                              "nested": [7, {"again": BLOB}]}

            # Publisher events, each in its namespace only (services.py: randomUpdate in both)
            await driver.wait_for(lambda m: m["ev"] == "event" and m["id"] == "a"
                                  and m["name"] == "binUpdate", "a binUpdate on /", count=3)
            await driver.wait_for(lambda m: m["ev"] == "event" and m["id"] == "b"
                                  and m["name"] == "rndTick", "a rndTick on /rnd", count=3)
            for sock in ("a", "b"):
                await driver.wait_for(lambda m: m["ev"] == "event" and m["id"] == sock
                                      and m["name"] == "randomUpdate", f"randomUpdate on {sock}")
            assert all(args == [{"ns": "default", "k": args[0]["k"], "bin": BLOB[:16]}]
                       for args in driver.events("a", "binUpdate"))
            assert all(isinstance(args[0]["val"], int) for sock in "ab"
                       for args in driver.events(sock, "randomUpdate"))
            assert driver.events("b", "binUpdate") == [] and driver.events("a", "rndTick") == [], \
                "events crossed namespaces"

            # an emit without an ack is published to the namespace's Subscribers (a
            # Subscriber finds Sockend's publisher by discovery: emit until it has)
            async def note_arrives():
                await driver.emit("a", "browserNote", {"from": "/", "bin": b"\x01\x02"}, ack=None)
                await driver.emit("b", "browserNote", {"from": "/rnd"}, ack=None)
                return notes0 and notes1
            await wait_until(note_arrives, "the mesh Subscribers receive the browsers' notes",
                             timeout=10, interval=0.2)
            assert ("browserNote", {"from": "/", "bin": b"\x01\x02"}) in notes0
            assert {d["from"] for _, d in notes0} == {"/"} and {d["from"] for _, d in notes1} == {"/rnd"}
            assert driver.events("a", "browserNote") == driver.events("b", "browserNote") == [], \
                "a browser's publish was echoed back to browsers"

            # the heartbeat keeps it up: idle for a few pings more, one engine session still
            await trio.sleep(1.0)
            assert not driver.where(lambda m: m["ev"] in ("disconnect", "connect_error")), \
                "the connection dropped while Sockend ran"
            assert len(driver.where(lambda m: m["ev"] == "open")) == 1

            # Sockend restarts on the same port: the client reconnects by itself
            mark = len(driver.seen)
            await h.kill(sockend)
            await driver.wait_for(lambda m: m["ev"] == "disconnect" and m["id"] == "a",
                                  "socket a sees Sockend go", since=mark)
            sockend, again = await h.sockend(*FAST_PINGS, port=port)
            assert again == port
            await driver.connected("a", since=mark, timeout=15)
            await driver.connected("b", since=mark, timeout=15)
            random_answer(await driver.answer("a", "randomRequest", {"val": 8}), "default", 8)
            random_answer(await driver.answer("b", "randomRequest", {"val": 9}), "rnd", 9)
            if transports:
                assert {m["transport"] for m in driver.where(lambda m: m["ev"] in ("open", "connect"))} \
                    == set(transports)
                assert not driver.where(lambda m: m["ev"] == "upgrade")
            await driver.wait_for(lambda m: m["ev"] == "event" and m["id"] == "b"
                                  and m["name"] == "rndTick", "events again after the restart", since=mark)
            await driver.send(op="exit")


@pytest.mark.e2e
async def test_node_client_with_node_style_acks(tmp_path):
    """``--ack node``: cote's ``ack(null, answer)`` and ``ack(error)``."""
    node_or_skip()
    with trio.fail_after(30):
        async with harness(tmp_path) as h:
            await h.services()
            _, port = await h.sockend("--ack", "node")
            driver = await h.node_driver()
            await driver.open("b", f"http://127.0.0.1:{port}/rnd", transports=["websocket"])
            await driver.connected("b")
            ok = await driver.emit("b", "randomRequest", {"val": 2}, ack="callback")
            assert ok["error"] is None and len(ok["args"]) == 2 and ok["args"][0] is None, ok
            random_answer(ok["args"][1], "rnd", 2)
            bad = await driver.emit("b", "randomRequest", {"val": []}, ack="callback")
            assert bad["error"] is None and len(bad["args"]) == 1, bad
            assert (bad["args"][0]["code"], bad["args"][0]["type"]) == ("handler", "ValueError"), bad
            await driver.send(op="exit")


# -- 2. python-socketio's client ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("transports", [None, ["websocket"]], ids=["polling-then-upgrade", "websocket"])
async def test_python_socketio_client_calls_receives_events_and_reconnects(tmp_path, transports):
    import socketio

    sio = socketio.Client(reconnection_delay=0.2, reconnection_delay_max=1, handle_sigint=False)
    lock = threading.Lock()
    events: dict[tuple[str, str], list] = {}
    connects: dict[str, int] = {"/": 0, "/rnd": 0}
    disconnects: list[str] = []

    def record(namespace: str, name: str):
        def handler(data=None):
            with lock:
                events.setdefault((namespace, name), []).append(data)
        return handler

    for ns in ("/", "/rnd"):
        sio.on("randomUpdate", record(ns, "randomUpdate"), namespace=ns)
        sio.on("binUpdate", record(ns, "binUpdate"), namespace=ns)

        def on_connect(ns=ns):
            with lock:
                connects[ns] += 1
        sio.on("connect", on_connect, namespace=ns)
        sio.on("disconnect", lambda *reason, ns=ns: disconnects.append(ns), namespace=ns)

    def got(ns: str, name: str) -> list:
        with lock:
            return list(events.get((ns, name), []))

    async def in_thread(fn, *args, **kwargs):
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), abandon_on_cancel=True)

    try:
        with trio.fail_after(40):
            async with harness(tmp_path) as h, echo_responder(h.disco), \
                    Publisher("test-pub", broadcasts=["binUpdate"], discovery=h.disco) as pub0:
                h.nursery.start_soon(publish_every, pub0, 0.1,
                                     lambda k: [("binUpdate", {"k": k, "bin": BLOB[:8]})])
                await h.services(interval=0.1)
                sockend, port = await h.sockend(*FAST_PINGS)
                await in_thread(sio.connect, f"http://127.0.0.1:{port}", namespaces=["/", "/rnd"],
                                transports=transports, wait_timeout=10)
                assert set(sio.namespaces) == {"/", "/rnd"}
                assert sio.transport() == "websocket"   # upgraded, or from the start

                # call() returns the ack's single argument
                random_answer(await in_thread(sio.call, "randomRequest", {"val": 1}, timeout=5),
                              "default", 1)
                random_answer(await in_thread(sio.call, "randomRequest", {"val": 2}, namespace="/rnd",
                                              timeout=5), "rnd", 2)
                failed = await in_thread(sio.call, "randomRequest", {"val": None}, namespace="/rnd",
                                         timeout=5)
                assert failed["error"]["code"] == "handler" and failed["error"]["type"] == "ValueError", failed
                echoed = await in_thread(sio.call, "binaryEcho", {"blob": BLOB, "n": 1}, timeout=5)
                assert echoed == {"got": "bytes", "echo": BLOB, "reversed": BLOB[::-1],
                                  "nested": [1, {"again": BLOB}]}

                # events through handlers, per namespace
                await wait_until(lambda: got("/", "randomUpdate") and got("/rnd", "randomUpdate")
                                 and len(got("/", "binUpdate")) >= 3, "events arrive in both namespaces")
                assert got("/rnd", "binUpdate") == [], "binUpdate (published in '') reached /rnd"
                assert all(d["bin"] == BLOB[:8] for d in got("/", "binUpdate"))

                # the heartbeat (FAST_PINGS) keeps the connection up
                await trio.sleep(1.0)
                assert disconnects == [] and connects == {"/": 1, "/rnd": 1}, (disconnects, connects)

                # Sockend restarts on the same port: python-socketio reconnects both namespaces
                before = dict(connects)
                await h.kill(sockend)
                sockend, again = await h.sockend(*FAST_PINGS, port=port)
                assert again == port
                await wait_until(lambda: all(connects[ns] > before[ns] for ns in connects),
                                 "python-socketio reconnects both namespaces", timeout=15)
                random_answer(await in_thread(sio.call, "randomRequest", {"val": 6}, namespace="/rnd",
                                              timeout=5), "rnd", 6)
                random_answer(await in_thread(sio.call, "randomRequest", {"val": 7}, timeout=5),
                              "default", 7)
                seen = len(got("/rnd", "randomUpdate"))
                await wait_until(lambda: len(got("/rnd", "randomUpdate")) > seen,
                                 "events again after the restart")
                await in_thread(sio.disconnect)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await trio.to_thread.run_sync(sio.disconnect, abandon_on_cancel=True)


# -- 3. the seed's page, verbatim, in headless Chromium ------------------------------------------


class PipeCdp:
    """The DevTools protocol over ``--remote-debugging-pipe`` (NUL-separated JSON): no
    port, so it reaches a Chromium inside another network namespace."""

    def __init__(self, to_chrome: trio.lowlevel.FdStream, from_chrome: trio.lowlevel.FdStream):
        self.to_chrome, self.from_chrome = to_chrome, from_chrome
        self.buf = b""
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    async def _next(self) -> dict:
        while b"\0" not in self.buf:
            chunk = await self.from_chrome.receive_some(1 << 20)
            if not chunk:
                raise AssertionError("chromium closed its DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    async def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        n = next(self.ids)
        msg: dict[str, Any] = {"id": n, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.to_chrome.send_all(json.dumps(msg).encode() + b"\0")
        while True:
            reply = await self._next()
            if reply.get("id") == n:
                assert "error" not in reply, (method, reply)
                return reply["result"]
            self.events.append(reply)

    async def next_event(self) -> dict:
        if self.events:
            return self.events.pop(0)
        return await self._next()


async def read_console(cdp: PipeCdp, session: str, lines: list, problems: list[str]) -> None:
    """The next event: a page's console.log(label, val, data) goes to ``lines``; an
    uncaught exception or any other console message to ``problems``."""
    event = await cdp.next_event()
    if event.get("sessionId") != session:
        return
    if event.get("method") == "Runtime.exceptionThrown":
        problems.append(json.dumps(event["params"]["exceptionDetails"])[:500])
    if event.get("method") != "Runtime.consoleAPICalled":
        return
    values = []
    for arg in event["params"]["args"]:
        if "objectId" in arg:   # an object: as JSON, exactly
            shown = await cdp.call("Runtime.callFunctionOn", {
                "functionDeclaration": "function () { return JSON.stringify(this); }",
                "objectId": arg["objectId"], "returnByValue": True}, session)
            values.append(json.loads(shown["result"]["value"]))
        else:
            values.append(arg.get("value"))
    if len(values) == 3 and values[0] in ("normal", "ns"):
        lines.append(tuple(values))
    else:
        problems.append(repr(values)[:300])


@pytest.mark.e2e
@pytest.mark.netns
async def test_the_seed_page_verbatim_in_headless_chromium_gets_answers_on_both_namespaces(tmp_path):
    """The seed's page, unchanged, through a Sockend restart; then the example's socket.io
    page, which also shows the Publishers' events."""
    from browser_support import FLAGS, chromium_or_skip
    from netns_support import lone_host, why_skip

    if reason := why_skip():
        pytest.skip(f"the seed's page connects to http://localhost (port 80): {reason}")
    chromium = chromium_or_skip("seed.html (socket.io)")
    socketio_client_or_skip()
    seed = (ROOT / "examples" / "sockend" / "seed.html").read_text()
    assert "io.connect('http://localhost')" in seed and "io.connect('http://localhost/rnd')" in seed

    lines: list[tuple[str, int, Any]] = []
    problems: list[str] = []
    with lone_host() as ns, trio.fail_after(75):
        async with harness(tmp_path) as h:
            netns = ("ip", "netns", "exec", ns)
            await h.services(*netns, interval=1.0)
            sockend, _ = await h.sockend(prefix=netns, port=80)

            # (bash: it moves the pipes to fds 3 and 4 whatever their numbers, dash cannot)
            to_r, to_w = os.pipe()       # commands: test -> chromium's fd 3
            from_r, from_w = os.pipe()   # replies and events: chromium's fd 4 -> test
            profile = tmp_path / "seed-profile"
            profile.mkdir()
            cdp = PipeCdp(trio.lowlevel.FdStream(to_w), trio.lowlevel.FdStream(from_r))
            try:
                chrome = await h.start(
                    "chromium", ["bash", "-c", f'exec "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-',
                                 "bash", *netns, chromium, *FLAGS, "--remote-debugging-pipe",
                                 f"--user-data-dir={profile}", "about:blank"],
                    marker=None, pass_fds=(to_r, from_w), start_new_session=True)
            except BaseException:
                await cdp.to_chrome.aclose()
                await cdp.from_chrome.aclose()
                raise
            finally:
                os.close(to_r)
                os.close(from_w)

            def enough() -> bool:   # two rounds of the page's 3 s interval
                return all(sum(1 for label, _, _ in lines if label == want) >= 2
                           for want in ("normal", "ns"))

            def what_happened() -> str:
                return (f"the seed page logged {lines}; problems: {problems}; "
                        f"chromium: {chrome.text()[-1500:]}")
            try:
                target = (await cdp.call("Target.createTarget", {"url": "about:blank"}))["targetId"]
                session = (await cdp.call("Target.attachToTarget",
                                          {"targetId": target, "flatten": True}))["sessionId"]
                await cdp.call("Runtime.enable", {}, session)
                await cdp.call("Page.navigate", {"url": "http://localhost/seed.html"}, session)
                with trio.move_on_after(20):
                    while not enough():
                        await read_console(cdp, session, lines, problems)
                assert enough(), what_happened()
                # Sockend restarts: the page's socket.io reconnects by itself, and what it
                # emitted meanwhile is answered once it is back.
                await h.kill(sockend)
                before = len(lines)
                await h.sockend(prefix=netns, port=80)

                def answered_again() -> bool:
                    return {label for label, _, _ in lines[before:]} == {"normal", "ns"}
                with trio.move_on_after(20):
                    while not answered_again():
                        await read_console(cdp, session, lines, problems)
                assert answered_again(), "after the restart: " + what_happened()
                # the socket.io page of the example: answers, and the Publishers' updates
                # on both namespaces
                page = (await cdp.call("Target.createTarget", {"url": "http://localhost/socketio.html"}))
                page_session = (await cdp.call("Target.attachToTarget",
                                               {"targetId": page["targetId"], "flatten": True}))["sessionId"]
                seen: dict = {}
                with trio.move_on_after(15):
                    while not all(seen.get(space, {}).get(k, 0) >= 1 for space in ("default", "rnd")
                                  for k in ("answers", "updates")):
                        shown = await cdp.call("Runtime.evaluate", {
                            "expression": "document.getElementById('state').textContent",
                            "returnByValue": True}, page_session)
                        text = shown["result"].get("value") or ""
                        seen = json.loads(text) if text.startswith("{") else {}
                        await trio.sleep(0.2)
                assert all(seen.get(space, {}).get(k, 0) >= 1 for space in ("default", "rnd")
                           for k in ("answers", "updates")), f"socketio.html shows {seen}"
            except (AssertionError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise AssertionError(what_happened()) from exc
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(chrome.process.pid, signal.SIGKILL)   # its helpers too
                await cdp.to_chrome.aclose()
                await cdp.from_chrome.aclose()
            assert enough(), what_happened()

    assert not problems, problems
    for label, namespace in (("normal", "default"), ("ns", "rnd")):
        answered = [(val, data) for lbl, val, data in lines if lbl == label]
        assert len(answered) >= 2
        for val, data in answered:
            assert isinstance(val, int) and 0 <= val < 10
            random_answer(data, namespace, val)


# -- 4. hooks and rooms, with the Node client --------------------------------------------------


@pytest.mark.e2e
async def test_bearer_hooks_and_rooms_with_the_node_client(tmp_path):
    node_or_skip()
    with trio.fail_after(40):
        async with harness(tmp_path) as h, echo_responder(h.disco), \
                Publisher("test-notices", broadcasts=["notice"], discovery=h.disco) as pub:
            h.nursery.start_soon(publish_every, pub, 0.1, lambda k: [
                ("notice", {"__room": "user:ann", "msg": "ann only", "k": k}),
                ("notice", {"__rooms": ["user:bob", "user:zed"], "msg": "bob and zed", "k": k}),
                ("notice", {"msg": "everyone", "k": k}),
            ])
            env = dict(h.env, SOCKEND_TOKENS="tok-ann=ann,tok-bob=bob,tok-root=root:admin")
            sockend, port = await h.sockend("--hooks", "examples/sockend/bearer_hooks.py:BearerHooks",
                                            env=env)
            driver = await h.node_driver()
            url = f"http://127.0.0.1:{port}/"
            base = {"forceNew": True, "reconnection": False}
            await driver.open("anon", url, **base)
            await driver.open("wrong", url, auth={"token": "tok-nobody"}, **base)
            await driver.open("ann", url, auth={"token": "tok-ann"}, **base)
            await driver.open("bob", url, extraHeaders={"Authorization": "Bearer tok-bob"}, **base)
            await driver.open("root", url, query={"token": "tok-root"}, transports=["websocket"], **base)

            # refused: a connect_error with the hook's message, and no connect
            for sock in ("anon", "wrong"):
                refused = await driver.wait_for(lambda m: m["ev"] == "connect_error" and m["id"] == sock,
                                                f"{sock} is refused")
                assert refused["message"] == "a valid bearer token is required", refused
            # accepted: by the auth payload, the Authorization header, the query
            for sock in ("ann", "bob", "root"):
                await driver.connected(sock)
            assert not driver.where(lambda m: m["ev"] == "connect" and m["id"] in ("anon", "wrong"))

            # requests carry the token's user, whatever the page said
            me = await driver.answer("ann", "whoami", {"user": "mallory", "x": 1})
            assert me == {"user": "ann", "x": 1, "type": "whoami"}
            assert (await driver.answer("bob", "whoami", {}))["user"] == "bob"
            refused = await driver.emit("ann", "adminReset", {"all": True}, ack="callback")
            assert refused["error"] is None and refused["args"][0]["error"]["code"] == "forbidden", refused
            assert "admins" in refused["args"][0]["error"]["message"]
            assert await driver.answer("root", "adminReset", {"all": True}) == \
                {"all": True, "type": "adminReset", "user": "root"}

            # rooms: __room/__rooms events reach their members only, the keys stripped.
            # The three notices are published in this order each round, by one Publisher:
            # once a browser has an "everyone" notice of round k+1, it would have had
            # round k's room notice too, were it for it.
            def everyone_after(sock: str, k: int) -> Callable[[dict], bool]:
                return lambda m: (m["ev"] == "event" and m["id"] == sock and m["name"] == "notice"
                                  and m["args"][0].get("msg") == "everyone" and m["args"][0]["k"] > k)
            for sock, mine in (("ann", "ann only"), ("bob", "bob and zed")):
                first = await driver.wait_for(
                    lambda m, sock=sock, mine=mine: m["ev"] == "event" and m["id"] == sock
                    and m["name"] == "notice" and m["args"][0].get("msg") == mine, f"{sock}'s room notice")
                await driver.wait_for(everyone_after(sock, first["args"][0]["k"] + 1),
                                      f"{sock} gets later notices")
            for sock in ("ann", "bob", "root"):
                await driver.wait_for(everyone_after(sock, 2), f"{sock} gets notices for everyone")
            got = {sock: [args[0] for args in driver.events(sock, "notice")] for sock in ("ann", "bob", "root")}
            assert {n["msg"] for n in got["ann"]} == {"ann only", "everyone"}, got["ann"][:6]
            assert {n["msg"] for n in got["bob"]} == {"bob and zed", "everyone"}, got["bob"][:6]
            assert {n["msg"] for n in got["root"]} == {"everyone"}, got["root"][:6]
            assert all(set(n) == {"msg", "k"} for notes in got.values() for n in notes), \
                "the __room/__rooms keys reached a browser"
            assert not driver.events("anon", "notice") and not driver.events("wrong", "notice")
            await driver.send(op="exit")
