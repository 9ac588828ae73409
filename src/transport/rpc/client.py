"""The client half of :mod:`transport.rpc`: calls multiplexed by stream id over one link.

Over nng the dialer reconnects by itself; over a framed stream this client does, with
backoff.  Either way, when the link drops every call in flight fails with
:class:`Unreachable` (retryable) instead of waiting for an answer that cannot come,
and calls made while disconnected wait (bounded by their timeout) for the link.

A server that hangs up on this client says why first, with ``ERROR`` on sid 0 (too
many connections, idle, a frame it could not read): every call in flight fails with
that error, and the next connection waits a backoff step.  Nothing bigger than
``max_message`` (default 16 MiB) is sent or read: a request or chunk over it fails
its caller with ``bad-message`` at once (send bulk data as chunks), and frames of
many requests are cut to fit.

Over ``tls+tcp://`` (``ssl_context=``, :mod:`transport.tls`) a failed handshake (the
server's certificate not of our CA, ours refused by it) fails every call in flight with
:class:`~transport.tls.TlsHandshakeError` (an ``Unreachable``) and is logged once per
distinct reason; the client keeps trying, backing off, in case the server is fixed.
"""
from __future__ import annotations

import itertools
import logging
import math
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import trio

from transport.codec import DEFAULT_MAX_MESSAGE, Kind, decode_lists, encode_envelope
from transport.errors import BadMessage, Closed, CodecError, RemoteError, TimeoutError_, Unreachable, body_to_error
from transport._links import Link, StreamLink, connect_stream, is_stream, nng_url
from transport._outbox import Outbox, TrySend
from transport.rpc.connection import SEAL_ROOM, check_max_message, max_envelope
from transport.rpc.handlers import FrameGuard, sealing
from transport.inbound import SendWindow
from transport.service import Service
from transport._spin import SpinPolicy, spin_until
from transport.tls import TlsHandshakeError, check_context

if TYPE_CHECKING:
    from transport.sockets import TrioSocket

_INF = float("inf")
# Plain ints for the hot paths: an enum member lookup costs more than the comparison.
_REQUEST, _RESULT, _CHUNK = int(Kind.REQUEST), int(Kind.RESULT), int(Kind.CHUNK)
_CHOKE, _CREDIT, _ERROR = int(Kind.CHOKE), int(Kind.CREDIT), int(Kind.ERROR)
_park = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule
SWEEP_IDLE = 0.1  # s: the deadline sweeper's shortest sleep when no call is overdue
RECONNECT_MIN = 0.01
RECONNECT_MAX = 1.0
log = logging.getLogger(__name__)


