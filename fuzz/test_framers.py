"""Every incremental decoder in src/, fed its input cut at arbitrary points: however
the bytes arrive (one read, or one per byte, or anything between), it decodes to the
same frames as when they arrive at once.  A stream's reads are cut wherever the kernel
likes, so a decoder that depends on where is a bug that shows only under load.

The decoders: :func:`transport.streams.cut_frames` (the engine's length-prefixed
frames), :class:`transport.streams.FramedStream`'s reads, the raw-socket driver's
``LengthPrefixedFramer`` and ``LineFramer``, sockend's request-head reader, a slave's
output-line splitter (its crashlog), and frames of envelopes however an outbox batches
them (``join_frame`` / ``decode``).

Over a limit, a decoder must fail wherever the input is cut; the frames it hands out
before failing are then the ones before the oversized frame or fewer (those completed
in the same read as the bad length are dropped with the connection).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import trio
from hypothesis import given, settings, strategies as st

from engine.drivers.raw_socket import (FrameTooLarge, LengthPrefixedFramer, LineFramer, encode_frame_reply,
                                       encode_line_reply)
from engine.manifest import EngineConfig
from engine.pool.slave import SlaveProcess
from sockend.http import HttpExchange, RequestHead
from transport.codec import Envelope, decode, encode, encode_envelope, join_frame, unpack
from transport.errors import Closed, CodecError, RemoteError
from transport.streams import FramedStream, cut_frames, frame_header

FRAMES = st.lists(st.binary(max_size=40), max_size=8)


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` in pieces, cut at any points (empty pieces included: a read may bring 0)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def framed(frames: list[bytes]) -> bytes:
    return b"".join(frame_header(len(f)) + f for f in frames)


def feed_all(feed: Callable[[bytes], list[bytes]], pieces: list[bytes]) -> tuple[list[bytes], Exception | None]:
    """The frames a decoder hands out for ``pieces`` in turn, and what it raised, if it did."""
    out: list[bytes] = []
    for piece in pieces:
        try:
            out += feed(piece)
        except Exception as exc:  # noqa: BLE001  the caller checks which
            return out, exc
    return out, None


def oversized(draw: st.DrawFn, limit: int) -> tuple[list[bytes], int]:
    """Frames within ``limit`` with one over it somewhere: (frames, its index)."""
    frames = draw(st.lists(st.binary(max_size=limit), max_size=5))
    at = draw(st.integers(0, len(frames)))
    frames.insert(at, draw(st.binary(min_size=limit + 1, max_size=limit + 20)))
    return frames, at


# -- transport.streams.cut_frames -------------------------------------------------------------

@given(st.data(), FRAMES, st.lists(st.integers(0, 3), min_size=1))
def test_cut_frames_decodes_any_split_to_the_same_frames(data, frames, limits):
    pieces = data.draw(cut(framed(frames)))
    buffer = bytearray()
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        buffer += piece
        out += cut_frames(buffer, limit=limits[i % len(limits)])  # limit: at most that many a call
    while more := cut_frames(buffer):
        out += more
    assert out == frames and not buffer


@given(st.data())
def test_cut_frames_fails_on_a_length_over_the_limit_wherever_it_is_cut(data):
    frames, at = oversized(data.draw, 16)
    buffer = bytearray()

    def feed(piece: bytes) -> list[bytes]:
        buffer.extend(piece)
        return cut_frames(buffer, 16)

    out, error = feed_all(feed, data.draw(cut(framed(frames))))
    assert isinstance(error, CodecError) and f"frame of {len(frames[at])} bytes" in str(error)
    assert out == frames[:len(out)] and len(out) <= at


# -- transport.streams.FramedStream ------------------------------------------------------------

class _Pieces(trio.abc.Stream):
    """A stream (not a socket, so FramedStream reads it through trio's generic
    methods) whose reads bring the given pieces, then the end of the stream."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [p for p in pieces if p]  # b"" would mean the end

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""

    async def send_all(self, data: Any) -> None:
        raise AssertionError("not written to")

    async def wait_send_all_might_not_block(self) -> None:
        raise AssertionError("not written to")

    async def aclose(self) -> None:
        pass


@settings(deadline=None)
@given(st.data(), FRAMES, st.booleans())
def test_framed_stream_reads_any_split_as_the_same_frames(data, frames, one_at_a_time):
    stream = FramedStream(_Pieces(data.draw(cut(framed(frames)))))

    async def read_all() -> list[bytes]:
        out: list[bytes] = []
        while True:
            try:
                if one_at_a_time:
                    out.append(await stream.recv())
                else:
                    out += await stream.recv_many()
            except Closed:
                return out

    assert trio.run(read_all) == frames


