"""Sockend: the wire format (pure), the server against an in-test fake mesh (limits,
malformed input, slow browsers, static files), the server against the real mesh on
loopback, and one real browser (headless Chromium, skipped when absent)."""
from __future__ import annotations

import json
import socket
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings, strategies as st
from trio_websocket import (ConnectionClosed, ConnectionRejected, HandshakeError,
                            open_websocket_url, wrap_client_stream)

from sockend import EventOutbox, TransportMesh
from sockend.http import resolve_static
from sockend.protocol import (SKIPPED_EVENT, BadFrame, BadPath, ClientChunk, namespace_from_path,
                              parse_request)
from sockend_support import FakeMesh, running
from support import free_udp_port, wait_until
from transport import HandlerError, Publisher, Responder

# -- pure: the wire format -------------------------------------------------------------


def test_parse_request_accepts_the_documented_shape():
    r = parse_request('{"id": 7, "type": "randomRequest", "data": {"val": 3}, "timeout": 2}')
    assert (r.id, r.type, r.data, r.timeout) == (7, "randomRequest", {"val": 3}, 2.0)
    r = parse_request('{"id": "a", "type": "t"}')
    assert (r.id, r.data, r.timeout, r.chunked) == ("a", {}, None, False)
    # an upload: the request, its chunks, its end
    assert parse_request('{"id": 3, "type": "up", "chunked": true}').chunked is True
    assert parse_request('{"id": 3, "chunk": {"any": ["json"]}}') == ClientChunk(3, {"any": ["json"]})
    assert parse_request('{"id": 3, "end": true}') == ClientChunk(3, end=True)


@pytest.mark.parametrize("frame, rid", [
    ("nope", None), ("[1]", None), ('{"type": "t"}', None), ('{"id": true, "type": "t"}', None),
    ('{"id": 1}', 1), ('{"id": 1, "type": ""}', 1), ('{"id": 1, "type": "t", "data": 5}', 1),
    ('{"id": 1, "type": "t", "timeout": -1}', 1), ('{"id": 1, "type": "t", "x": 0}', 1),
    ('{"id": 1, "type": "t", "chunked": 1}', 1), ('{"id": 1, "chunk": 1, "end": true}', 1),
    ('{"id": 1, "end": false}', 1), ('{"chunk": 1}', None),
    ('{"id": 1, "type": "t", "data": {"v": NaN}}', None), (b'{"id": 1, "type": "t"}', None),
    ("[" * 100_000, None),
])
def test_parse_request_rejects_with_the_id_when_known(frame, rid):
    with pytest.raises(BadFrame) as info:
        parse_request(frame)
    assert info.value.id == rid
    assert info.value.error.code == "bad-message"


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), json_values.map(json.dumps),
                 st.dictionaries(st.sampled_from(["id", "type", "data", "timeout", "x", "chunk",
                                                  "end", "chunked"]),
                                 json_values).map(json.dumps)))
def test_parse_request_raises_only_badframe(text):
    try:
        r = parse_request(text)
    except BadFrame:
        return
    if isinstance(r, ClientChunk):   # e.g. '{"chunk": null, "id": 0}': a chunk of an upload
        assert isinstance(r.id, (int, str)) and (r.end or "chunk" in json.loads(text))
        return
    assert isinstance(r.type, str) and r.type and isinstance(r.data, dict)


def test_namespace_from_path():
    assert namespace_from_path("/") == ""
    assert namespace_from_path("/rnd") == "rnd"
    assert namespace_from_path("/rnd/?EIO=4") == "rnd"
    for bad in ("rnd", "/a/b", "/../x", "/" + "x" * 65, "/a b"):
        with pytest.raises(BadPath):
            namespace_from_path(bad)


def test_event_outbox_skips_reports_the_gap_in_place_and_evicts_a_stalled_browser():
    box = EventOutbox(limit=2, max_skipped=3)
    assert [box.push(f"e{i}") for i in range(5)] == ["queued", "queued", "skipped", "skipped", "skipped"]
    assert box.push("e5") == "evict"          # 4 in a row without a single read
    assert box.pop() == "e0"
    assert box.push("e6") == "queued"         # room again: the gap is reported before e6
    assert [box.pop(), json.loads(box.pop()), box.pop(), box.pop()] == \
        ["e1", {"event": SKIPPED_EVENT, "data": {"count": 4}}, "e6", None]
    assert box.skipped_total == 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=200), st.integers(1, 5))
