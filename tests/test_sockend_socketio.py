"""Sockend's Socket.IO endpoint against the fake mesh, spoken to byte by byte: the
polling transport and its errors, the upgrade, acks (both styles), events, rooms,
hooks, limits, the client file.  (Real clients: test_sockend_socketio_clients.py.)"""
from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from sockend.hooks import BridgeHooks, Browser, Handshake
from sockend_support import FakeMesh, running
from support import wait_until
from transport.errors import Forbidden, HandlerError

pytestmark = pytest.mark.e2e


async def http(port: int, method: str, target: str, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        await stream.send_all(head.encode() + b"\r\n" + body)
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    parsed = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), parsed, payload


class PollingClient:
    """Engine.IO over long-polling, as the official client starts."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.port, self.headers, self.sid = port, headers or {}, ""
        self.open: dict[str, Any] = {}
        self.unread: list[str] = []     # packets of the last poll not looked at yet

    async def handshake(self) -> None:
        status, _, body = await http(self.port, "GET", "/socket.io/?EIO=4&transport=polling", headers=self.headers)
        assert status == 200 and body.startswith(b"0"), body
        self.open = json.loads(body[1:])
        self.sid = self.open["sid"]

    async def post(self, *packets: str) -> int:
        status, _, _ = await http(self.port, "POST", f"/socket.io/?EIO=4&transport=polling&sid={self.sid}",
                                  "\x1e".join(packets).encode(), self.headers)
        return status

    async def poll(self) -> list[str]:
        status, _, body = await http(self.port, "GET", f"/socket.io/?EIO=4&transport=polling&sid={self.sid}",
                                     headers=self.headers)
        assert status == 200, (status, body)
        return body.decode().split("\x1e")

    async def until(self, pred) -> str:
        """Poll (answering pings) until a packet satisfies ``pred``."""
        while True:
            if not self.unread:
                self.unread = await self.poll()
            packet = self.unread.pop(0)
            if packet == "2":
                await self.post("3")
            elif pred(packet):
                return packet


class WsClient:
    """Socket.IO over a websocket from the start."""

    def __init__(self, ws) -> None:
        self.ws = ws

    async def next(self, pred=lambda m: True) -> Any:
        while True:
            message = await self.ws.get_message()
            if message == "2":
                await self.ws.send_message("3")
            elif pred(message):
                return message

    async def join(self, nsp: str = "/", auth: dict | None = None) -> str:
        prefix = "" if nsp == "/" else nsp + ","
        await self.ws.send_message("40" + prefix + (json.dumps(auth) if auth else ""))
        return await self.next(lambda m: m.startswith(("40" + prefix, "44" + prefix)) and (
            nsp != "/" or not m.startswith("40/") and not m.startswith("44/")))

    async def call(self, nsp: str, ack_id: int, event: str, *args: Any) -> list[Any]:
        prefix = "" if nsp == "/" else nsp + ","
        await self.ws.send_message(f"42{prefix}{ack_id}" + json.dumps([event, *args]))
        reply = await self.next(lambda m: m.startswith(f"43{prefix}{ack_id}["))
        return json.loads(reply[len(f"43{prefix}{ack_id}"):])


async def ws_client(server, nursery=None):
    return open_websocket_url(f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket")


def mesh_with_echo() -> FakeMesh:
    mesh = FakeMesh()

    @mesh.on("", "echo")
    async def echo(req):
        return {"got": req}

    @mesh.on("rnd", "boom")
    async def boom(req):
        raise HandlerError("no", type="ValueError")   # what a Responder's ValueError becomes
    return mesh


async def test_polling_handshake_connect_request_and_event_then_upgrade():
    mesh = mesh_with_echo()
    async with running(mesh, ping_interval=5, ping_timeout=5) as server:
        with trio.fail_after(20):
            c = PollingClient(server.port)
            await c.handshake()
            assert c.open["upgrades"] == ["websocket"] and c.open["pingInterval"] == 5000
            assert c.open["maxPayload"] == 64 * 1024
            assert await c.post("40") == 200
            assert json.loads((await c.until(lambda p: p.startswith("40")))[2:])["sid"]
            await c.post('421["echo",{"a":1}]')
            ack = await c.until(lambda p: p.startswith("431"))
            assert json.loads(ack[3:]) == [{"got": {"a": 1, "type": "echo"}}]
            await wait_until(lambda: mesh.channels.get(""), "the namespace's link")
            mesh.publish("", "tick", {"n": 1, "blob": b"\x00\x01"})
            assert await c.until(lambda p: p.startswith("451-")) == \
                '451-["tick",{"n":1,"blob":{"_placeholder":true,"num":0}}]'
            assert await c.until(lambda p: p.startswith("b")) == "bAAE="   # base64 of 00 01
            # the upgrade: probe on a websocket, the poll is released, then "5"
            async with open_websocket_url(f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4"
                                          f"&transport=websocket&sid={c.sid}") as ws:
                async with trio.open_nursery() as nursery:
                    released = trio.Event()

                    async def pending_poll():
                        assert "6" in await c.poll()
                        released.set()
                    nursery.start_soon(pending_poll)
                    await ws.send_message("2probe")
                    assert await ws.get_message() == "3probe"
                    await released.wait()
                with pytest.raises(ConnectionRejected) as second:   # one websocket at a time
                    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4"
                                                  f"&transport=websocket&sid={c.sid}"):
                        pass
                assert second.value.status_code == 400
                await ws.send_message("5")
                w = WsClient(ws)
                reply = await w.call("/", 7, "echo", {"b": 2})
                assert reply == [{"got": {"b": 2, "type": "echo"}}]
                status, _, body = await http(server.port, "GET",
                                             f"/socket.io/?EIO=4&transport=polling&sid={c.sid}")
                assert status == 400   # no polling once upgraded
            await wait_until(lambda: not server.socketio.sessions, "the session ends with its websocket")
            assert server.clients == 0


async def test_engine_io_errors_are_its_codes():
    async with running(FakeMesh()) as server:
        with trio.fail_after(10):
            for target, method, code in [
                    ("/socket.io/?EIO=3&transport=polling", "GET", 5),
                    ("/socket.io/?EIO=4&transport=carrier-pigeon", "GET", 0),
                    ("/socket.io/?EIO=4&transport=polling&sid=nope", "GET", 1),
                    ("/socket.io/?EIO=4&transport=polling", "POST", 2)]:
                status, headers, body = await http(server.port, method, target)
                assert (status, json.loads(body)["code"]) == (400, code), (target, body)
            c = PollingClient(server.port)
            await c.handshake()
            assert await c.post("not a packet") == 400
            status, _, body = await http(server.port, "GET",
                                         f"/socket.io/?EIO=4&transport=polling&sid={c.sid}")
            assert status == 400 and json.loads(body)["code"] == 1   # that ended the session


async def test_two_polls_at_once_end_the_session_and_a_big_post_is_refused():
    async with running(FakeMesh(), max_message_size=1000) as server:
        with trio.fail_after(10):
            c = PollingClient(server.port)
            await c.handshake()
            async with trio.open_nursery() as nursery:
                first: list[list[str]] = []
                nursery.start_soon(lambda: _append(first, c.poll()))
                await wait_until(lambda: server.socketio.sessions[c.sid].polling, "the first poll waits")
                status, _, _ = await http(server.port, "GET", f"/socket.io/?EIO=4&transport=polling&sid={c.sid}")
                assert status == 400
            assert first == [["1"]]   # the waiting poll learns the session closed
            c2 = PollingClient(server.port)
            await c2.handshake()
            assert await c2.post("4" + "x" * 2000) == 413


async def _append(out, awaitable):
    out.append(await awaitable)


async def test_a_page_of_another_origin_is_refused_and_an_allowed_one_gets_cors():
    async with running(FakeMesh(), allowed_origins=("https://app.example",)) as server:
        with trio.fail_after(10):
            status, _, body = await http(server.port, "GET", "/socket.io/?EIO=4&transport=polling",
                                         headers={"Origin": "https://evil.example"})
            assert status == 403 and b"not allowed" in body
            status, headers, _ = await http(server.port, "GET", "/socket.io/?EIO=4&transport=polling",
                                            headers={"Origin": "https://app.example"})
            assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
            assert headers["access-control-allow-credentials"] == "true"
            status, headers, _ = await http(server.port, "OPTIONS", "/socket.io/?EIO=4&transport=polling",
                                            headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Headers": "authorization"})
            assert status == 204 and "POST" in headers["access-control-allow-methods"]


async def test_acks_carry_the_answer_or_the_error_in_either_style():
    for style, ok, failed in [("answer", [{"got": {"type": "echo"}}], lambda a: a[0]["error"]),
                              ("node", [None, {"got": {"type": "echo"}}], lambda a: a[0])]:
        async with running(mesh_with_echo(), ack_style=style) as server:
            with trio.fail_after(10):
                async with await ws_client(server) as ws:
                    w = WsClient(ws)
                    assert (await ws.get_message()).startswith("0{")
                    assert (await w.join("/")).startswith("40{")
                    assert (await w.join("/rnd")).startswith("40/rnd,{")
                    assert await w.call("/", 1, "echo") == ok
                    error = failed(await w.call("/rnd", 2, "boom", {}))
                    assert error["code"] == "handler" and error["type"] == "ValueError"
                    bad = failed(await w.call("/", 3, "echo", "not an object"))
                    assert bad["code"] == "bad-message"
                    gone = failed(await w.call("/rnd", 4, "boom", {}, {}))
                    assert gone["code"] == "bad-message" and "one argument" in gone["message"]


async def test_an_emit_without_ack_is_published_and_types_are_answered():
    mesh = mesh_with_echo()
    async with running(mesh) as server:
        with trio.fail_after(10):
            async with await ws_client(server) as ws:
                w = WsClient(ws)
                await ws.get_message()
                await w.join("/")
                await ws.send_message('42["chat",{"text":"hi"}]')
                await wait_until(lambda: mesh.published, "the browser's event is published")
                assert mesh.published == [("", "chat", {"text": "hi"})]
                assert await w.call("/", 1, "echo") == [{"got": {"type": "echo"}}]
                assert await w.call("/", 2, "echo", None) == [{"got": {"type": "echo"}}]
                await ws.send_message('42["$types"]')          # (no ack: published as is)
                await ws.send_message('423["$types"]')
                assert json.loads((await w.next(lambda m: m.startswith("433")))[3:]) == [["echo"]]


class RoomHooks(BridgeHooks):
    """Token in the auth payload or the query; each user in room user:NAME."""

    def __init__(self) -> None:
        self.seen: list[Handshake] = []

    async def authenticate(self, handshake: Handshake) -> str:
        self.seen.append(handshake)
        token = (handshake.auth or {}).get("token") or handshake.query.get("token")
        if token not in ("ann", "bob"):
            raise Forbidden("a valid token is required", data={"hint": "ann or bob"})
        return token

    def joined(self, browser: Browser) -> None:
        browser.join(f"user:{browser.identity}")

    def transform(self, request: dict, browser: Browser) -> dict:
        if request["type"] == "echo" and request.get("admin"):
            raise Forbidden("not for you")
        return {**request, "user": browser.identity}


async def test_hooks_refuse_attach_identity_join_rooms_for_both_protocols():
    mesh = mesh_with_echo()
    hooks = RoomHooks()
    async with running(mesh, hooks) as server:
        with trio.fail_after(15):
            async with await ws_client(server) as ws_none, await ws_client(server) as ws_ann, \
                    await ws_client(server) as ws_bob, \
                    open_websocket_url(f"ws://127.0.0.1:{server.port}/?token=bob",
                                       extra_headers=[(b"Cookie", b"session=s1")]) as own_bob:
                refused = await _joined(ws_none, None)
                assert refused.startswith("44{") and json.loads(refused[2:]) == {
                    "message": "a valid token is required", "data": {"hint": "ann or bob"}}
                assert (await _joined(ws_ann, {"token": "ann"})).startswith("40{")
                assert (await _joined(ws_bob, {"token": "bob"})).startswith("40{")
                own = [h for h in hooks.seen if h.protocol == "sockend"]
                assert len(own) == 1 and own[0].cookies == {"session": "s1"} and own[0].query["token"] == "bob"
                assert {h.auth["token"] for h in hooks.seen if h.auth} == {"ann", "bob"}
                ann, bob = WsClient(ws_ann), WsClient(ws_bob)
                assert await ann.call("/", 1, "echo", {"x": 1}) == [{"got": {"x": 1, "type": "echo", "user": "ann"}}]
                denied = (await bob.call("/", 2, "echo", {"admin": True}))[0]["error"]
                assert denied["code"] == "forbidden" and denied["message"] == "not for you"
                await wait_until(lambda: len(server.hubs[""].clients) == 3, "three browsers in")
                mesh.publish("", "note", {"__room": "user:ann", "text": "for ann"})
                mesh.publish("", "note", {"__rooms": ["user:bob", "user:cid"], "text": "for bob"})
                mesh.publish("", "note", {"text": "for all"})
                got_ann = [json.loads((await ann.next(lambda m: m.startswith("42")))[2:]) for _ in range(2)]
                got_bob = [json.loads((await bob.next(lambda m: m.startswith("42")))[2:]) for _ in range(2)]
                got_own = [json.loads(await own_bob.get_message()) for _ in range(2)]
                assert got_ann == [["note", {"text": "for ann"}], ["note", {"text": "for all"}]]
                assert got_bob == [["note", {"text": "for bob"}], ["note", {"text": "for all"}]]
                assert [e["data"]["text"] for e in got_own] == ["for bob", "for all"]
            with pytest.raises(Exception) as refused_own:
                async with open_websocket_url(f"ws://127.0.0.1:{server.port}/?token=eve"):
                    pass
            assert "403" in str(refused_own.value) or "a valid token" in str(refused_own.value)


async def _joined(ws, auth) -> str:
    assert (await ws.get_message()).startswith("0{")
    return await WsClient(ws).join("/", auth)


async def test_requests_in_flight_per_connection_are_bounded():
    mesh = FakeMesh()
    release = trio.Event()

    @mesh.on("", "slow")
    async def slow(req):
        await release.wait()
        return "done"
    async with running(mesh, max_inflight=2) as server:
        with trio.fail_after(10):
            async with await ws_client(server) as ws:
                w = WsClient(ws)
                await ws.get_message()
                await w.join("/")
                for i in (1, 2, 3):
                    await ws.send_message(f'42{i}["slow"]')
                full = await w.next(lambda m: m.startswith("433"))
                assert json.loads(full[3:])[0]["error"]["code"] == "queue-full"
                release.set()
                assert {await w.next(lambda m: m.startswith("43")) for _ in range(2)} == \
                    {'431["done"]', '432["done"]'}


async def test_a_protocol_violation_ends_only_that_connection():
    async with running(mesh_with_echo()) as server:
        with trio.fail_after(10):
            async with await ws_client(server) as good, await ws_client(server) as bad:
                await good.get_message()
                await bad.get_message()
                await WsClient(good).join("/")
                await bad.send_message('42/rnd,["echo"]')      # a namespace it never joined
                with pytest.raises(ConnectionClosed):
                    while True:
                        await bad.get_message()
                assert await WsClient(good).call("/", 1, "echo") == [{"got": {"type": "echo"}}]
            assert server.stats["sio_protocol_errors"] == 1


async def test_the_client_file_is_served_from_the_configured_package_or_explained(tmp_path):
    dist = tmp_path / "socket.io-client" / "dist"
    dist.mkdir(parents=True)
    (dist / "socket.io.js").write_text("/* the client */")
    async with running(FakeMesh(), socketio_client=tmp_path / "socket.io-client") as server:
        with trio.fail_after(10):
            status, headers, body = await http(server.port, "GET", "/socket.io/socket.io.js")
            assert status == 200 and body == b"/* the client */"
            assert headers["content-type"].startswith("text/javascript")
            status, _, _ = await http(server.port, "GET", "/socket.io/socket.io.min.js")
            assert status == 404
    async with running(FakeMesh(), socketio_client=tmp_path / "nothing-here", static_dir=tmp_path) as server:
        if server.socketio.client_dist is None:   # (unless one is installed above tmp or the cwd)
            status, _, body = await http(server.port, "GET", "/socket.io/socket.io.js")
            assert status == 404 and b"npm install socket.io-client" in body


async def test_a_session_that_joins_no_namespace_in_time_ends():
    async with running(FakeMesh(), handshake_timeout=0.3) as server:
        with trio.fail_after(10):
            c = PollingClient(server.port)
            await c.handshake()
            assert await c.poll() == ["1"]          # the poll waits, then learns it closed
            await wait_until(lambda: not server.socketio.sessions, "the session is gone")
            assert server.stats["sio_connect_timeouts"] == 1


def test_hooks_load_from_a_file_or_a_module_and_bad_specs_say_why(monkeypatch):
    from sockend.hooks import load_hooks
    monkeypatch.setenv("SOCKEND_TOKENS", "t1=ann:admin")
    hooks = load_hooks("examples/sockend/bearer_hooks.py:BearerHooks")   # a dataclass inside
    assert hooks.tokens["t1"].admin
    for spec, why in [("nocolon", "expected"), ("no/such.py:X", "no file"),
                      ("examples/sockend/bearer_hooks.py:Nope", "has no Nope"),
                      ("examples/sockend/bearer_hooks.py:User", "not a BridgeHooks")]:
        with pytest.raises(ValueError, match=why):
            load_hooks(spec)


async def test_a_namespace_joined_twice_ends_the_session_and_leaks_no_browser():
    gate = trio.Event()

    class SlowAuth(BridgeHooks):
        async def authenticate(self, handshake):
            await gate.wait()
    async with running(mesh_with_echo(), SlowAuth()) as server:
        with trio.fail_after(10):
            async with await ws_client(server) as ws:
                await ws.get_message()
                await ws.send_message("40")
                await ws.send_message("40")      # again, while the first is being authenticated
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            gate.set()
            await wait_until(lambda: not server.socketio.sessions and server.clients == 0,
                             "the session is gone and nothing is counted")
            assert all(not hub.clients for hub in server.hubs.values())
            assert server.stats["sio_protocol_errors"] == 1
