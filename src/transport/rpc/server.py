"""Request/response with streamed replies, over nng or framed streams.

Shared by the engine's control endpoint, the ``native-server`` driver and the mesh
Requester/Responder.  One :class:`RpcServer` serves many :class:`RpcClient`\\ s; the
address picks the link (:mod:`transport._links`): ``tcp://``/``ipc://`` for framed
trio sockets (the default: reliable, lowest latency), ``tls+tcp://`` for the same inside
TLS (``ssl_context=``, :mod:`transport.tls`), ``nng+tcp://``/``nng+ipc://`` for nng
Pair1 (any nng binding can talk to it; best-effort under overload).  An empty listen
host (``tcp://:PORT``) is every interface; :attr:`RpcServer.address` then reads
127.0.0.1, a dialable address, and :attr:`RpcServer.listen_address` 0.0.0.0.

Every frame is a batch of envelopes (:mod:`transport.codec`):

- client → server ``REQUEST sid [target, event, payload]``, ``CANCEL sid``;
- server → client, on the same sid, exactly one of ``RESULT value``,
  ``CHUNK item``… ``CHOKE``, or ``ERROR {code,type,message,retryable}``
  (a stream may also end with ``ERROR``).

A handler is called as ``handler(req: Request)`` where the request arrives, and what it
returns says how the answer is made:

- a plain value is the ``RESULT``, sent at once: a plain ``def`` handler costs no task
  and no scheduler pass (keep it quick: it runs on the connection's reader);
- a coroutine (an ``async def`` handler) is awaited on a worker task, and its value is
  answered the same way;
- :class:`Stream` (any async iterable) streams ``CHUNK``s and a ``CHOKE``, on a worker;
- :class:`Deferred`: the answer comes later from elsewhere (e.g. a job in a slave
  pool), settled by a callback, with no task waiting for it.

Raising sends ``ERROR`` (a :class:`~transport.errors.RemoteError` keeps its code,
anything else becomes a ``HandlerError`` with the exception's type and message).

A client that breaks the protocol (a frame that cannot be read or fails the ``guard``,
a frame over ``max_message``, a request id already in flight, a chunk for a request
that is not chunked, a kind no client sends) is told why with ``ERROR bad-message``
(on the offending sid, else on sid 0) and its connection is closed; whatever it had
in flight is cancelled, so nothing of it stays counted.  Limits (``max_message``,
``max_connections``, ``idle_timeout``): :mod:`transport.rpc.connection`.
"""
from __future__ import annotations

import itertools
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from transport.codec import DEFAULT_MAX_MESSAGE, Kind, decode_lists, encode_envelope
from transport.errors import (BadMessage, Closed, CodecError, QueueFull, RemoteError,
                              TransportError, Unreachable, error_to_body)
from transport.inbound import InputStream
from transport._links import accept_tls, is_stream, listen_stream, nng_url
from transport.rpc.connection import (DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, SEAL_ROOM,
                                      Connection, PeerLog, check_limits, check_max_message,
                                      error_frame, farewell, idle_connections, max_envelope,
                                      nng_farewell, nng_peer, peer_of)
from transport.rpc.handlers import (FAILED, RESOLVED, Deferred, FrameGate, FrameGuard, Handler,
                                    Refused, Request, Stream, sealing)
from transport._spin import SpinPolicy, poll_next, spin_until
from transport.streams import FramedStream
from transport.tls import TlsHandshakeError, check_context

if TYPE_CHECKING:
    import pynng

    from transport.sockets import TrioSocket

# The kinds on the hot paths as plain ints: an enum member lookup costs more than
# the comparison it feeds (~75 ns each).
_REQUEST, _CANCEL, _RESULT = int(Kind.REQUEST), int(Kind.CANCEL), int(Kind.RESULT)
_CHUNK, _CHOKE, _CREDIT = int(Kind.CHUNK), int(Kind.CHOKE), int(Kind.CREDIT)
_ERROR = int(Kind.ERROR)
# Handler results that are certainly answers (not coroutines, Streams or Deferreds).
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, list, dict, tuple})

