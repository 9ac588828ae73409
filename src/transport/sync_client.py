"""A blocking client of an :class:`~transport.rpc.RpcServer`, for code that does not run
trio: scripts, threads, WSGI apps calling into the engine.

```python
from transport.sync_client import SyncRpcClient

with SyncRpcClient("tcp://127.0.0.1:9300", timeout=5) as node:      # a node's control endpoint
    node.call("echo", "echo", {"hello": 1})
    for chunk in node.stream("echo", "count", {"n": 3}):
        print(chunk)
```

It speaks the same frames as :class:`~transport.rpc.RpcClient` (docs/protocol.md) over
``tcp://`` and ``ipc://`` (``unix://``) addresses, so it reaches the control endpoint,
a ``native-server`` driver and a mesh Responder without a secret.  One request at a time
per client (calls from several threads take turns); a request that times out is
cancelled on the server and its late answer is skipped.  When the connection drops the
call fails with :class:`~transport.errors.Unreachable` and the next call reconnects;
when the server hangs up saying why (``ERROR`` on sid 0: too many connections, idle...)
the call fails with that error.  Nothing over ``max_message`` (default 16 MiB) is sent
or read: a bigger request or chunk fails with ``bad-message`` at once (send bulk data
as chunks).

No scheduler sits between the caller and the socket: a sequential round trip costs one
``send`` and one blocking ``recv``, which is the cheapest way to make one request at a
time (use the trio client for many in flight).
"""
from __future__ import annotations

import itertools
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from transport.codec import DEFAULT_MAX_MESSAGE, Kind, decode_lists, encode_envelope, join_frame
from transport.errors import BadMessage, CodecError, TimeoutError_, TransportError, Unreachable, body_to_error
from transport.inbound import WINDOW
from transport._links import _split_host_port, _unix_path
from transport.rpc.connection import check_max_message, max_envelope
from transport.streams import cut_frames, frame_header

if TYPE_CHECKING:
    from transport.rpc.handlers import FrameGuard

_END = (Kind.RESULT, Kind.CHOKE, Kind.ERROR)