def test_event_outbox_keeps_order_and_accounts_for_every_event(ops, limit):
    box, pushed, seen, reported = EventOutbox(limit=limit, max_skipped=10**9), 0, [], 0
    for push in ops + [False] * (2 * len(ops) + 2):
        if push:
            box.push(str(pushed))
            pushed += 1
        elif (frame := box.pop()) is not None:
            if frame.startswith("{"):
                reported += json.loads(frame)["data"]["count"]
            else:
                seen.append(int(frame))
    assert seen == sorted(seen) and len(seen) + reported == pushed == len(seen) + box.skipped_total


def test_static_paths_never_leave_the_directory(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hi")
    (tmp_path / "secret.txt").write_text("no")
    (site / "link").symlink_to(tmp_path / "secret.txt")
    assert resolve_static("/", site) == (site / "index.html").resolve()
    assert resolve_static("/sockend.js", None).name == "sockend.js"
    for bad in ("/../secret.txt", "/%2e%2e/secret.txt", "/link", "/..%2fsecret.txt", "//etc/passwd"):
        assert resolve_static(bad, site) is None, bad
    assert resolve_static("/index.html", None) is None


# -- the server against a fake mesh ------------------------------------------------------------

def url(server, path="/"):
    return f"ws://127.0.0.1:{server.port}{path}"


async def ask(ws, frame):
    """Send one request frame; return its answer (events in between are skipped)."""
    await ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))
    while True:
        msg = json.loads(await ws.get_message())
        if "event" not in msg:
            return msg


@pytest.mark.e2e
async def test_malformed_frames_get_typed_errors_and_the_connection_stays_usable():
    mesh = FakeMesh()

    @mesh.on("", "echo")
    async def echo(req):
        return req

    with trio.fail_after(20):
        async with running(mesh) as server, open_websocket_url(url(server)) as ws:
            for frame in ("not json", "[1]", '{"id": 1}', '{"id": 2, "type": "t", "data": 5}'):
                answer = await ask(ws, frame)
                assert answer["ok"] is False and answer["error"]["code"] == "bad-message"
            assert answer["id"] == 2
            await ws.send_message(b'{"id": 3, "type": "echo"}')
            binary = json.loads(await ws.get_message())
            assert binary["id"] is None and "text frames" in binary["error"]["message"]
            assert (await ask(ws, {"id": 4, "type": "echo", "data": {"v": 1}})) == \
                {"id": 4, "ok": True, "data": {"v": 1, "type": "echo"}}
            assert server.stats["malformed"] == 5 and server.stats["answered"] == 1


@pytest.mark.e2e
async def test_limits_message_size_clients_and_requests_in_flight():
    mesh = FakeMesh()
    release = trio.Event()

    @mesh.on("", "block")
    async def block(req):
        await release.wait()
        return "done"

    with trio.fail_after(20):
        async with running(mesh, max_clients=2, max_inflight=2, max_message_size=1024) as server:
            async with open_websocket_url(url(server)) as ws, open_websocket_url(url(server)):
                with pytest.raises((ConnectionRejected, HandshakeError)):
                    async with open_websocket_url(url(server)):
                        pass
                for i in (1, 2):
                    await ws.send_message(json.dumps({"id": i, "type": "block"}))
                await wait_until(lambda: server.stats["requests"] == 2, "both requests are in flight")
                refused = await ask(ws, {"id": 3, "type": "block"})
                assert refused["error"]["code"] == "queue-full"
                release.set()
                answers = [json.loads(await ws.get_message()) for _ in range(2)]
                assert sorted(a["id"] for a in answers) == [1, 2] and all(a["ok"] for a in answers)
                await ws.send_message("x" * 4096)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert info.value.reason.code == 1009
            await wait_until(lambda: server.stats["too_big"] == 1 and server.clients == 0,
                             "the oversized message closes its client")
            async with open_websocket_url(url(server)) as ws:   # the server is fine
                assert (await ask(ws, {"id": 1, "type": "$types"}))["data"] == ["block"]


