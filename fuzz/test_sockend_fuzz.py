"""Fuzz everything Sockend reads from a browser (or whoever pretends to be one): its
websocket frames (sockend/protocol.py), the HTTP request head and static paths
(sockend/http.py), the page's Origin (sockend/origin.py).

Properties:

- ``parse_request`` of any text (or bytes) returns a request or an upload chunk, or
  raises ``BadFrame`` (a ``bad-message`` error, carrying the request's id only when the
  frame had a valid one); a valid frame reads back as what was written;
- the frames Sockend writes back (answers, errors, events, credit) are JSON for any
  value a handler may return, or an error frame saying why not; never an exception;
- a namespace path is a namespace or ``BadPath``;
- any bytes, cut anywhere, make a request head, "read more", or ``HeadError``, within
  the head's size bound; after a ``HeadError`` the 400 can still be written;
- a static path resolves to a file inside the directory with no dot segment (no
  ``/.env``, no symlink to a dotfile or out of the folder), or to nothing;
- the origin check answers (accept, or the reason to refuse) for any Origin and Host,
  accepts the same origin and the allowed ones, never ``null``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import example, given, strategies as st

from sockend.http import MAX_HEAD, HeadError, HttpExchange, RequestHead, resolve_static
from sockend.origin import OriginPolicy, parse_origin
from sockend.protocol import (BadFrame, BadPath, ClientChunk, ClientRequest, credit_frame, error_frame,
                              event_frame, namespace_from_path, ok_frame, parse_request)
from transport.errors import BadMessage, RemoteError

KEYS = st.sampled_from(["id", "type", "data", "timeout", "chunked", "chunk", "end", "x"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | st.text(max_size=4), inner, max_size=4),
    max_leaves=10,
)
ids = st.integers(-2**53 + 1, 2**53 - 1) | st.text(min_size=1, max_size=128)


def valid_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and -2**53 < value < 2**53) \
        or (isinstance(value, str) and 0 < len(value) <= 128)


# -- websocket frames -------------------------------------------------------------------------

@given(st.one_of(st.text(max_size=60), json_values.map(json.dumps),
                 st.dictionaries(KEYS, json_values | ids, max_size=6).map(json.dumps),
                 st.binary(max_size=20)))
@example("[" * 100_000)                                   # deeper than the JSON parser goes
@example('{"id": 1, "type": "t", "timeout": NaN}')        # not JSON, though Python reads it
@example('{"id": 1, "type": "t", "timeout": 1e999}')      # infinity spelled as a number: capped
@example('{"id": 9007199254740993, "type": "t"}')         # an id a browser cannot hold exactly
def test_any_frame_is_a_request_or_a_bad_frame(text):
    try:
        frame = parse_request(text)
    except BadFrame as bad:
        assert isinstance(bad.error, BadMessage) and bad.error.code == "bad-message"
        if bad.id is not None:
            obj = json.loads(text)
            assert isinstance(obj, dict) and bad.id == obj["id"] and valid_id(bad.id)
        return
    obj = json.loads(text)
    assert valid_id(frame.id) and frame.id == obj["id"]
    if isinstance(frame, ClientRequest):
        assert isinstance(frame.type, str) and 0 < len(frame.type) <= 256 and isinstance(frame.data, dict)
        # (1e999 reads as infinity: "wait as long as allowed", the server caps it)
        assert frame.timeout is None or frame.timeout > 0
        assert set(obj) <= {"id", "type", "data", "timeout", "chunked"}
    else:
        assert isinstance(frame, ClientChunk) and (frame.end or "chunk" in obj)


@given(ids, st.text(min_size=1, max_size=256), st.dictionaries(st.text(max_size=5), json_values, max_size=3),
       st.none() | st.floats(0.001, 1e6), st.booleans())
def test_a_valid_request_reads_back_as_written(rid, rtype, data, timeout, chunked):
    obj = {"id": rid, "type": rtype, "data": data, "chunked": chunked}
    if timeout is not None:
        obj["timeout"] = timeout
    assert parse_request(json.dumps(obj)) == ClientRequest(rid, rtype, data, timeout, chunked)


@given(ids, json_values, st.booleans())
def test_an_upload_chunk_reads_back_as_written(rid, value, end):
    frame = {"id": rid, "end": True} if end else {"id": rid, "chunk": value}
    assert parse_request(json.dumps(frame)) == ClientChunk(rid, None if end else value, end)


class _Opaque:
    pass


answers = st.recursive(
    json_values | st.binary(max_size=4) | st.sampled_from([math.nan, math.inf]) | st.builds(_Opaque)
    | st.integers(min_value=2**64) | st.sets(st.integers(0, 3), max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3) | st.integers(), inner,
                                                               max_size=3) | st.tuples(inner),
    max_leaves=8,
)


@given(ids, answers, st.text(max_size=10))
def test_every_frame_sockend_writes_is_json(rid, value, event):
    answer = json.loads(ok_frame(rid, value))
    assert answer["id"] == rid and (answer["ok"] is True or answer["error"]["type"] == "Unserializable")
    error = json.loads(error_frame(rid, RemoteError(str(value)[:50])))
    assert error["ok"] is False and error["error"]["code"] == "error"
    pushed = event_frame(event, value)
    assert pushed is None or json.loads(pushed)["event"] == event
    assert json.loads(credit_frame(rid, 16)) == {"id": rid, "credit": 16}


def test_an_answer_nested_deeper_than_json_goes_is_an_error_frame():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json.loads(ok_frame(1, deep))["error"]["type"] == "Unserializable"
    assert event_frame("e", deep) is None


@given(st.text(max_size=80) | st.sampled_from(["/", "/rnd", "/rnd/?EIO=4", "/../x", "//", "/a#b"]))
def test_a_path_is_a_namespace_or_bad_path(path):
    try:
        name = namespace_from_path(path)
    except BadPath:
        return
    assert name == "" or (1 <= len(name) <= 64 and "/" not in name)


# -- the HTTP request head ----------------------------------------------------------------------

@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


heads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, t, hs, tail: f"{m} {t} HTTP/1.1\r\n".encode() + b"".join(hs) + tail,
              st.sampled_from(["GET", "HEAD", "POST", "G\x00T", ""]),
              st.sampled_from(["/", "/x?y", "*", "", "http://h/", "/" + "a" * 9000]),
              st.lists(st.sampled_from([b"Host: h\r\n", b"Upgrade: websocket\r\n", b"X: \xff\r\n",
                                        b"Bad header\r\n", b"Content-Length: 5\r\n",
                                        b"Transfer-Encoding: chunked\r\n", b"H: " + b"v" * 5000 + b"\r\n"]),
                       max_size=5),
              st.sampled_from([b"\r\n", b"", b"\r\nbody", b"\n", b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"])),
)


@given(st.data(), heads)
def test_any_bytes_make_a_head_or_a_head_error_within_the_bound(data, raw):
    exchange = HttpExchange()
    read = 0
    try:
        for piece in data.draw(cut(raw)):
            read += len(piece)
            head = exchange.receive(piece)
            assert read <= MAX_HEAD + 4096, "a head past the size bound was still read"
            if head is not None:
                assert isinstance(head, RequestHead) and head.method and raw.startswith(head.raw)
                break
    except HeadError:
        pass
    assert exchange.response(400, b"bad").startswith(b"HTTP/1.1 400 ")


# -- static files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzzsite")
    www = root / "www"
    (www / "sub").mkdir(parents=True)
    (www / ".git").mkdir()
    for name in ("index.html", "a.js", "sub/b.txt", ".env", ".git/config", "sub/.secret"):
        (www / name).write_text(name)
    (root / "outside.txt").write_text("outside")
    (www / "out").symlink_to(root / "outside.txt")
    (www / "env").symlink_to(www / ".env")
    (www / "gitdir").symlink_to(www / ".git")
    (www / "loop").symlink_to(www / "loop")
    return www


segments = st.sampled_from(["", ".", "..", ".env", ".git", "config", "index.html", "a.js", "sub", "b.txt",
                            ".secret", "out", "env", "gitdir", "loop", "%2e%2e", "%2e", "..%2f", "%00",
                            "a%00b", "\x00", "~", "x" * 300, "%2fetc", "sockend.js"])


@given(st.lists(segments, max_size=5).map("/".join).map(lambda p: "/" + p) | st.text(max_size=40),
       st.sampled_from(["", "?x=1", "#f", "?/../.env"]))
@example("/.env", "")
@example("/env", "")            # a visible name linked to a dotfile
@example("/gitdir/config", "")  # ... into a dot folder
@example("/out", "")            # ... out of the folder
@example("/%2e%2e/outside.txt", "")
def test_a_static_path_is_a_visible_file_inside_the_folder_or_nothing(site, path, query):
    found = resolve_static(path + query, site)
    if found is None or found.name == "sockend.js":
        return
    base = site.resolve()
    assert found.is_file() and found.is_relative_to(base), f"{path!r} served {found}"
    assert not any(part.startswith(".") for part in found.relative_to(base).parts), f"{path!r} served {found}"


# -- the Origin check ------------------------------------------------------------------------------

hosts = st.sampled_from(["localhost", "app.example.com", "127.0.0.1", "[::1]", "[0:0::1]", "EXAMPLE.com"])
ports = st.none() | st.integers(0, 70_000)
schemes = st.sampled_from(["http", "https", "HTTP", "ws", "file", "chrome-extension"])


def origin_text(scheme: str, host: str, port: int | None) -> str:
    return f"{scheme}://{host}" + (f":{port}" if port is not None else "")


origins = st.one_of(st.builds(origin_text, schemes, hosts, ports), st.text(max_size=40),
                    st.sampled_from(["null", "", "http://", "http://h:", "http://h/p", "http://u@h",
                                     "http://[::1", "http://h:99999"]))


@given(st.lists(st.sampled_from(["https://app.example.com", "http://localhost:8080", "*"]), max_size=2),
       st.none() | origins, st.none() | st.builds(lambda h, p: h + (f":{p}" if p is not None else ""), hosts, ports)
       | st.text(max_size=30))
def test_the_origin_check_answers_for_any_origin_and_host(allowed, origin, host):
    policy = OriginPolicy(tuple(allowed))
    reason = policy.refusal(origin, host)
    assert reason is None or (isinstance(reason, str) and reason)
    if origin is None or "*" in allowed:
        assert reason is None
    elif origin.strip().lower() == "null":
        assert reason is not None, "a null origin was let in"
    if reason is None and origin is not None and "*" not in allowed:
        parsed = parse_origin(origin)   # what was let in is an origin: allowed, or the host's
        assert str(parsed) in policy.allowed or host is not None


@given(st.sampled_from(["http", "https"]), hosts, ports)
def test_the_same_origin_is_let_in_and_an_other_host_is_not(scheme, host, port):
    policy = OriginPolicy(())
    origin = origin_text(scheme, host, port)
    host_header = host + (f":{port}" if port is not None else "")
    if port is not None and port > 65535:
        assert policy.refusal(origin, host_header) is not None
        return
    assert policy.refusal(origin, host_header) is None
    assert policy.refusal(origin, "evil.example" + (f":{port}" if port is not None else "")) is not None


@given(origins)
def test_an_origin_parses_to_its_normal_form_or_a_value_error(text):
    try:
        origin = parse_origin(text)
    except ValueError:
        return
    assert parse_origin(str(origin)) == origin and str(parse_origin(str(origin))) == str(origin)