class SyncRpcClient:
    def __init__(self, address: str, *, timeout: float | None = None,
                 guard: FrameGuard | None = None,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        """``guard`` seals every frame sent and opens every frame received (e.g. a
        node's token: ``engine.client.control_guard``), as ``RpcClient(guard=)`` does."""
        self._target: tuple[str, int] | str  # what connect() takes: (host, port) or a path
        if address.startswith("tcp://"):
            self._family, self._target = socket.AF_INET, _split_host_port(address, "tcp://")
        elif address.startswith(("ipc://", "unix://")):
            self._family, self._target = socket.AF_UNIX, _unix_path(address)
        else:
            raise TransportError(f"{address!r}: SyncRpcClient speaks tcp:// and ipc:// only")
        self.address = address
        self.default_timeout = timeout
        self.guard = guard
        self.max_message = check_max_message(max_message, "SyncRpcClient")
        self._max_envelope = max_envelope(max_message)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._frames: deque[list] = deque()  # envelopes read but not yet looked at
        self._sids = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> "SyncRpcClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()
        self._frames.clear()

    # -- calls --------------------------------------------------------------------------
    def call(self, target: str, event: str, payload: Any = None, *,
             timeout: float | None = None, chunks: Iterable[Any] | None = None) -> Any:
        """The RESULT value, or the list of chunks of a streamed reply.  ``chunks`` makes
        it a chunked request: they are sent after it, as the server's handler takes
        them (transport/inbound.py)."""
        replies = []
        with self._lock:
            for kind, body in self._exchange(target, event, payload, timeout, chunks=chunks):
                if kind == Kind.RESULT:
                    return body
                if kind == Kind.CHUNK:
                    replies.append(body)
        return replies  # the stream ended with CHOKE

    def stream(self, target: str, event: str, payload: Any = None, *,
               timeout: float | None = None) -> Iterator[Any]:
        """Chunks as they arrive (a RESULT is one chunk); ``timeout`` bounds the wait
        for each.  Leaving the loop early cancels the request on the server."""
        with self._lock:
            for kind, body in self._exchange(target, event, payload, timeout, per_reply=True):
                if kind != Kind.CHOKE:
                    yield body

    def _exchange(self, target: str, event: str, payload: Any, timeout: float | None,
                  per_reply: bool = False,
                  chunks: Iterable[Any] | None = None) -> Iterator[tuple[int, Any]]:
        """Send one REQUEST (and its chunks) and yield its replies ``(kind, body)`` up to
        the last; an ERROR is raised.  Abandoned early (timeout, the caller left), it
        sends CANCEL."""
        limit = self.default_timeout if timeout is None else timeout
        sid = next(self._sids)
        body = (target, event, payload) if chunks is None else (target, event, payload, True)
        try:
            request = encode_envelope(Kind.REQUEST, sid, body)
        except CodecError as exc:
            raise BadMessage(f"request payload cannot be encoded: {exc}") from None
        if len(request) > self._max_envelope:
            raise BadMessage(f"a request of {len(request)} bytes is over the limit "
                             f"({self._max_envelope} bytes: max_message): send the data as "
                             "chunks (call(..., chunks=...))")
        self._drop_if_hung_up()
        self._send(join_frame([request]))
        deadline = None if limit is None else time.monotonic() + limit
        finished = False
        try:
            if chunks is not None:
                self._send_chunks(sid, chunks, deadline, event)
            while True:
                kind, body = self._next_reply(sid, deadline, event)
                if kind == Kind.CREDIT:
                    continue  # for chunks already sent
                if kind == Kind.ERROR:
                    finished = True
                    raise body_to_error(body)
                finished = kind in _END
                yield kind, body
                if finished:
                    return
                if per_reply and limit is not None:
                    deadline = time.monotonic() + limit
        finally:
            if not finished and self._sock is not None:
                try:
                    self._send(join_frame([encode_envelope(Kind.CANCEL, sid, None)]))
                except Unreachable:
                    pass

    def _send_chunks(self, sid: int, chunks: Iterable[Any], deadline: float | None,
                     event: str) -> None:
        """Send the chunks, never more than the server's window ahead; stops at once if
        an answer comes first (it is put back for the reply loop)."""
        window = WINDOW
        for item in chunks:
            while window <= 0:
                kind, body = self._next_reply(sid, deadline, event)
                if kind == Kind.CREDIT:
                    if type(body) is int and body > 0:
                        window += body
                    continue
                self._frames.appendleft([kind, sid, body])  # answered already
                return
            try:
                chunk = encode_envelope(Kind.CHUNK, sid, item)
            except CodecError as exc:
                raise BadMessage(f"request chunk cannot be encoded: {exc}") from None
            if len(chunk) > self._max_envelope:
                raise BadMessage(f"a chunk of {len(chunk)} bytes is over the limit "
                                 f"({self._max_envelope} bytes: max_message): send smaller chunks")
            self._send(join_frame([chunk]))
            window -= 1
        self._send(join_frame([encode_envelope(Kind.CHOKE, sid, None)]))

    # -- the socket ---------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.socket(self._family, socket.SOCK_STREAM)
                if self._family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(self._target)
            except OSError as exc:
                sock.close()
                raise Unreachable(f"cannot connect to {self.address}: {exc}") from None
            self._sock = sock
        return self._sock

    def _drop_if_hung_up(self) -> None:
        """Between requests, look (without waiting) at what came in since the last one:
        a server that hung up meanwhile (an idle connection) left its reason and the
        end of the stream there, and a request sent now would be lost with the
        connection.  Seeing that, close: the request goes on a new connection."""
        sock = self._sock
        if sock is not None:
            sock.settimeout(None)  # blocking mode: MSG_DONTWAIT then returns at once
        while sock is not None:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return  # nothing more: the connection is up
            except OSError:
                self.close()
                return
            if not data:
                self.close()  # the end of the stream
                return
            self._buffer += data
            try:
                self._take_frames()
            except Unreachable:
                return  # closed
            if any(env[1] == 0 and env[0] == Kind.ERROR for env in self._frames):
                self.close()  # the server's reason for hanging up: on a new connection
                return

    def _take_frames(self) -> None:
        """Decode the complete frames in the buffer into ``_frames``."""
        try:
            frames = cut_frames(self._buffer, self.max_message)
        except CodecError as exc:  # a length over max_message: the stream is garbage
            self.close()
            raise Unreachable(f"{self.address} sent {exc}") from None
        for frame in frames:
            try:
                if self.guard is not None:
                    frame = self.guard.open(frame)
                self._frames.extend(decode_lists(frame))
            except CodecError:
                pass  # a corrupt frame answers nobody, as in RpcClient

    def _send(self, frame: bytes) -> None:
        if self.guard is not None:
            frame = self.guard.seal(frame)
        sock = self._connect()
        try:
            sock.settimeout(None)
            sock.sendall(frame_header(len(frame)) + frame)
        except OSError as exc:
            self.close()
            raise Unreachable(f"connection to {self.address} lost: {exc}") from None

    def _next_reply(self, sid: int, deadline: float | None, event: str) -> tuple[int, Any]:
        """The next envelope for ``sid``; envelopes for other (abandoned) sids are skipped."""
        while True:
            while self._frames:
                kind, env_sid, body = self._frames.popleft()
                if env_sid == sid:
                    return kind, body
                if env_sid == 0 and kind == Kind.ERROR:  # the server hangs up, saying why
                    self.close()
                    raise body_to_error(body)
            self._read_frames(deadline, event)

    def _read_frames(self, deadline: float | None, event: str) -> None:
        sock = self._sock
        if sock is None:
            raise Unreachable(f"connection to {self.address} lost")
        buffer = self._buffer
        while True:
            self._take_frames()
            if self._frames:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError_(f"no answer to {event!r} from {self.address}")
            try:
                sock.settimeout(left)
                data = sock.recv(1 << 16)
            except socket.timeout:
                raise TimeoutError_(f"no answer to {event!r} from {self.address}") from None
            except OSError as exc:
                self.close()
                raise Unreachable(f"connection to {self.address} lost: {exc}") from None
            if not data:
                self.close()
                raise Unreachable(f"{self.address} closed the connection")
            buffer += data