# -- engine.drivers.raw_socket ---------------------------------------------------------------

class _LengthPrefixedBefore:
    """LengthPrefixedFramer as it was before it used cut_frames: the reference its
    behaviour must not leave, limits and errors included."""

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            size = int.from_bytes(self.buffer[:4], "big")
            if size > self.max_frame:
                raise FrameTooLarge(f"frame of {size} bytes exceeds {self.max_frame}")
            if len(self.buffer) < 4 + size:
                break
            frames.append(bytes(self.buffer[4:4 + size]))
            del self.buffer[:4 + size]
        return frames


@given(st.data(), FRAMES)
def test_length_prefixed_framer_decodes_any_split_to_the_same_frames(data, frames):
    framer = LengthPrefixedFramer(64)
    assert feed_all(framer.feed, data.draw(cut(framed(frames)))) == (frames, None)
    assert not framer.buffer


@given(st.data(), st.binary(max_size=120), st.integers(0, 40))
def test_length_prefixed_framer_behaves_as_it_did_for_any_bytes(data, raw, limit):
    """Garbage included: the same frames, and FrameTooLarge at the same read."""
    pieces = data.draw(cut(raw))
    now, before = LengthPrefixedFramer(limit), _LengthPrefixedBefore(limit)
    for piece in pieces:
        try:
            expected: list[bytes] | type[Exception] = before.feed(piece)
        except FrameTooLarge:
            expected = FrameTooLarge
        try:
            got: list[bytes] | type[Exception] = now.feed(piece)
        except FrameTooLarge as exc:
            got = FrameTooLarge
            assert "exceeds" in str(exc) and str(limit) in str(exc)
        assert got == expected
        if expected is FrameTooLarge:
            return  # the reader answers the error and closes the connection
        assert now.buffer == before.buffer


@given(st.data())
def test_length_prefixed_framer_fails_over_its_limit_wherever_it_is_cut(data):
    frames, at = oversized(data.draw, 16)
    out, error = feed_all(LengthPrefixedFramer(16).feed, data.draw(cut(framed(frames))))
    assert isinstance(error, FrameTooLarge)
    assert out == frames[:len(out)] and len(out) <= at


LINES = st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=8)


@given(st.data(), LINES, st.lists(st.booleans(), min_size=1))
def test_line_framer_decodes_any_split_to_the_same_lines(data, lines, crlf):
    """Lines up to its limit, ``\\n`` or ``\\r\\n`` ended, in any pieces.  (A line of
    exactly the limit, whose ``\\r`` came in one read and ``\\n`` in the next, was
    once refused as too long.)"""
    lines = [line.rstrip(b"\r") for line in lines]
    ends = [b"\r\n" if crlf[i % len(crlf)] else b"\n" for i in range(len(lines))]
    raw = b"".join(line + end for line, end in zip(lines, ends))
    framer = LineFramer(12)
    assert feed_all(framer.feed, data.draw(cut(raw))) == (lines, None)
    assert not framer.buffer


def test_line_framer_takes_a_line_of_its_limit_whose_crlf_is_cut_in_two():
    framer = LineFramer(4)
    assert framer.feed(b"abcd\r") == []
    assert framer.feed(b"\nef") == [b"abcd"]
    with pytest.raises(FrameTooLarge):
        LineFramer(4).feed(b"abcde")
    with pytest.raises(FrameTooLarge):
        LineFramer(4).feed(b"abcd\rx")


@given(st.data())
def test_line_framer_fails_on_a_line_over_its_limit_wherever_it_is_cut(data):
    lines = data.draw(st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r")),
                               max_size=4))
    at = data.draw(st.integers(0, len(lines)))
    lines.insert(at, data.draw(st.binary(min_size=9, max_size=30).map(lambda b: b.replace(b"\n", b"x"))))
    out, error = feed_all(LineFramer(8).feed, data.draw(cut(b"".join(line + b"\n" for line in lines))))
    assert isinstance(error, FrameTooLarge)
    assert out == lines[:len(out)] and len(out) <= at


# -- raw-socket: what a framer may hold, and the replies it writes -------------------------------

@given(st.data(), st.binary(max_size=200), st.integers(1, 40), st.sampled_from([LineFramer, LengthPrefixedFramer]))
def test_a_raw_socket_framer_never_holds_more_than_one_frame(data, raw, limit, framer_class):
    """Bounded memory per connection: whatever a client sends, a framer holds at most
    one unfinished frame of its limit (plus its length, or a line's ``\r``) before it
    either cuts a frame or fails with FrameTooLarge (and the connection is closed)."""
    framer = framer_class(limit)
    for piece in data.draw(cut(raw)):
        try:
            framer.feed(piece)
        except FrameTooLarge:
            return
        assert len(framer.buffer) <= limit + 4