# Worker tasks kept parked for the next request once a burst is over (the rest end).
MAX_IDLE_WORKERS = 512
# Bytes of answers a streamed reply lets queue for its client before it waits for the
# client to read them: high_water counts envelopes, and 8,192 chunks of 64 KiB would
# be 512 MiB held for one slow reader.  (A stream fed by a job stops taking its chunks
# meanwhile, so its slave stops at the end of its credit window: bounded end to end.)
STREAM_BACKLOG = 1 << 20
_T = TypeVar("_T")
_park = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
log = logging.getLogger(__name__)


class _Worker:
    """A task that finishes requests one after another: awaits a handler's coroutine,
    or streams a :class:`Stream`.

    Spawning a task and opening a cancel scope for every request costs more than a
    quick handler itself (~8 + 5 µs here), so requests go to parked workers instead:
    waking one is a single reschedule.  Each worker runs inside one cancel scope;
    cancelling a request (CANCEL, or its client leaving) cancels the worker serving
    it, which ends after that request and is replaced on demand.

    While it is parked its ``conn`` is unset (``del``) and its ``work`` None, so that an
    idle worker keeps neither a departed client's connection nor a finished request
    alive; ``task`` is set by the task itself as it starts, and only a worker that has
    started parks."""

    __slots__ = ("task", "scope", "conn", "sid", "work")
    task: trio.lowlevel.Task
    conn: Connection
    work: Any  # the coroutine, awaitable or Stream to finish (None: parked)

    def __init__(self, conn: Connection, sid: int, work: Any) -> None:
        self.scope = trio.CancelScope()
        self.conn = conn
        self.sid = sid
        self.work = work


