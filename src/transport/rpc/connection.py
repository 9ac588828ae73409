"""One client as an :class:`~transport.rpc.RpcServer` sees it, and the limits that keep
what a client can make a server hold bounded (docs/protocol.md, "Limits").

- ``max_message`` (default :data:`transport.codec.DEFAULT_MAX_MESSAGE`, 16 MiB): the
  largest frame read from a client, checked on its length before it is buffered (over
  nng, by nng itself: ``recv_max_size``), so a connection buffers at most one frame
  that big; answers are kept under it too (a bigger one is refused with
  ``bad-message``: stream it), and a frame of many answers is cut to fit.
- ``max_connections`` (default :data:`DEFAULT_MAX_CONNECTIONS`): one more is told
  ``queue-full`` and closed.
- ``idle_timeout`` (default :data:`DEFAULT_IDLE_TIMEOUT` s; None: never): a connection
  that completes no frame for that long while nothing of its is in flight is told
  why and closed.

A connection that breaks the protocol is closed too, with an ``ERROR bad-message``
saying why; :class:`PeerLog` keeps the log to one line per peer, whatever a flood of
peers does.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from transport.codec import DEFAULT_MAX_MESSAGE, Kind, encode_envelope, join_frame
from transport.errors import Closed, RemoteError, error_to_body
from transport._outbox import Outbox, TrySend
from transport.rpc.handlers import FrameGuard, sealing
from transport.streams import FramedStream

if TYPE_CHECKING:
    import pynng

    from transport.inbound import InputStream
    from transport.rpc.handlers import Deferred
    from transport.sockets import TrioSocket
    from transport._spin import SpinPolicy

# What a connection's writer sends a frame with (None once its client is gone).
Send = Callable[[bytes], Awaitable[None]]

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_IDLE_TIMEOUT = 300.0  # s
# How long a connection being closed is given to read why (then it is closed outright).
CLOSE_GRACE = 1.0  # s
# Room left in every frame for a FrameGuard's seal (an HMAC tag, a nonce...): a sender
# keeps its frames this much under the peer's max_message.
SEAL_ROOM = 1024
# The msgpack array header around a frame's envelopes, at most.
FRAME_HEADER = 5
# The smallest max_message that makes sense: room for a seal and a useful envelope.
MIN_MESSAGE = 4 * SEAL_ROOM
# s an nng pipe being closed is kept open after its reason was handed to nng.
NNG_LINGER = 0.05


def max_envelope(max_message: int) -> int:
    """The largest packed envelope that fits a frame of ``max_message`` bytes, seal
    included."""
    return max_message - SEAL_ROOM - FRAME_HEADER


def check_max_message(value: int, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MESSAGE:
        raise ValueError(f"{owner}: max_message must be an int >= {MIN_MESSAGE} (bytes), "
                         f"got {value!r}")
    return value


def check_limits(owner: str, max_connections: int, idle_timeout: float | None) -> None:
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) \
            or max_connections < 1:
        raise ValueError(f"{owner}: max_connections must be an int >= 1, "
                         f"got {max_connections!r}")
    if idle_timeout is not None and (isinstance(idle_timeout, bool)
                                     or not isinstance(idle_timeout, (int, float))
                                     or not math.isfinite(idle_timeout) or idle_timeout <= 0):
        raise ValueError(f"{owner}: idle_timeout must be a number of seconds > 0, or None, "
                         f"got {idle_timeout!r}")


class Connection:
    """One client: its replies queue in ``outbox`` until its writer packs them into
    frames; what it has in flight is in ``running``, ``deferred`` and ``inputs`` (every
    request of it in flight is in exactly one of ``running`` and ``deferred``, so
    leaving releases exactly what it held)."""

    __slots__ = ("id", "peer", "send", "try_send", "flush", "outbox", "running", "deferred",
                 "inputs", "spin", "answer_spin", "guard", "sealed", "link_try_send", "active",
                 "idle_since", "farewell", "hang_up")

    def __init__(self, conn_id: int, peer: str, send: Send, try_send: TrySend | None = None,
                 flush: Callable[[], Awaitable[None]] | None = None,
                 guard: FrameGuard | None = None, max_frame: int | None = None) -> None:
        self.id = conn_id
        self.peer = peer  # who it is, for the log: a host, "unix", an nng address
        self.send: Send | None = send  # None once the client is gone: its writer stops
        self.link_try_send = try_send  # the link's own direct write
        # Writes (seals) a frame now if the link takes it without blocking.
        self.try_send = sealing(try_send, guard)
        self.flush = flush  # finishes a frame try_send could only start
        # Seals its answers: the server's guard, or (behind a FrameGate) the one its
        # first sealed frame came with.  ``sealed``: whether the frame being read was.
        self.guard = guard
        self.sealed = guard is not None
        self.outbox = Outbox(max_frame)
        self.running: dict[int, Any] = {}  # sid -> the worker serving it (server._Worker)
        self.deferred: dict[int, Deferred] = {}  # sid -> answer still to come
        self.inputs: dict[int, InputStream] = {}  # sid -> chunks of a request still coming
        self.spin: SpinPolicy | None = None  # polling for its next request (transport/_spin.py)
        self.answer_spin: SpinPolicy | None = None  # ... for a Deferred's answer
        # Idle tracking: set by the reader when frames come, cleared by the idle sweep.
        self.active = False
        self.idle_since = trio.current_time()
        self.farewell: bytes | None = None  # the frame telling it why it is being closed
        self.hang_up: Callable[[], None] = _nothing  # ends the link (set by its server)

    @property
    def busy(self) -> bool:
        """Something of it is in flight (a request, or a chunked request's chunks)."""
        return bool(self.running or self.deferred or self.inputs)


def _nothing() -> None:
    pass


class PeerLog:
    """Which peers were logged already: the first trouble from a peer is logged, the
    rest only counted.  Bounded: at most ``capacity`` peers are remembered (the least
    recently seen is forgotten first, and logged again if it comes back), so a flood
    of peers costs a bounded table and a bounded rate of log lines."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, peer: str) -> bool:
        """True the first time ``peer`` is seen (since it was last forgotten)."""
        seen = self._seen
        if peer in seen:
            seen.move_to_end(peer)
            return False
        seen[peer] = None
        if len(seen) > self.capacity:
            seen.popitem(last=False)
        return True


def error_frame(sid: int, error: RemoteError, guard: FrameGuard | None) -> bytes:
    """A frame of one ``ERROR`` on ``sid``, sealed by ``guard`` if there is one."""
    frame = join_frame([encode_envelope(Kind.ERROR, sid, error_to_body(error))])
    return frame if guard is None else guard.seal(frame)


def idle_connections(connections: Iterable[Connection], now: float,
                     timeout: float) -> list[Connection]:
    """The idle sweep (pure; run every ``timeout / 4`` s): the connections that
    completed no frame for ``timeout`` s while nothing of theirs was in flight.  One
    that was active since the last sweep (``active``, set by its reader) or is busy
    starts its idle time again now, so a connection is closed between 1 and 1.25
    timeouts after its last frame or answer, never before."""
    out = []
    for conn in connections:
        if conn.active or conn.busy:
            conn.active = False
            conn.idle_since = now
        elif now - conn.idle_since >= timeout:
            out.append(conn)
    return out


async def farewell(stream: FramedStream, frame: bytes) -> None:
    """Tell a client why it is being closed, then close: ``frame``, the end of this
    side of the stream, and whatever it still sends read and dropped until it closes
    its side (so the reason reaches it: closing with its data unread would reset the
    connection), for at most CLOSE_GRACE s; the caller closes the stream."""
    with trio.move_on_after(CLOSE_GRACE):
        try:
            await stream.send(frame)
        except Closed:
            return
        stream.shutdown_write()
        await stream.discard_until_closed()


async def nng_farewell(args: tuple[TrioSocket, pynng.Pipe, bytes]) -> None:
    """The same over nng: the reason to that pipe, then the pipe closed (nng writes
    from threads of its own: the reason is given NNG_LINGER s to leave first)."""
    import pynng

    sock, pipe, frame = args
    with trio.move_on_after(CLOSE_GRACE):
        try:
            await sock.send_msg(pynng.Message(frame, pipe))
        except (Closed, pynng.NNGException):
            pass
        else:
            await trio.sleep(NNG_LINGER)
    try:
        pipe.close()
    except pynng.NNGException:
        pass  # gone already


def peer_of(raw: trio.SocketStream) -> str:
    """Who a stream connection comes from, for the log: its host (not its port: one
    line per host), or "unix" for a local socket."""
    try:
        name = raw.socket.getpeername()
    except OSError:
        return "unknown"
    return str(name[0]) if isinstance(name, tuple) else "unix"


def nng_peer(pipe: pynng.Pipe) -> str:
    """Who an nng pipe comes from, for the log: its host, or its address."""
    import pynng

    try:
        text = str(pipe.remote_address)
    except pynng.NNGException:
        return "nng"  # the pipe is gone already
    host = text.rpartition(":")[0]
    return "nng:" + (host or text)


__all__ = ["CLOSE_GRACE", "Connection", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS",
           "DEFAULT_MAX_MESSAGE", "MIN_MESSAGE", "NNG_LINGER", "PeerLog", "SEAL_ROOM", "check_limits",
           "check_max_message", "error_frame", "farewell", "idle_connections", "max_envelope",
           "nng_farewell", "nng_peer", "peer_of"]