REPLY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
) | st.integers(min_value=2**64) | st.builds(object)
ERRORS = st.builds(lambda code, message: type("E", (RemoteError,), {"code": code})(message),
                   st.sampled_from(["handler", "queue-full", "x\ny"]), st.text(max_size=20))


@given(st.one_of(REPLY_VALUES.map(lambda v: (v, None)), ERRORS.map(lambda e: (None, e))))
def test_a_line_reply_is_one_line_the_client_reads_back(reply):
    """Whatever a handler returns or raises, a line-framed client gets exactly one line
    for it (a reply with a newline inside would answer the next request too)."""
    value, error = reply
    line = encode_line_reply(value, error)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    [got] = LineFramer(len(line)).feed(line)
    if error is not None:
        assert got.startswith(f"ERROR {error.code}: ".replace("\n", " ").encode())
    elif isinstance(value, str) and "\n" not in value:
        assert got == value.encode().removesuffix(b"\r")   # (the framer drops a CR before the LF)


@given(st.one_of(REPLY_VALUES.map(lambda v: (v, None)), ERRORS.map(lambda e: (None, e))))
def test_a_frame_reply_is_one_frame_the_client_reads_back(reply):
    value, error = reply
    wire = encode_frame_reply(value, error)
    [frame] = LengthPrefixedFramer(len(wire)).feed(wire)
    tag, body = frame[0], frame[1:]
    if error is not None:
        assert tag == 2 and body.decode().startswith(f"{error.code}: ")
    elif isinstance(value, (bytes, str)):
        assert tag == 0 and body == (value if isinstance(value, bytes) else value.encode())
    elif tag == 1:
        assert unpack(body) == value
    else:   # a value msgpack cannot carry: its caller is told so
        assert tag == 2 and body.startswith(b"bad-message: ")


# -- sockend.http: the request head -----------------------------------------------------------

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10)
HEADER_VALUE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=/.", max_size=20).map(str.strip)


def head_of(pieces: list[bytes]) -> RequestHead | None:
    exchange = HttpExchange()
    for piece in pieces:
        if piece:  # a read brings at least one byte (b"" is the end of the stream)
            head = exchange.receive(piece)
            if head is not None:
                return head
    return None


@given(st.data(), st.sampled_from(["GET", "HEAD"]), st.lists(TOKEN, max_size=3),
       st.lists(st.tuples(TOKEN, HEADER_VALUE), max_size=6), st.binary(max_size=30))
def test_http_exchange_reads_any_split_as_the_same_head(data, method, path, headers, after):
    target = "/" + "/".join(path)
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    raw = head.encode() + after  # what follows the head (a websocket's first frame) is kept, not parsed
    whole, split = head_of([raw]), head_of(data.draw(cut(raw)))
    assert whole is not None and split is not None
    assert (split.method, split.target, split.headers) == (whole.method, whole.target, whole.headers)
    assert (whole.method, whole.target) == (method, target)
    assert raw.startswith(split.raw) and len(split.raw) >= len(head)  # every byte read, in order


# -- a slave's output lines (engine.pool.slave: the crashlog) ----------------------------------

@settings(deadline=None)
@given(st.data(), st.lists(st.text(max_size=30).map(lambda t: t.replace("\n", " ")), max_size=8))
def test_slave_output_lines_are_the_same_however_the_pipe_cuts_them(data, lines):
    raw = "".join(line + "\n" for line in lines).encode()
    slave = SlaveProcess(app="a", entry=Path("app.py"), config=EngineConfig(crashlog_limit=100))
    trio.run(slave._pump_output, _Pieces(data.draw(cut(raw))))  # split UTF-8 sequences included
    assert list(slave.output) == [line.rstrip("\r") for line in lines]


# -- frames of envelopes, however an outbox batches them ---------------------------------------

ENVELOPES = st.lists(st.builds(Envelope, st.integers(0, 40), st.integers(0, 2**32),
                               st.none() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=10) | st.binary(max_size=10)),
                     max_size=20)


@given(st.data(), ENVELOPES)
def test_envelopes_decode_the_same_however_they_are_batched_into_frames(data, envelopes):
    packed = [encode_envelope(*e) for e in envelopes]
    sizes = data.draw(st.lists(st.integers(1, 5), max_size=len(packed)))
    frames, start = [], 0
    for size in sizes + [len(packed)]:
        if start < len(packed):
            frames.append(join_frame(packed[start:start + size]))
            start += size
    assert [e for frame in frames for e in decode(frame)] == envelopes
    assert decode(encode(envelopes)) == envelopes