class RpcServer:
    """Serve requests from many clients, each request on a (reused) worker task.

    ``spin=True``: when its only client over a stream link has every request answered,
    poll a moment for the next one instead of sleeping (transport/_spin.py): for a
    server whose client calls one request after another, at the cost of CPU.  Either
    way, a :class:`Deferred` made with ``poll`` is polled for its answer when it is all
    the server waits for."""

    def __init__(self, address: str, handler: Handler, *, max_inflight: int = 10_000,
                 guard: FrameGuard | None = None, high_water: int = 8192, spin: bool = False,
                 gate: FrameGate | None = None, max_message: int = DEFAULT_MAX_MESSAGE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
                 ssl_context: ssl.SSLContext | None = None):
        """``guard``: every frame sealed, others refused (a mesh with a secret).
        ``gate``: sealed frames and plain ones both let in, each request marked
        (``Request.sealed``), for a handler that decides (transport/seal.py).
        ``max_message``, ``max_connections``, ``idle_timeout`` (None: never): what a
        client can make it hold (:mod:`transport.rpc.connection`).
        ``ssl_context``: a server-side context, required by (and only by) a
        ``tls+tcp://`` address; :class:`~transport.tls.TlsConfigError` otherwise."""
        if guard is not None and gate is not None:
            raise ValueError("an RpcServer takes a guard or a gate, not both")
        check_context(address, ssl_context, server_side=True)
        self.ssl_context = ssl_context
        self.max_message = check_max_message(max_message, "RpcServer")
        check_limits("RpcServer", max_connections, idle_timeout)
        self.max_connections = max_connections
        self.idle_timeout = None if idle_timeout is None else float(idle_timeout)
        # Answers are kept to frames the client takes, its guard's seal included.
        self._max_frame = max_message - SEAL_ROOM
        self._max_envelope = max_envelope(max_message)
        self.requested_address = address
        self.address: str | None = None  # where to dial it (an empty host: 127.0.0.1)
        self.listen_address: str | None = None  # what it is bound to (... 0.0.0.0)
        self.handler = handler
        self.max_inflight = max_inflight
        self.guard = guard
        self.gate = gate
        self.high_water = high_water
        self.spin = spin
        self._connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._inflight = 0
        self._queued = 0
        self._room = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._idle: list[_Worker] = []  # parked workers, the most recently used last
        # What each Deferred is bound to: made once, not a bound method per request.
        self._on_settled = self._settled
        self.served = 0
        self.failed = 0
        self.bad_frames = 0
        self.refused_frames = 0  # frames the gate would not trust (answered: _refuse)
        self.refused = 0
        # Connections closed for what they sent (bad frames included), refused over
        # max_connections, closed for idling; each peer's first is logged (peer_log).
        self.violations = 0
        self.refused_connections = 0
        self.idle_closed = 0
        self.tls_failures = 0  # TLS handshakes that failed (the peer's first is logged)
        self.peer_log = PeerLog()
        self.polled = 0  # frames of requests that arrived while polling for them
        self.answers_polled = 0  # Deferreds settled while polling for them
        self.poll_errors = 0  # Deferred polls that raised (the first is logged)
        self.cancel_errors = 0  # Deferred on_cancel callbacks that raised (the first is logged)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started`` with the bound
        address (port 0 resolved)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.idle_timeout is not None:
                nursery.start_soon(self._sweep_idle, self.idle_timeout)
            if is_stream(self.requested_address):
                listening = await listen_stream(self.requested_address)
                self.address, self.listen_address = listening.address, listening.bound
                task_status.started(listening.address)
                await trio.serve_listeners(self._serve_stream, listening.listeners,
                                           handler_nursery=nursery)
            else:
                await self._run_nng(task_status)

    def _start_soon(self, fn: Callable[[_T], Awaitable[None]], arg: _T) -> None:
        """A connection's writer or a worker, in the nursery of :meth:`run` (which every
        request arrived through, so it is open: a server that is not running has no
        connections and no requests)."""
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("RpcServer.run() is not running")
        nursery.start_soon(fn, arg)

    # -- framed streams: one reader and one writer task per connection -------------
    async def _serve_stream(self, raw: trio.SocketStream) -> None:
        peer = peer_of(raw)
        if self.ssl_context is not None:
            try:
                link = await accept_tls(raw, self.ssl_context, peer)
            except TlsHandshakeError as exc:
                # A peer without a certificate of our CA, or not speaking TLS: never
                # a connection (serve_listeners closes raw), never the server's end.
                self.tls_failures += 1
                self._warn(peer, "refused a connection", exc.message, "RpcServer.tls_failures")
                return
            stream = FramedStream(link, max_message=self.max_message)
        else:
            stream = FramedStream(raw, max_message=self.max_message)
        try:
            if len(self._connections) >= self.max_connections:
                self.refused_connections += 1
                self._warn(peer, "refused a connection", "over max_connections",
                           "RpcServer.refused_connections")
                await farewell(stream, error_frame(0, self._full(), self.guard))
                return
            conn = Connection(next(self._ids), peer, stream.send, stream.try_send_nowait,
                              stream.flush, self.guard, self._max_frame)
            conn.answer_spin = SpinPolicy()
            if self.spin:
                conn.spin = SpinPolicy()
            reading = trio.CancelScope()
            conn.hang_up = reading.cancel
            self._connections[conn.id] = conn
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn)
                    with reading:
                        await self._read_stream(conn, stream)
                    if conn.farewell is not None:  # closed by this server: say why
                        await farewell(stream, conn.farewell)
                    nursery.cancel_scope.cancel()
            finally:
                self._drop(conn)
        finally:
            stream.close()

    async def _read_stream(self, conn: Connection, stream: FramedStream) -> None:
        """Read one client's frames until it leaves or is closed."""
        try:
            while True:
                frames = await stream.recv_many()
                while frames:
                    conn.active = True
                    for frame in frames:
                        self._on_frame(conn, frame)
                    if conn.send is None:
                        return  # closed (it broke the protocol): the reason is its farewell
                    while len(conn.outbox) >= self.high_water:
                        # This client reads its answers slower than it asks: stop
                        # reading its requests until they drain (TCP pushes back).
                        await self._wait_room()
                    self._poll_deferred(conn)
                    frames = await self._poll_next(conn, stream)
        except Closed:
            pass  # the client went away
        except CodecError as exc:  # garbage framing (a length over max_message)
            self._bad_frame(conn, exc)

    def _poll_deferred(self, conn: Connection) -> None:
        """When all this server waits for is one Deferred that can poll for its answer
        (a lone job in a slave: its answer is due any moment), poll for it for a
        moment instead of going back to sleep: the answer then leaves from here, one
        wake-up of this process per request instead of two (transport/_spin.py)."""
        # (_inflight == 1 with that one Deferred: no worker is running either)
        if len(conn.deferred) != 1 or conn.inputs or len(self._connections) != 1 \
                or self._inflight != 1 or conn.answer_spin is None:
            return
        deferred = next(iter(conn.deferred.values()))
        if deferred.poll is None:
            return
        try:
            self.answers_polled += spin_until(conn.answer_spin, deferred.poll,
                                              lambda: deferred.settled)
        except Exception:
            # Its owner's bug costs only the poll, not the connection: the answer (or
            # the failure) still comes the usual way.  Counted, and the first logged
            # with its traceback: once per server, as a poll may fail on every request.
            self.poll_errors += 1
            if self.poll_errors == 1:
                log.exception("a Deferred's poll raised; the connection lives on (further "
                              "failures are only counted, in RpcServer.poll_errors)")

    async def _poll_next(self, conn: Connection, stream: FramedStream) -> list[bytes]:
        """With ``spin``: the next frame of a lone client whose requests are all
        answered, polled for a moment (transport/_spin.py); [] if it did not come."""
        def expecting() -> bool:  # no answer still to send, no other client to hear
            return not (conn.running or conn.deferred or conn.inputs) \
                and len(self._connections) == 1

        frames = await poll_next(conn.spin, stream.poll_frames, expecting, stream.fileno())
        self.polled += len(frames)
        return frames

    # -- nng: one polyamorous socket, a connection per pipe ------------------------
    async def _run_nng(self, task_status: trio.TaskStatus[str]) -> None:
        # pynng only when an nng link is asked for: it costs a process ~9 MB of RSS
        # and an asyncio import, which a mesh component on TCP streams never needs.
        import pynng

        from transport.sockets import TrioSocket, bound_address

        # nng refuses a message over max_message itself, closing its pipe: nothing of
        # it is buffered here (pynng offers no way to say why first).
        raw = pynng.Pair1(polyamorous=True, recv_max_size=self.max_message)
        try:
            raw.listen(nng_url(self.requested_address))
        except pynng.NNGException as exc:
            raw.close()
            raise TransportError(f"cannot listen on {self.requested_address}: {exc}") from None
        sock = TrioSocket(raw)
        by_pipe: dict[int, Connection] = {}

        refusing: set[int] = set()  # pipes over max_connections, being told so

        def pipe_gone(pipe: pynng.Pipe) -> None:
            refusing.discard(pipe.id)
            conn = by_pipe.pop(pipe.id, None)
            if conn is not None:
                self._drop(conn)

        try:
            sock.on_pipe_event(removed=pipe_gone)
            self.address = address = "nng+" + bound_address(raw)
            self.listen_address = "nng+" + bound_address(raw, dialable=False)
            task_status.started(address)
            while True:
                msg = await sock.recv_msg()
                pipe = msg.pipe
                conn = by_pipe.get(pipe.id)
                if conn is None:
                    if len(self._connections) >= self.max_connections:
                        if pipe.id not in refusing:
                            refusing.add(pipe.id)
                            self.refused_connections += 1
                            self._warn(nng_peer(pipe), "refused a connection",
                                       "over max_connections", "RpcServer.refused_connections")
                            self._start_soon(nng_farewell, (
                                sock, pipe, error_frame(0, self._full(), self.guard)))
                        continue
                    conn = by_pipe[pipe.id] = self._nng_connection(sock, pipe)
                conn.active = True
                self._on_frame(conn, msg.bytes)
        finally:
            sock.close()

    def _nng_connection(self, sock: TrioSocket, pipe: pynng.Pipe) -> Connection:
        import pynng

        async def send(frame: bytes) -> None:
            try:
                await sock.send_msg(pynng.Message(frame, pipe))
            except pynng.NNGException as exc:
                raise Closed(f"nng pipe gone: {exc}") from None

        conn = Connection(next(self._ids), nng_peer(pipe), send, guard=self.guard,
                          max_frame=self._max_frame)

        def hang_up() -> None:  # the reason, then the pipe closed
            if conn.farewell is not None:
                self._start_soon(nng_farewell, (sock, pipe, conn.farewell))

        conn.hang_up = hang_up
        self._connections[conn.id] = conn
        self._start_soon(self._writer, conn)
        return conn

    # -- shared ----------------------------------------------------------------------
    def _drop(self, conn: Connection) -> None:
        """The client is gone: nobody is left to read its answers, so stop that work."""
        if self._connections.pop(conn.id, None) is None:
            return
        for worker in conn.running.values():
            worker.scope.cancel()
        for sid in list(conn.deferred):
            self._cancel_deferred(conn, sid)
        for chunks in conn.inputs.values():
            chunks.fail(Unreachable("the client left before the end of its request"))
        conn.inputs.clear()
        self._queued -= conn.outbox.clear()
        conn.send = None  # tells its writer to stop
        conn.outbox.wake()

    def _on_frame(self, conn: Connection, frame: bytes) -> None:
        if conn.send is None:
            return  # being closed: nothing more of it is read
        try:
            if self.guard is not None:
                frame = self.guard.open(frame)
            elif self.gate is not None:
                frame, guard = self.gate.open(frame)
                conn.sealed = guard is not None
                if guard is not None and conn.guard is None:  # answers sealed from now on
                    conn.guard = guard
                    conn.try_send = sealing(conn.link_try_send, guard)
            envelopes = decode_lists(frame)
        except Refused as refusal:
            self._refuse(conn, refusal)
            return
        except CodecError as exc:
            self._bad_frame(conn, exc)
            return
        # Answers to a frame of many requests leave together, as one frame.
        conn.outbox.held = len(envelopes) > 1
        try:
            for kind, sid, body in envelopes:
                if kind == _REQUEST:
                    # Every request in flight is in one of these two (the membership
                    # tests are the whole cost of exact accounting).
                    if sid in conn.running or sid in conn.deferred or sid <= 0:
                        self._violation(conn, max(sid, 0), f"request id {sid} is already in "
                                        "flight on this connection" if sid > 0
                                        else f"request id {sid}: request ids are > 0")
                        return
                    self._on_request(conn, sid, body)
                elif kind == _CHUNK or kind == _CHOKE:  # a chunked request's chunks
                    chunks = conn.inputs.get(sid)
                    if chunks is not None:
                        if kind == _CHUNK:
                            chunks.feed(body)
                        else:
                            chunks.end()
                            del conn.inputs[sid]
                    elif sid in conn.running or sid in conn.deferred:
                        self._violation(conn, sid, f"{Kind(kind).name} for request {sid}, "
                                        "which is not chunked or whose chunks ended")
                        return
                    # (else its request was answered already: the rest of its chunks,
                    # still on their way then, are dropped)
                elif kind == _CANCEL:  # (for a request answered already: nothing to do)
                    worker = conn.running.get(sid)
                    if worker is not None:
                        worker.scope.cancel()
                    elif sid in conn.deferred:
                        self._cancel_deferred(conn, sid)
                else:
                    self._violation(conn, max(sid, 0),
                                    f"envelope kind {kind} is not one a client sends")
                    return
        finally:
            try:
                sent = conn.outbox.release(conn.try_send)
            except Closed:
                sent = 0  # the client is gone; its reader drops the connection
            if sent:
                self._queued -= sent
                self._room.set()

    def _refuse(self, conn: Connection, refusal: Refused) -> None:
        """A frame the gate would not trust: each request in it is answered with the
        gate's error, so its caller learns why (the frame is readable, not trusted:
        nothing in it runs)."""
        try:
            envelopes = decode_lists(refusal.frame)
        except CodecError as exc:
            self._bad_frame(conn, exc)
            return
        self.refused_frames += 1
        if self.refused_frames == 1:
            log.warning("frame refused: %s (further ones are only counted, in "
                        "RpcServer.refused_frames)", refusal.error.message)
        body = error_to_body(refusal.error)
        for kind, sid, _ in envelopes:
            if kind == _REQUEST:
                self._emit(conn, Kind.ERROR, sid, body)

    def _bad_frame(self, conn: Connection, exc: CodecError) -> None:
        """A frame from a client that cannot be read (not msgpack, not envelopes,
        over max_message, refused by the guard): nothing in it can be answered, so
        the connection is closed, saying why on sid 0."""
        self.bad_frames += 1
        self.violations += 1
        reason = f"unreadable frame: {exc}"
        self._warn(conn.peer, "closed a connection", reason, "RpcServer.bad_frames")
        self._close(conn, BadMessage(reason))

    def _violation(self, conn: Connection, sid: int, reason: str) -> None:
        """A client broke the protocol: its connection is closed with the reason, on
        the offending sid (its caller, if any, learns why) or 0."""
        self.violations += 1
        self._warn(conn.peer, "closed a connection", reason, "RpcServer.violations")
        self._close(conn, BadMessage(reason), sid)

    def _warn(self, peer: str, what: str, reason: str, counter: str) -> None:
        """Log the first trouble from ``peer``; after that it is only counted (a broken
        or hostile peer may send nothing else, and a flood of them must not flood the
        log: PeerLog is bounded)."""
        if self.peer_log.first(peer):
            log.warning("%s from %s: %s (further trouble from that peer is only counted, "
                        "in %s and the like)", what, peer, reason, counter)

    def _close(self, conn: Connection, error: RemoteError, sid: int = 0) -> None:
        """Hang up on a connection, telling it why: ``ERROR`` on ``sid`` (the offending
        request's, or 0: the connection as a whole), then the end of the link, within
        CLOSE_GRACE.  Whatever it had in flight is cancelled now: whatever it did,
        nothing of it stays counted."""
        if conn.send is None:
            return  # going already
        conn.farewell = error_frame(sid, error, conn.guard)
        self._drop(conn)
        conn.hang_up()

    def _full(self) -> QueueFull:
        return QueueFull(f"server has {self.max_connections} connections, its limit "
                         "(max_connections): try again later")

    async def _sweep_idle(self, timeout: float) -> None:
        """Close the connections that completed no frame for ``timeout`` s while
        nothing of theirs was in flight (looking every quarter of it: a connection is
        closed between 1 and 1.25 timeouts after its last frame or answer)."""
        while True:
            await trio.sleep(timeout / 4)
            for conn in idle_connections(self._connections.values(), trio.current_time(), timeout):
                self.idle_closed += 1
                self._close(conn, Unreachable(
                    f"the connection was idle for {timeout:g} s: closed by the server"))

    def _on_request(self, conn: Connection, sid: int, body: Any) -> None:
        if not (isinstance(body, list) and 3 <= len(body) <= 4 and isinstance(body[1], str)):
            self._emit(conn, Kind.ERROR, sid, error_to_body(
                BadMessage("REQUEST body must be [target, event, payload(, chunked)]")))
            return
        if self._inflight >= self.max_inflight:
            self.refused += 1
            self._emit(conn, Kind.ERROR, sid, error_to_body(
                QueueFull(f"server has {self.max_inflight} requests in flight")))
            return
        target = body[0] if isinstance(body[0], str) else ""
        chunks = None
        if len(body) == 4 and body[3] is True:  # CHUNKs of the request follow
            def grant(n: int) -> None:
                self._emit(conn, _CREDIT, sid, n)
            chunks = conn.inputs[sid] = InputStream(grant)
        self._inflight += 1
        try:
            out = self.handler(Request(sid, target, body[1], body[2], conn.id, chunks, conn.sealed))
        except Exception as exc:  # the handler's failure is the caller's answer
            self._answered(conn, sid, Kind.ERROR, error_to_body(exc), failed=True)
            return
        if type(out) in _PLAIN:
            self._answered(conn, sid, _RESULT, out)
        elif type(out) is CoroutineType or isinstance(out, Stream):
            self._to_worker(conn, sid, out)
        elif isinstance(out, Deferred):
            conn.deferred[sid] = out
            out.bind(self._on_settled, conn, sid)
        elif isinstance(out, Awaitable):  # some other awaitable (a class with __await__)
            self._to_worker(conn, sid, out)
        else:
            self._answered(conn, sid, _RESULT, out)

    def _answered(self, conn: Connection, sid: int, kind: int, body: Any,
                  failed: bool = False) -> None:
        """A request finished without a worker: send its answer, count it."""
        if conn.inputs:
            conn.inputs.pop(sid, None)  # chunks still coming for it are dropped
        self._emit(conn, kind, sid, body)
        if failed:
            self.failed += 1
        else:
            self.served += 1
        self._inflight -= 1
        if not self._inflight:
            self._room.set()

    def _settled(self, conn: Connection, sid: int, how: int, value: Any) -> None:
        """A :class:`Deferred` got its answer."""
        if conn.deferred.pop(sid, None) is None:
            return  # its caller gave up meanwhile; that was counted then
        if how == RESOLVED:
            self._answered(conn, sid, Kind.RESULT, value)
        elif how == FAILED:
            self._answered(conn, sid, Kind.ERROR, error_to_body(value), failed=True)
        else:
            self._to_worker(conn, sid, Stream(value))

    def _cancel_deferred(self, conn: Connection, sid: int) -> None:
        deferred = conn.deferred.pop(sid)
        chunks = conn.inputs.pop(sid, None)
        if chunks is not None:
            chunks.fail(Unreachable("the caller gave up on the request"))
        self._inflight -= 1
        if not self._inflight:
            self._room.set()
        if deferred.on_cancel is not None:
            try:
                deferred.on_cancel()
            except Exception:
                # Its owner's bug must not take the connection down, nor go unseen:
                # counted, and the first logged with its traceback (once per server, as
                # it may fail on every cancelled request).
                self.cancel_errors += 1
                if self.cancel_errors == 1:
                    log.exception("a Deferred's on_cancel raised (further failures are "
                                  "only counted, in RpcServer.cancel_errors)")

    def _to_worker(self, conn: Connection, sid: int, work: Any) -> None:
        """Finish ``work`` (a coroutine, an awaitable or a Stream) on a worker task."""
        if self._idle:
            worker = self._idle.pop()
            worker.conn, worker.sid, worker.work = conn, sid, work
            conn.running[sid] = worker
            _reschedule(worker.task)
        else:
            worker = conn.running[sid] = _Worker(conn, sid, work)
            self._start_soon(self._work, worker)

    async def _work(self, worker: _Worker) -> None:
        worker.task = trio.lowlevel.current_task()
        idle = self._idle

        def abort(_raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            idle.remove(worker)  # cancelled while parked: it can take no more requests
            return trio.lowlevel.Abort.SUCCEEDED

        with worker.scope:
            while True:
                conn, sid, work = worker.conn, worker.sid, worker.work
                try:
                    await self._finish(conn, sid, work)
                finally:
                    del worker.conn  # parked, it keeps neither its client nor its work
                    worker.work = None
                    self._inflight -= 1
                    conn.running.pop(sid, None)
                    if conn.inputs:
                        conn.inputs.pop(sid, None)
                    if not self._inflight:
                        self._room.set()
                if len(idle) >= MAX_IDLE_WORKERS:
                    return
                idle.append(worker)
                await _park(abort)  # until _to_worker hands us the next one

    async def _finish(self, conn: Connection, sid: int, work: Any) -> None:
        try:
            result = work if isinstance(work, Stream) else await work
            if isinstance(result, Stream):
                items: AsyncIterator[Any] = result.items.__aiter__()
                whole = True
                try:
                    async for item in items:
                        if not self._emit(conn, _CHUNK, sid, item):
                            whole = False  # its caller got an ERROR instead: the end
                            break
                        if self._queued >= self.high_water:
                            await self._wait_room()
                        while len(conn.outbox) > 1 and conn.send is not None \
                                and conn.outbox.size > STREAM_BACKLOG:
                            await self._wait_room()  # (its writer says when it sent)
                finally:
                    # A stream left early (CANCEL, the client gone) runs its cleanup now,
                    # e.g. cancelling the job behind it, not whenever it is collected.
                    # (The iterators with an aclose to await: an async generator, or
                    # a trio resource such as a memory channel's receiving end.)
                    if isinstance(items, (AsyncGenerator, trio.abc.AsyncResource)):
                        await items.aclose()
                if not whole:
                    self.failed += 1
                    return
                self._emit(conn, Kind.CHOKE, sid, None)
            else:
                self._emit(conn, Kind.RESULT, sid, result)
            self.served += 1
        except trio.Cancelled:
            raise
        except Exception as exc:  # the handler's failure is the caller's answer
            self.failed += 1
            self._emit(conn, Kind.ERROR, sid, error_to_body(exc))

    def _emit(self, conn: Connection, kind: int, sid: int, body: Any) -> bool:
        """Queue (or write) one answer; False if it could not go as it is and its
        caller was sent a ``bad-message`` ERROR instead (so a stream must end)."""
        if conn.send is None:
            return True  # the client left; _drop already cancelled the request
        whole = True
        try:
            packed = encode_envelope(kind, sid, body)
        except CodecError as exc:  # a reply msgpack cannot carry fails its caller, not the batch
            packed = encode_envelope(_ERROR, sid, error_to_body(
                BadMessage(f"reply could not be encoded: {exc}")))
            whole = False
        if len(packed) > self._max_envelope:  # one its client would refuse
            packed = encode_envelope(_ERROR, sid, error_to_body(BadMessage(
                f"a {Kind(kind).name} of {len(packed)} bytes is over this server's limit "
                f"({self._max_envelope} bytes: max_message): stream it in CHUNKs instead")))
            whole = False
        # A lone answer goes out at once when the writer is idle; the rest queue and batch.
        try:
            if conn.outbox.put(packed, conn.try_send):
                self._queued += 1
        except Closed:
            pass  # the client is gone; its reader drops the connection
        return whole

    async def flush(self) -> None:
        """Wait until every request in flight has been answered and every answer handed
        to the link (e.g. before a draining node cancels its endpoint).  Bound it with a
        timeout: a handler that never finishes keeps it waiting."""
        while self._inflight or self._queued:
            await self._wait_room()

    async def _wait_room(self) -> None:
        if self._room.is_set():
            self._room = trio.Event()
        await self._room.wait()

    async def _writer(self, conn: Connection) -> None:
        while True:
            await conn.outbox.wait()
            send = conn.send
            if send is None:
                return
            try:
                if conn.flush is not None:
                    await conn.flush()
                for frame, count in conn.outbox.frames():
                    self._queued -= count
                    guard = conn.guard
                    if guard is not None:
                        frame = guard.seal(frame)
                    await send(frame)
            except Closed:
                return  # that client is gone; _drop cancels its handlers
            self._room.set()


__all__ = ["Deferred", "FrameGuard", "Handler", "Request", "RpcServer", "Stream"]