async def open_slow_client(nursery, server, path="/"):
    """A websocket client with a tiny receive buffer that never reads."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    return await wrap_client_stream(nursery, trio.SocketStream(sock), "127.0.0.1", path,
                                    message_queue_size=1)


@pytest.mark.e2e
async def test_a_stalled_browser_is_evicted_and_never_holds_back_the_others():
    mesh = FakeMesh()
    payload = "x" * 65536
    n_events = 300
    with trio.fail_after(50):
        async with running(mesh, event_buffer=8, max_skipped=40) as server, \
                trio.open_nursery() as nursery, AsyncExitStack() as stack:
            slow = await open_slow_client(nursery, server)
            fast = [await stack.enter_async_context(open_websocket_url(url(server)))
                    for _ in range(3)]
            await wait_until(lambda: "" in server.hubs and len(server.hubs[""].clients) == 4,
                             "the four browsers have joined the hub")
            await server.hubs[""].ready.wait()
            received = [[] for _ in fast]
            for seq in range(n_events):
                mesh.publish("", "tick", {"seq": seq, "pad": payload})
                for i, ws in enumerate(fast):   # lock-step: the fast ones keep up
                    msg = json.loads(await ws.get_message())
                    received[i].append(msg["data"]["seq"])
            assert all(r == list(range(n_events)) for r in received)
            assert server.stats["evicted"] == 1
            assert server.stats["events_skipped"] > 40
            await wait_until(lambda: len(server.hubs[""].clients) == 3, "the stalled one is gone")
            await slow.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.e2e
async def test_static_files_and_bad_http_on_the_websocket_port(tmp_path):
    (tmp_path / "index.html").write_text("<h1>hello</h1>")

    async def http(server, raw: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(raw)
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
            return out

    with trio.fail_after(20):
        async with running(FakeMesh(), static_dir=tmp_path) as server:
            page = await http(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert page.startswith(b"HTTP/1.1 200") and page.endswith(b"<h1>hello</h1>")
            js = await http(server, b"GET /sockend.js HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"text/javascript" in js and b"SockendError" in js
            assert (await http(server, b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")
                    ).startswith(b"HTTP/1.1 404")
            assert (await http(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                    ).startswith(b"HTTP/1.1 405")
            assert (await http(server, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
            assert (await http(server, b"GET /a/b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                       b"Connection: Upgrade\r\n\r\n")).startswith(b"HTTP/1.1 404")


@pytest.mark.e2e
async def test_a_namespace_link_opens_with_its_first_browser_and_closes_after_the_last():
    mesh = FakeMesh()
    with trio.fail_after(20):
        async with running(mesh, linger=0.2) as server:
            async with open_websocket_url(url(server, "/rnd")) as a, \
                    open_websocket_url(url(server, "/rnd")):
                await ask(a, {"id": 1, "type": "$types"})
                assert mesh.opened["rnd"] == 1 and mesh.closed["rnd"] == 0
            await wait_until(lambda: mesh.closed["rnd"] == 1 and "rnd" not in server.hubs,
                             "the link closes after the linger")
            async with open_websocket_url(url(server, "/rnd")) as a:
                await ask(a, {"id": 1, "type": "$types"})
                assert mesh.opened["rnd"] == 2


@pytest.mark.e2e
async def test_a_failed_mesh_link_closes_its_browsers_with_1011_and_recovers():
    mesh = FakeMesh()
    mesh.broken = True
    with trio.fail_after(20):
        async with running(mesh) as server:
            async with open_websocket_url(url(server, "/rnd")) as ws:
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert info.value.reason.code == 1011
            mesh.broken = False
            async with open_websocket_url(url(server, "/rnd")) as ws:
                assert (await ask(ws, {"id": 1, "type": "$types"}))["ok"] is True


# -- the server against the real mesh on loopback ----------------------------------------------

def random_responder(disco, namespace, tag):
    rep = Responder(f"rep-{tag}", namespace=namespace, responds_to=["randomRequest"], discovery=disco)

    @rep.on("randomRequest")
    async def answer(req):
        if req.get("val") == -1:
            raise ValueError("negative")
        return {"by": tag, "double": req["val"] * 2}
    return rep


@pytest.mark.e2e
async def test_requests_reach_responders_of_the_connection_namespace_only(disco):
    mesh = TransportMesh(discovery=disco)
    with trio.fail_after(40):
        async with random_responder(disco, "", "default"), random_responder(disco, "rnd", "rnd"), \
                running(mesh) as server, open_websocket_url(url(server)) as ws0, \
                open_websocket_url(url(server, "/rnd")) as ws1:
            a0 = await ask(ws0, {"id": 1, "type": "randomRequest", "data": {"val": 3}})
            a1 = await ask(ws1, {"id": 1, "type": "randomRequest", "data": {"val": 4}})
            assert a0 == {"id": 1, "ok": True, "data": {"by": "default", "double": 6}}
            assert a1 == {"id": 1, "ok": True, "data": {"by": "rnd", "double": 8}}
            err = await ask(ws1, {"id": 2, "type": "randomRequest", "data": {"val": -1}})
            assert err["ok"] is False and err["error"]["code"] == HandlerError.code
            assert err["error"]["type"] == "ValueError" and "negative" in err["error"]["message"]
            types = await ask(ws1, {"id": 3, "type": "$types"})
            assert types["data"] == ["randomRequest"]


@pytest.mark.e2e
async def test_a_browser_uploads_chunks_to_a_responder_under_its_credit(disco):
    rep = Responder("rep-up", namespace="up", responds_to=["upload"], discovery=disco)
    held: list[int] = []

    @rep.on("upload")
    async def upload(req, chunks):
        got = []
        async for chunk in chunks:
            held.append(len(chunks._items))
            got.append(chunk)
            await trio.sleep(0.001)
        return {"name": req["name"], "chunks": len(got), "last": got[-1] if got else None}

    with trio.fail_after(40):
        async with rep, running(TransportMesh(discovery=disco)) as server, \
                open_websocket_url(url(server, "/up")) as ws:
            async def upload_found():
                return (await ask(ws, {"id": 0, "type": "$types"}))["data"] == ["upload"]
            await wait_until(upload_found, "the upload responder is found", timeout=20,
                             interval=0.05)
            await ws.send_message(json.dumps({"id": 1, "type": "upload", "data": {"name": "n"},
                                              "chunked": True}))
            window, sent, answer = 64, 0, None
            while answer is None:   # a browser that keeps to its credit, as sockend.js does
                while window and sent < 300:
                    await ws.send_message(json.dumps({"id": 1, "chunk": {"i": sent}}))
                    sent, window = sent + 1, window - 1
                    if sent == 300:
                        await ws.send_message(json.dumps({"id": 1, "end": True}))
                msg = json.loads(await ws.get_message())
                if "credit" in msg:
                    window += msg["credit"]
                elif msg.get("id") == 1:
                    answer = msg
            assert answer == {"id": 1, "ok": True,
                              "data": {"name": "n", "chunks": 300, "last": {"i": 299}}}
            assert max(held) <= 64
            bad = await ask(ws, {"id": 2, "chunk": 1, "type": "x"})
            assert bad["ok"] is False and bad["error"]["code"] == "bad-message"


@pytest.mark.e2e
async def test_a_request_nobody_serves_fails_with_a_timeout_error(disco):
    with trio.fail_after(30):
        async with random_responder(disco, "other", "other"), \
                running(TransportMesh(discovery=disco)) as server, \
                open_websocket_url(url(server, "/rnd")) as ws:
            t0 = trio.current_time()
            err = await ask(ws, {"id": 9, "type": "randomRequest", "data": {"val": 1}, "timeout": 0.5})
            assert err["id"] == 9 and err["ok"] is False and err["error"]["code"] == "timeout"
            assert err["error"]["retryable"] is True
            assert trio.current_time() - t0 > 0.4   # never before the timeout asked for


@pytest.mark.e2e
async def test_publisher_events_fan_out_to_every_browser_of_its_namespace_only(disco):
    n_clients = 20
    with trio.fail_after(50):
        async with Publisher("pub", namespace="rnd", broadcasts=["randomUpdate"],
                             discovery=disco) as pub, \
                running(TransportMesh(discovery=disco)) as server, AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(open_websocket_url(url(server, "/rnd")))
                       for _ in range(n_clients)]
            outsider = await stack.enter_async_context(open_websocket_url(url(server, "/")))
            got = [[] for _ in clients]

            async def collect(i, ws):
                while len(got[i]) < 20:
                    msg = json.loads(await ws.get_message())
                    assert msg["event"] == "randomUpdate"
                    got[i].append(msg["data"]["seq"])

            async with trio.open_nursery() as readers:
                for i, ws in enumerate(clients):
                    readers.start_soon(collect, i, ws)
                seq = 0
                while not all(len(g) >= 20 for g in got):   # the subscriber may join late
                    pub.publish("randomUpdate", {"seq": seq})
                    seq += 1
                    await trio.sleep(0.02)   # a live publisher's pace, in real time
            for g in got:   # each browser saw a contiguous run, in order
                assert g == list(range(g[0], g[0] + 20))
            # The outsider's own namespace delivers to it, and that comes first: a 'rnd'
            # event leaking to it would have been on its way since the 20 above.
            async with Publisher("pub0", broadcasts=["marker"], discovery=disco) as pub0, \
                    trio.open_nursery() as marking:
                async def mark():
                    while True:
                        pub0.publish("marker", {"n": 1})
                        await trio.sleep(0.02)   # until its subscriber has joined
                marking.start_soon(mark)
                first = json.loads(await outsider.get_message())
                marking.cancel_scope.cancel()
            assert first["event"] == "marker", f"the default namespace got: {first}"


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
async def test_the_example_runs_as_processes_python_m_sockend_and_services(tmp_path):
    import os
    import sys
    env = dict(os.environ, MESH_PORT=str(free_udp_port()), MESH_INTERFACE="127.0.0.1",
               PYTHONUNBUFFERED="1")
    procs = []

    async def start(*args):
        proc = await trio.lowlevel.open_process([sys.executable, *args], cwd=ROOT, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    async def first_line(proc, marker):
        seen = b""
        while marker.encode() not in seen:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, f"process exited: {seen.decode(errors='replace')[-2000:]}"
            seen += chunk
        return seen.decode()

    try:
        with trio.fail_after(45):
            services = await start("examples/sockend/services.py", "--interval", "0.1")
            await first_line(services, "services ready")
            sockend = await start("-m", "sockend", "--port", "0", "--static", "examples/sockend")
            line = await first_line(sockend, "sockend listening on")
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                page = b""
                while chunk := await stream.receive_some(65536):
                    page += chunk
            assert page.startswith(b"HTTP/1.1 200") and b'Sockend.connect("/rnd")' in page
            async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws0, \
                    open_websocket_url(f"ws://127.0.0.1:{port}/rnd") as ws1:
                a0 = await ask(ws0, {"id": 1, "type": "randomRequest", "data": {"val": 5}})
                a1 = await ask(ws1, {"id": 1, "type": "randomRequest", "data": {"val": 6}})
                assert a0["data"]["namespace"] == "default" and a0["data"]["val"] == 5
                assert a1["data"]["namespace"] == "rnd" and a1["data"]["val"] == 6
                bad = await ask(ws1, {"id": 2, "type": "randomRequest", "data": {"val": "x"}})
                assert bad["error"]["type"] == "ValueError"
                while True:
                    msg = json.loads(await ws1.get_message())
                    if msg.get("event") == "randomUpdate":
                        break
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                proc.terminate()
            for proc in procs:
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


# -- one real browser ---------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0"]


def chromium_or_skip() -> str:
    import shutil
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on PATH: apt-get install -y chromium (Debian) to run the browser test")


async def run_page(chromium, page_url, tmp_path, expression, *, until, timeout):
    """Open ``page_url`` in headless Chromium and poll ``expression`` over the DevTools
    protocol until ``until(value)``; returns the value.  Chromium is killed in any case."""
    import os
    import signal
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log = open(tmp_path / "chromium.log", "wb")
    proc = await trio.lowlevel.open_process(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log, stderr=log, start_new_session=True)
    try:
        with trio.fail_after(timeout):
            port_file = profile / "DevToolsActivePort"

            def devtools_port_written():
                if proc.poll() is not None:
                    pytest.fail(f"chromium exited: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
                return port_file.exists() and len(port_file.read_text().split()) >= 2
            await wait_until(devtools_port_written, "chromium writes its DevTools port",
                             timeout=timeout, interval=0.05)
            port, path = port_file.read_text().split()[:2]
            async with open_websocket_url(f"ws://127.0.0.1:{port}{path}") as cdp:
                ids = iter(range(1, 10**6))

                async def call(method, params, session=None):
                    n = next(ids)
                    msg = {"id": n, "method": method, "params": params}
                    if session:
                        msg["sessionId"] = session
                    await cdp.send_message(json.dumps(msg))
                    while True:
                        reply = json.loads(await cdp.get_message())
                        if reply.get("id") == n:
                            assert "error" not in reply, reply
                            return reply["result"]

                target = (await call("Target.createTarget", {"url": page_url}))["targetId"]
                session = (await call("Target.attachToTarget",
                                      {"targetId": target, "flatten": True}))["sessionId"]
                async def shown():
                    result = await call("Runtime.evaluate",
                                        {"expression": expression, "returnByValue": True}, session)
                    value = result.get("result", {}).get("value")
                    return value if isinstance(value, str) and until(value) else None
                return await wait_until(shown, "the page shows what was awaited",
                                        timeout=timeout, interval=0.1)
    finally:
        with trio.CancelScope(shield=True):
            # TERM first so chromium reaps its own helpers; then KILL its whole group.
            proc.terminate()
            with trio.move_on_after(5):
                await proc.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            log.close()


@pytest.mark.e2e
async def test_headless_chromium_requests_and_receives_events_through_sockend_js(disco, tmp_path):
    chromium = chromium_or_skip()
    (tmp_path / "index.html").write_text(PAGE)
    with trio.fail_after(55):
        async with random_responder(disco, "rnd", "rnd"), upload_responder(disco, "rnd"), \
                Publisher("pub", namespace="rnd", broadcasts=["randomUpdate"], discovery=disco) as pub, \
                running(TransportMesh(discovery=disco), static_dir=tmp_path) as server:
            async def keep_publishing():
                while True:
                    pub.publish("randomUpdate", {"val": 42})
                    await trio.sleep(0.1)   # a live publisher's pace, in real time
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_publishing)
                text = await run_page(chromium, f"http://127.0.0.1:{server.port}/", tmp_path,
                                      "document.getElementById('out').textContent",
                                      until=lambda t: t.count(";") >= 4, timeout=40)
                nursery.cancel_scope.cancel()
    answer, failure, update, uploaded = text.split(";")[:4]
    assert json.loads(answer) == {"by": "rnd", "double": 6}
    assert json.loads(failure) == {"code": "handler", "type": "ValueError"}
    assert json.loads(update) == {"val": 42}
    assert json.loads(uploaded) == {"chunks": 200, "sum": sum(range(200))}  # 200 > the window


def upload_responder(disco, namespace):
    rep = Responder("rep-upload", namespace=namespace, responds_to=["upload"], discovery=disco)

    @rep.on("upload")
    async def upload(req, chunks):
        got = [chunk async for chunk in chunks]
        return {"chunks": len(got), "sum": sum(got)}
    return rep


PAGE = """<!doctype html><html><body><pre id="out"></pre>
<script src="/sockend.js"></script>
<script>
  const out = document.getElementById("out");
  const s = Sockend.connect("/rnd");
  let parts = ["", "", "", ""];
  const show = () => { if (parts.every(p => p)) out.textContent = parts.join(";") + ";"; };
  s.emit("randomRequest", {val: 3}).then(a => { parts[0] = JSON.stringify(a); show(); });
  s.emit("randomRequest", {val: -1}, (err, a) => {
    parts[1] = JSON.stringify({code: err.code, type: err.type}); show(); });
  s.on("randomUpdate", d => { parts[2] = JSON.stringify(d); show(); });
  async function* numbers(n) { for (let i = 0; i < n; i++) yield i; }
  const tryUpload = () => s.upload("upload", {}, numbers(200))
    .then(a => { parts[3] = JSON.stringify(a); show(); },
          e => setTimeout(tryUpload, 200));   // until connected and the Responder is found
  s.on("connect", tryUpload);
</script></body></html>
"""
