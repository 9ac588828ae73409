"""Sockend's plain-HTTP side, read by real HTTP clients: h11 in the client role for the
pure exchange, urllib against a running server."""
from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import h11
import pytest
import trio

from sockend import Sockend, SockendConfig
from sockend.http import MAX_HEAD, HeadError, HttpExchange

EXPECTED_HEADERS = {"content-type", "content-length", "connection", "cache-control", "x-content-type-options"}


def request_bytes(method: str, target: str, *extra: tuple[str, str]) -> tuple[h11.Connection, bytes]:
    """A client connection that sent this request, and the bytes it sent."""
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=method, target=target, headers=[("Host", "x"), *extra]))
    data += client.send(h11.EndOfMessage())
    return client, data


def read_response(client: h11.Connection, data: bytes) -> tuple[h11.Response, dict[str, str], bytes]:
    """Parse a whole response as a client would; fails if bytes are left over."""
    client.receive_data(data)
    client.receive_data(b"")   # the server closes after every response
    response = client.next_event()
    assert isinstance(response, h11.Response), response
    body = b""
    while isinstance(event := client.next_event(), h11.Data):
        body += event.data
    assert isinstance(event, h11.EndOfMessage), event
    assert isinstance(client.next_event(), h11.ConnectionClosed)   # nothing after the response
    headers = {name.decode().lower(): value.decode() for name, value in response.headers}
    return response, headers, body


def exchange(raw: bytes) -> tuple[HttpExchange, object]:
    http = HttpExchange()
    head = http.receive(raw)
    return http, head


def test_a_request_head_split_anywhere_reads_the_same():
    _, raw = request_bytes("GET", "/a?b=1", ("X-Twice", "1"), ("X-Twice", "2"))
    whole = HttpExchange().receive(raw)
    assert whole is not None and (whole.method, whole.target) == ("GET", "/a?b=1")
    assert whole.headers["x-twice"] == "1, 2" and whole.raw == raw and not whole.is_websocket
    for cut in range(1, len(raw)):
        http = HttpExchange()
        assert http.receive(raw[:cut]) is None
        assert http.receive(raw[cut:]) == whole


def test_responses_are_framed_by_h11_for_a_real_client():
    client, raw = request_bytes("GET", "/")
    http, head = exchange(raw)
    assert head is not None
    response, headers, body = read_response(client, http.response(200, b"<h1>hi</h1>", "text/html; charset=utf-8"))
    assert (response.status_code, response.reason, response.http_version) == (200, b"OK", b"1.1")
    assert set(headers) == EXPECTED_HEADERS and body == b"<h1>hi</h1>"
    assert headers["content-type"] == "text/html; charset=utf-8" and headers["content-length"] == "11"
    assert headers["connection"] == "close" and headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"


def test_a_head_request_gets_the_length_but_no_body():
    client, raw = request_bytes("HEAD", "/")
    http, _ = exchange(raw)
    response, headers, body = read_response(client, http.response(404, b"not found\n"))
    assert response.status_code == 404 and headers["content-length"] == "10" and body == b""


def test_the_head_is_the_same_whether_or_not_the_client_asked_to_close():
    heads = []
    for extra in ([], [("Connection", "close")]):
        client, raw = request_bytes("GET", "/", *extra)
        http, _ = exchange(raw)
        heads.append(http.response(200, b"x").split(b"\r\n\r\n")[0])
    assert heads[0] == heads[1]


@pytest.mark.parametrize("garbage", [b"\x16\x03\x01garbage\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000])
def test_a_bad_or_oversized_head_gets_a_400_a_client_can_read(garbage):
    http = HttpExchange()
    with pytest.raises(HeadError) as caught:
        for i in range(0, len(garbage), 4096):
            assert http.receive(garbage[i:i + 4096]) is None
    assert len(garbage) > MAX_HEAD or "bad request head" in str(caught.value)
    client, _ = request_bytes("GET", "/")  # what a client thinks it sent
    response, headers, body = read_response(client, http.response(400, f"{caught.value}\n".encode()))
    assert (response.status_code, response.reason) == (400, b"Bad Request")
    assert body == f"{caught.value}\n".encode() and headers["content-length"] == str(len(body))


def test_a_refused_websocket_upgrade_is_a_plain_response():
    client, raw = request_bytes("GET", "/a/b", ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                ("Sec-WebSocket-Version", "13"))
    http, head = exchange(raw)
    assert head is not None and head.is_websocket
    response, _, body = read_response(client, http.response(503, b"too many clients\n"))
    assert (response.status_code, response.reason, body) == (503, b"Service Unavailable", b"too many clients\n")


# -- a running server, a stdlib client ---------------------------------------------------

class NoMesh:
    """Plain HTTP never reaches the mesh."""


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


@pytest.mark.e2e   # a server on loopback
async def test_static_files_errors_and_bad_requests_through_real_clients(tmp_path: Path):
    (tmp_path / "index.html").write_text("<h1>hello</h1>")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(Sockend(NoMesh(), SockendConfig(port=0, static_dir=tmp_path)).run)
            base = f"http://127.0.0.1:{server.port}"

            async def get(path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
                return await trio.to_thread.run_sync(fetch, base + path, method)

            status, headers, body = await get("/")
            assert (status, body) == (200, b"<h1>hello</h1>") and set(headers) == EXPECTED_HEADERS
            assert headers["content-type"] == "text/html; charset=utf-8"
            status, headers, body = await get("/sockend.js")
            assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
            assert int(headers["content-length"]) == len(body) and b"SockendError" in body
            status, headers, body = await get("/", "HEAD")
            assert (status, headers["content-length"], body) == (200, "14", b"")
            assert await get("/missing") == (404, headers | {"content-type": "text/plain; charset=utf-8",
                                                              "content-length": "10"}, b"not found\n")
            status, _, body = await get("/", "POST")
            assert (status, body) == (405, b"only GET and HEAD\n")

            client, _ = request_bytes("GET", "/")
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"\x16\x03\x01garbage\r\n\r\n")
                reply = b""
                while chunk := await stream.receive_some(65536):
                    reply += chunk
            response, _, body = read_response(client, reply)
            assert response.status_code == 400 and body.startswith(b"bad request head")
            assert server.stats["http_200"] == 3 and server.stats["http_404"] == 1
            assert server.stats["http_405"] == 1 and server.stats["bad_http"] == 1
            nursery.cancel_scope.cancel()