class PendingCall:
    """The client side of one request: replies arrive here from the reader task.

    :meth:`RpcClient.start` returns one, so a caller can keep many requests in flight
    from one task: ``while not call.done: await call.wait()``, then
    :meth:`outcome`.  The caller parks on the call itself (trio's lowlevel
    park/reschedule) rather than on a fresh ``trio.Event`` per wait: at tens of
    thousands of calls a second the Event and its parking lot are a visible share of
    the cost."""

    __slots__ = ("items", "done", "error", "streamed", "waiter", "deadline", "expired",
                 "client", "sid", "event", "limit", "window")

    def __init__(self, client: "RpcClient", sid: int, event: str) -> None:
        self.items: deque[Any] = deque()
        self.done = False
        self.error: RemoteError | None = None
        self.streamed = False
        self.waiter: trio.lowlevel.Task | None = None  # the task parked in wait(), if any
        self.deadline = _INF            # when the deadline sweeper gives up on it
        self.expired = False            # the sweeper gave up (outcome() raises TimeoutError_)
        self.client = client
        self.sid = sid
        self.event = event
        self.limit = _INF
        self.window: SendWindow | None = None  # a chunked request: chunks it may still send

    def outcome(self) -> Any:
        """The answer of a finished call: the RESULT value, or the list of chunks of a
        streamed reply; raises its error, or TimeoutError_ if it expired."""
        if self.expired:
            raise TimeoutError_(f"no answer to {self.event!r} from {self.client.address} "
                                f"within {self.limit:g} s")
        if self.error is not None:
            raise self.error
        if not self.done:
            raise RuntimeError("outcome() of a call still in flight")
        return list(self.items) if self.streamed else self.items[0]

    def cancel(self) -> None:
        """Give up on it: the server is told to stop and the call is forgotten (it will
        not finish, so nobody should wait on it after this)."""
        if not self.done:
            self.client._abandon(self.sid)

    def push(self, kind: int, body: Any) -> bool:
        """Record one reply envelope; True when the request is finished."""
        if kind == _RESULT:
            self.items.append(body)
            self.done = True
        elif kind == _CHUNK:
            self.streamed = True
            self.items.append(body)
        elif kind == Kind.CHOKE:
            self.streamed = True
            self.done = True
        elif kind == Kind.ERROR:
            self.error = body_to_error(body)
            self.done = True
        elif kind == _CREDIT:
            if self.window is not None:
                self.window.credit(body)
            return False
        else:
            return False
        self._wake()
        return self.done

    def fail(self, error: RemoteError) -> None:
        if not self.done:
            self.error = error
            self.done = True
            self._wake()

    def expire(self) -> None:
        if not self.done:
            self.expired = True
            self.done = True
            self._wake()

    def _wake(self) -> None:
        if self.done and self.window is not None:
            self.window.credit(1)  # a sender waiting for room must see the call is over
        task = self.waiter
        if task is not None:
            self.waiter = None
            self.client._waking += 1
            _reschedule(task)

    async def wait(self) -> None:
        """Until the next push/fail (returns at once if done)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        self.waiter = trio.lowlevel.current_task()
        await _park(self._abort)
        self.client._waking -= 1  # only _wake resumes us without raising

    def _abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


class RpcClient(Service):
    """Calls to one RpcServer.

    Use as ``async with RpcClient(address) as client`` or ``await nursery.start(client.run)``.
    ``spin=False``: a lone :meth:`call` never polls for its answer (transport/_spin.py),
    for a process that would rather spend no CPU waiting than answer sooner.

    ``bad_frames`` counts the frames from the server that could not be read (corrupt,
    or refused by the ``guard``); the first is logged.  The calls they answered are not
    told (nobody knows which they were): they time out, or fail when the link drops.
    ``refusals`` counts the times the server hung up saying why (``last_refusal``).
    """

    def __init__(self, address: str, *, timeout: float | None = None,
                 guard: FrameGuard | None = None, spin: bool = True,
                 max_message: int = DEFAULT_MAX_MESSAGE,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context``: a client-side context, required by (and only by) a
        ``tls+tcp://`` address; :class:`~transport.tls.TlsConfigError` otherwise."""
        check_context(address, ssl_context, server_side=False)
        self.ssl_context = ssl_context
        self.address = address
        self.default_timeout = timeout
        self.guard = guard
        self.max_message = check_max_message(max_message, "RpcClient")
        self._max_envelope = max_envelope(max_message)
        self._sids = itertools.count(1)
        self._pending: dict[int, PendingCall] = {}
        self._outbox = Outbox(max_message - SEAL_ROOM)
        # What frames are sent through while connected; what it can do besides is
        # decided once, as it comes up (nothing per message asks the link what it is):
        self._link: Link | None = None
        self._stream: StreamLink | None = None  # the same link when it is a framed stream
        self._direct: TrySend | None = None  # its direct write (sealed), for a lone request
        self._connected = trio.Event()
        self._cancel_scope: trio.CancelScope | None = None
        self._running = False
        self._closed = False
        # One deadline sweeper for every call (instead of a CancelScope per call):
        # it sleeps until the earliest deadline it knows of and expires overdue calls.
        self._next_deadline = _INF
        self._last_limit = _INF
        self._sweeper_wakeup = trio.Event()
        self.spin = SpinPolicy() if spin else None
        # Callers woken by their answers that have not run yet.  trio takes a whole
        # batch of runnable tasks off its run queue at once, so they are not seen by
        # spin.quiet(), yet they are about to start calls of their own: a call is only
        # "the only one in flight" when none is pending.
        self._waking = 0
        self.bad_frames = 0
        self.refusals = 0
        self.last_refusal: RemoteError | None = None
        self.tls_failures = 0  # failed TLS handshakes (each distinct reason logged once)
        self.last_tls_error: TlsHandshakeError | None = None

    # -- lifetime -----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[RpcClient] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        self._running = True
        try:
            with trio.CancelScope() as self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._sweep_deadlines)
                    if is_stream(self.address):
                        nursery.start_soon(self._keep_stream_connected)
                        task_status.started(self)
                    else:
                        await self._run_nng(task_status)
        finally:
            self._closed = True
            self._fail_all(Unreachable(f"client to {self.address} closed"))

    def close(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _stream_up(self, stream: StreamLink) -> None:
        self._link = self._stream = stream
        self._direct = sealing(stream.try_send_nowait, self.guard)
        self._connected.set()
        self._outbox.wake()  # anything queued while we were away can go now

    def _link_down(self, error: RemoteError | None = None) -> None:
        self._link = self._stream = self._direct = None
        if self._connected.is_set():
            self._connected = trio.Event()
        self._fail_all(error or Unreachable(f"connection to {self.address} lost"))

    def _fail_all(self, error: RemoteError) -> None:
        for pending in self._pending.values():
            pending.fail(error)
        self._pending.clear()

    # -- links ------------------------------------------------------------------------
    async def _run_nng(self, task_status: trio.TaskStatus[RpcClient]) -> None:
        import pynng  # only for nng links (see RpcServer._run_nng)

        from transport.sockets import TrioSocket

        raw = pynng.Pair1(recv_max_size=self.max_message)
        sock = TrioSocket(raw)
        try:
            # nng queues sends until the dialer connects, so the link is "up" for sending
            # at once; `connected` still tracks the real pipe.
            self._link = sock
            sock.on_pipe_event(added=lambda pipe: self._connected.set(),
                               removed=lambda pipe: self._nng_pipe_gone(sock))
            raw.dial(nng_url(self.address), block=False)
            task_status.started(self)
            while True:
                self._on_frame(await sock.recv())
        finally:
            sock.close()

    def _nng_pipe_gone(self, sock: TrioSocket) -> None:
        self._link_down()
        self._link = sock  # the dialer reconnects by itself; keep sending through it

    async def _keep_stream_connected(self) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                stream = await connect_stream(self.address, self.ssl_context)
            except OSError:
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            except TlsHandshakeError as exc:
                self._tls_failed(exc)
                self._fail_all(exc)  # calls waiting for the link: it will not come soon
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            stream.max_message = self.max_message
            refusals, up_at = self.refusals, trio.current_time()
            self._stream_up(stream)
            heard = False  # a frame came on this connection
            lost: RemoteError | None = None
            try:
                while True:
                    for frame in await stream.recv_many():
                        heard = True
                        self._on_frame(frame)
            except Closed as exc:
                if isinstance(exc.__cause__, ssl.SSLError):
                    # e.g. TLS 1.3: the server refuses our certificate after our side
                    # of the handshake is done; its alert is the first thing read.
                    hint = (" (the server hung up: does it trust this client's certificate?)"
                            if isinstance(exc.__cause__, ssl.SSLEOFError) else "")
                    lost = TlsHandshakeError(f"TLS with {self.address} failed: "
                                             f"{exc.__cause__}{hint}")
                    self._tls_failed(lost)
            except CodecError as exc:  # garbage framing: nothing after it can be read
                self._bad_frame(exc)
            finally:
                stream.close()
                self._link_down(lost)
            if self.refusals == refusals and heard and lost is None:
                delay = RECONNECT_MIN
            else:
                # The server hung up saying why (too many connections...), or before a
                # word (not our protocol, not our TLS): not at once, nor in a tight loop.
                if trio.current_time() - up_at > RECONNECT_MAX:
                    delay = RECONNECT_MIN  # (a connection that lived, then idled)
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    def _tls_failed(self, error: TlsHandshakeError) -> None:
        """Counted; logged once per distinct reason (a client retrying a server that
        refuses it would otherwise log once a second)."""
        self.tls_failures += 1
        previous, self.last_tls_error = self.last_tls_error, error
        if previous is None or previous.message != error.message:
            log.warning("%s (further failures alike are only counted, in "
                        "RpcClient.tls_failures)", error.message)

    def _on_frame(self, frame: bytes) -> None:
        try:
            if self.guard is not None:
                frame = self.guard.open(frame)
            envelopes = decode_lists(frame)
        except CodecError as exc:
            self._bad_frame(exc)  # it answers nobody: its callers time out
            return
        pending = self._pending
        for kind, sid, body in envelopes:
            slot = pending.get(sid)
            if slot is not None:
                if slot.push(kind, body):
                    del pending[sid]
            elif sid == 0 and kind == _ERROR:
                self._refused(body_to_error(body))

    def _refused(self, error: RemoteError) -> None:
        """The server is hanging up on this connection and says why: every call in
        flight fails with that (not a bare Unreachable when the link drops next)."""
        self.refusals += 1
        self.last_refusal = error
        if self.refusals == 1:
            log.info("%s closed the connection: %s (further ones are only counted, in "
                     "RpcClient.refusals)", self.address, error)
        self._fail_all(error)

    def _bad_frame(self, exc: CodecError) -> None:
        """A frame from the server that cannot be read: counted, the first logged
        (once per client: a broken peer may send nothing else)."""
        self.bad_frames += 1
        if self.bad_frames == 1:
            log.warning("unreadable frame from %s dropped: %s (further ones are only "
                        "counted, in RpcClient.bad_frames)", self.address, exc)

    async def _writer(self) -> None:
        while True:
            await self._outbox.wait()
            link, stream = self._link, self._stream
            if link is None:
                continue  # _stream_up wakes us again
            if stream is not None:
                await stream.flush()  # the rest of a frame a direct write began
            for frame, _ in self._outbox.frames():
                if self.guard is not None:
                    frame = self.guard.seal(frame)
                try:
                    await link.send(frame)
                except Closed:
                    break  # the reader sees the link go down and fails the calls

    async def _sweep_deadlines(self) -> None:
        while True:
            self._sweeper_wakeup = trio.Event()
            with trio.move_on_at(self._next_deadline):
                await self._sweeper_wakeup.wait()
            now = trio.current_time()
            # Sleep at most one timeout of the latest call (at least SWEEP_IDLE): calls
            # with the same timeout have later deadlines and need not wake us, so quick
            # calls do not wake the sweeper one by one.  (Any call whose deadline is
            # earlier than our wake-up wakes us, so this bound is only an economy.)
            earliest = now + max(self._last_limit, SWEEP_IDLE)
            overdue = []
            for sid, slot in self._pending.items():
                if slot.deadline <= now:
                    overdue.append(sid)
                elif slot.deadline < earliest:
                    earliest = slot.deadline
            self._next_deadline = earliest
            for sid in overdue:
                late = self._pending.get(sid)
                if late is not None:
                    self._abandon(sid)  # tells the server to stop working on it
                    late.expire()

    def _set_deadline(self, slot: PendingCall, limit: float, now: float | None = None) -> None:
        self._last_limit = limit
        slot.deadline = deadline = (trio.current_time() if now is None else now) + limit
        if deadline < self._next_deadline:
            self._next_deadline = deadline
            self._sweeper_wakeup.set()

    # -- calls ----------------------------------------------------------------------
    def _start(self, target: str, event: str, payload: Any,
               chunked: bool = False) -> tuple[int, PendingCall]:
        if self._closed or not self._running:
            raise Closed(f"client to {self.address} is not running")
        sid = next(self._sids)
        body = (target, event, payload, True) if chunked else (target, event, payload)
        try:
            env = encode_envelope(_REQUEST, sid, body)
        except CodecError as exc:
            raise BadMessage(f"request payload cannot be encoded: {exc}") from None
        if len(env) > self._max_envelope:
            raise BadMessage(f"a request of {len(env)} bytes is over the limit "
                             f"({self._max_envelope} bytes: max_message): send the data as "
                             "chunks (call(..., chunks=...))")
        # A lone request goes out at once: one scheduler pass less of latency.  Not
        # when others are in flight:
        # their callers start the next ones as the answers come in, and those should
        # leave together; sent one by one they would be answered one by one, each
        # frame a wake-up of both processes.
        alone = not self._pending
        slot = self._pending[sid] = PendingCall(self, sid, event)
        if chunked:
            slot.window = SendWindow()
        try:
            self._outbox.put(env, self._direct if alone else None)
        except Closed:  # the link just died: the reader sees it and fails this call Unreachable
            self._outbox.put(env)
        return sid, slot

    def _abandon(self, sid: int) -> None:
        if self._pending.pop(sid, None) is not None and not self._closed:
            self._outbox.put(encode_envelope(Kind.CANCEL, sid, None))

    def _timeout(self, timeout: float | None) -> float:
        t = self.default_timeout if timeout is None else timeout
        return float("inf") if t is None else t

    def hold(self, held: bool) -> None:
        """While held, started requests queue for the writer instead of the first going
        out alone: a caller starting a batch holds, starts them all, releases, and the
        batch leaves as one frame (at once, when the link takes it)."""
        if held:
            self._outbox.held = True
        else:
            try:
                self._outbox.release(self._direct)
            except Closed:
                pass  # the link just died: the reader sees it and fails these calls

    def start(self, target: str, event: str, payload: Any = None, *,
              timeout: float | None = None, now: float | None = None,
              chunked: bool = False) -> PendingCall:
        """Send one request and return at once: many can be in flight from one task
        (see :class:`PendingCall`).  Raises what :meth:`call` raises before sending.
        ``now``: ``trio.current_time()``, if the caller starting a batch has it.
        ``chunked``: the request's chunks follow (:meth:`send_chunks`)."""
        sid, slot = self._start(target, event, payload, chunked)
        slot.limit = limit = self._timeout(timeout)
        if limit != _INF:
            if limit <= 0 or math.isnan(limit):
                slot.expire()
                self._abandon(sid)
            else:
                self._set_deadline(slot, limit, now)
        return slot

    async def call(self, target: str, event: str, payload: Any = None, *,
                   timeout: float | None = None,
                   chunks: Iterable[Any] | AsyncIterable[Any] | None = None) -> Any:
        """One request; the RESULT value, or the list of chunks of a streamed reply.
        ``chunks`` (an iterable or async iterable) makes it a chunked request: they are
        sent after it as the server's handler takes them (transport/inbound.py)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sends nothing
        slot = self.start(target, event, payload, timeout=timeout, chunked=chunks is not None)
        try:
            if chunks is not None:
                await self.send_chunks(slot, chunks)
            await self.finish(slot)
        finally:
            if not slot.done:  # cancelled while waiting
                self._abandon(slot.sid)
        return slot.outcome()

    async def finish(self, slot: PendingCall) -> None:
        """Until ``slot`` (started here) is done: polled for when it is the only call
        in flight and the process is quiet (transport/_spin.py), else parked.  A
        caller cancelled meanwhile should :meth:`PendingCall.cancel` it."""
        spin = self.spin
        if spin is not None and slot.window is None and self._poll_answer(slot, spin):
            if spin.yield_due(perf_counter()):  # answered: keep the answer
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while not slot.done:
            await slot.wait()

    def _poll_answer(self, slot: PendingCall, policy: SpinPolicy) -> bool:
        """Poll the link for the answer to the only call in flight instead of parking,
        when ``policy`` and the rest of the process allow (transport/_spin.py; a
        request that could not go out at once woke the writer, so it is not quiet);
        True if the answer came.  Only a stream link can be polled."""
        stream = self._stream
        if stream is None or slot.done or len(self._pending) != 1 or self._waking:
            return False
        poll = stream.poll_frames

        def step() -> None:
            for frame in poll():  # (perhaps only a late answer to an abandoned call)
                self._on_frame(frame)

        return spin_until(policy, step, lambda: slot.done, stream.fileno())

    async def send_chunks(self, call: PendingCall,
                          chunks: Iterable[Any] | AsyncIterable[Any]) -> None:
        """Send a chunked request's chunks, then CHOKE, never more than the server's
        window ahead; stops early if the call is answered (or fails) meanwhile.
        ``call`` is one :meth:`start` made with ``chunked=True``."""
        window, sid = call.window, call.sid
        if window is None:
            raise ValueError("send_chunks() of a call not started with chunked=True")
        items = chunks.__aiter__() if isinstance(chunks, AsyncIterable) else _aiter(chunks)
        async for item in items:
            await window.wait()
            if call.done:
                return
            window.left -= 1
            try:
                packed = encode_envelope(_CHUNK, sid, item)
            except CodecError as exc:
                self._abandon(sid)
                raise BadMessage(f"request chunk cannot be encoded: {exc}") from None
            if len(packed) > self._max_envelope:
                self._abandon(sid)
                raise BadMessage(f"a chunk of {len(packed)} bytes is over the limit "
                                 f"({self._max_envelope} bytes: max_message): send smaller chunks")
            self._outbox.put(packed)
        if not call.done:
            self._outbox.put(encode_envelope(_CHOKE, sid, None))

    def stream(self, target: str, event: str, payload: Any = None, *,
               timeout: float | None = None) -> "ReplyStream":
        """Iterate the reply's chunks as they arrive (a RESULT is one chunk).
        ``timeout`` bounds the wait for each next chunk."""
        return ReplyStream(self, target, event, payload, self._timeout(timeout))


class ReplyStream:
    """``async for chunk in client.stream(...)``; also an async context manager that
    cancels the request on the server if left early."""

    def __init__(self, client: RpcClient, target: str, event: str, payload: Any,
                 timeout: float) -> None:
        self._client = client
        self._args = (target, event, payload)
        self._timeout = timeout
        self._slot: PendingCall | None = None

    async def __aenter__(self) -> ReplyStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.aclose()

    @property
    def streamed(self) -> bool | None:
        """True once a CHUNK arrived, False once a RESULT did, None before any reply:
        lets a relay tell a single value from a one-chunk stream."""
        slot = self._slot
        if slot is not None and slot.streamed:
            return True
        return False if slot is not None and slot.done else None

    def aclose(self) -> None:
        """Give up on the reply (the server is told), unless it is complete."""
        slot = self._slot
        if slot is not None and not slot.done:
            self._client._abandon(slot.sid)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        _, slot = self._client._start(*self._args)
        self._slot = slot
        try:
            while True:
                if slot.items:
                    yield slot.items.popleft()
                    continue
                if slot.done:
                    if slot.error is not None:
                        raise slot.error
                    return
                with trio.move_on_after(self._timeout) as scope:
                    await slot.wait()
                if scope.cancelled_caught:
                    target, event, _ = self._args
                    raise TimeoutError_(f"no reply to {target}/{event} from "
                                        f"{self._client.address} within {self._timeout:g} s")
        finally:
            self.aclose()


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    """A plain iterable as an async one, with a checkpoint per item."""
    for item in items:
        yield item
        await trio.lowlevel.checkpoint()
