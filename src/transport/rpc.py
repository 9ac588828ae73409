"""Request/response with streamed replies over nng.

Shared by the engine's control endpoint, the ``native-server`` driver and the mesh
Requester/Responder.  One :class:`RpcServer` listens on a polyamorous Pair1 socket and
serves many :class:`RpcClient` dialers; every frame is a batch of envelopes
(:mod:`transport.codec`):

- client → server ``REQUEST sid [target, event, payload]``, ``CANCEL sid``;
- server → client, on the same sid, exactly one of ``RESULT value``,
  ``CHUNK item``… ``CHOKE``, or ``ERROR {code,type,message,retryable}``
  (a stream may also end with ``ERROR``).

A handler is ``async def handler(req: Request) -> Any``: its return value is the
``RESULT``; returning :class:`Stream` (any async iterable) streams ``CHUNK``s and a
``CHOKE``; raising sends ``ERROR`` (a :class:`~transport.errors.RemoteError` keeps its
code, anything else becomes a ``HandlerError`` with the exception's type and message).
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable, Protocol

import pynng
import trio

from .codec import Envelope, Kind, decode, encode
from .errors import (
    BadMessage,
    Closed,
    CodecError,
    QueueFull,
    RemoteError,
    TimeoutError_,
    TransportError,
    Unreachable,
    body_to_error,
    error_to_body,
)
from .sockets import TrioSocket, bound_address

MAX_BATCH = 512


class FrameGuard(Protocol):
    """Optional frame authentication (the mesh's shared secret): ``seal`` wraps an
    outgoing frame, ``open`` unwraps an incoming one or raises CodecError."""

    def seal(self, frame: bytes) -> bytes: ...
    def open(self, frame: bytes) -> bytes: ...


@dataclass(slots=True)
class Request:
    sid: int
    target: str
    event: str
    payload: Any
    peer: int  # the nng pipe id of the client connection


class Stream:
    """Return this from a handler to stream ``items`` as CHUNKs then CHOKE."""

    __slots__ = ("items",)

    def __init__(self, items: AsyncIterable[Any]):
        self.items = items


Handler = Callable[[Request], Awaitable[Any]]


def _listen_error(address: str, exc: Exception) -> TransportError:
    return TransportError(f"cannot listen on {address}: {exc}")


class RpcServer:
    """Serve requests from many clients; each request runs as its own task."""

    def __init__(self, address: str, handler: Handler, *, max_inflight: int = 10_000,
                 guard: FrameGuard | None = None, high_water: int = 8192):
        self.requested_address = address
        self.address: str | None = None
        self.handler = handler
        self.max_inflight = max_inflight
        self.guard = guard
        self.high_water = high_water
        self._sock: TrioSocket | None = None
        self._outbox: dict[int, tuple[pynng.Pipe, list[Envelope]]] = {}
        self._queued = 0
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._running: dict[tuple[int, int], trio.CancelScope] = {}
        self.served = 0
        self.failed = 0
        self.bad_frames = 0
        self.refused = 0

    @property
    def inflight(self) -> int:
        return len(self._running)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raw = pynng.Pair1(polyamorous=True)
        try:
            raw.listen(self.requested_address)
        except pynng.NNGException as exc:
            raw.close()
            raise _listen_error(self.requested_address, exc) from None
        self._sock = sock = TrioSocket(raw)
        self.address = bound_address(raw)
        try:
            async with trio.open_nursery() as nursery:
                sock.on_pipe_event(removed=self._peer_gone)
                nursery.start_soon(self._writer)
                task_status.started(self.address)
                await self._reader(nursery)
        finally:
            sock.close()

    def _peer_gone(self, pipe: pynng.Pipe) -> None:
        # Nobody is left to read the answers: stop the work done for that client.
        for (peer, _sid), scope in list(self._running.items()):
            if peer == pipe.id:
                scope.cancel()
        self._outbox.pop(pipe.id, None)

    async def _reader(self, nursery: trio.Nursery) -> None:
        sock = self._sock
        while True:
            msg = await sock.recv_msg()
            frame = msg.bytes
            try:
                if self.guard is not None:
                    frame = self.guard.open(frame)
                envelopes = decode(frame)
            except CodecError:
                self.bad_frames += 1
                continue
            pipe = msg.pipe
            for kind, sid, body in envelopes:
                if kind == Kind.REQUEST:
                    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[1], str)):
                        self._emit(pipe, Kind.ERROR, sid, error_to_body(
                            BadMessage("REQUEST body must be [target, event, payload]")))
                        continue
                    if len(self._running) >= self.max_inflight:
                        self.refused += 1
                        self._emit(pipe, Kind.ERROR, sid, error_to_body(
                            QueueFull(f"server has {self.max_inflight} requests in flight")))
                        continue
                    scope = trio.CancelScope()
                    self._running[(pipe.id, sid)] = scope
                    req = Request(sid, body[0] if isinstance(body[0], str) else "", body[1], body[2], pipe.id)
                    nursery.start_soon(self._serve, pipe, req, scope)
                elif kind == Kind.CANCEL:
                    scope = self._running.get((pipe.id, sid))
                    if scope is not None:
                        scope.cancel()
                # other kinds from a client are meaningless: ignore, like unknown frames

    async def _serve(self, pipe: pynng.Pipe, req: Request, scope: trio.CancelScope) -> None:
        key = (pipe.id, req.sid)
        try:
            with scope:
                try:
                    result = await self.handler(req)
                    if isinstance(result, Stream):
                        async for item in result.items:
                            self._emit(pipe, Kind.CHUNK, req.sid, item)
                            if self._queued >= self.high_water:
                                await self._wait_room()
                        self._emit(pipe, Kind.CHOKE, req.sid, None)
                    else:
                        self._emit(pipe, Kind.RESULT, req.sid, result)
                    self.served += 1
                except trio.Cancelled:
                    raise
                except Exception as exc:  # the handler's failure is the caller's answer
                    self.failed += 1
                    self._emit(pipe, Kind.ERROR, req.sid, error_to_body(exc))
        finally:
            self._running.pop(key, None)

    def _emit(self, pipe: pynng.Pipe, kind: int, sid: int, body: Any) -> None:
        slot = self._outbox.get(pipe.id)
        if slot is None:
            slot = self._outbox[pipe.id] = (pipe, [])
        slot[1].append(Envelope(kind, sid, body))
        self._queued += 1
        self._wakeup.set()

    async def _wait_room(self) -> None:
        if self._room.is_set():
            self._room = trio.Event()
        await self._room.wait()

    async def _writer(self) -> None:
        sock = self._sock
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._outbox:
                outbox, self._outbox = self._outbox, {}
                for pipe, envelopes in outbox.values():
                    self._queued -= len(envelopes)
                    for start in range(0, len(envelopes), MAX_BATCH):
                        frame = _encode_salvaging(envelopes[start:start + MAX_BATCH])
                        if self.guard is not None:
                            frame = self.guard.seal(frame)
                        try:
                            await sock.send_msg(pynng.Message(frame, pipe))
                        except pynng.NNGException:
                            break  # that client is gone; its handlers were cancelled
            self._room.set()


def _encode_salvaging(envelopes: list[Envelope]) -> bytes:
    """Encode a batch; a reply msgpack cannot carry becomes an ERROR for its caller
    instead of taking the whole batch down."""
    try:
        return encode(envelopes)
    except CodecError:
        fixed = []
        for env in envelopes:
            try:
                encode((env,))
                fixed.append(env)
            except CodecError as exc:
                fixed.append(Envelope(Kind.ERROR, env.sid, error_to_body(
                    BadMessage(f"reply could not be encoded: {exc}"))))
        return encode(fixed)


class _Pending:
    """The client side of one request: replies arrive here from the reader task."""

    __slots__ = ("items", "done", "error", "streamed", "changed")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.done = False
        self.error: RemoteError | None = None
        self.streamed = False
        self.changed = trio.Event()

    def push(self, kind: int, body: Any) -> bool:
        """Record one reply envelope; True when the request is finished."""
        if kind == Kind.RESULT:
            self.items.append(body)
            self.done = True
        elif kind == Kind.CHUNK:
            self.streamed = True
            self.items.append(body)
        elif kind == Kind.CHOKE:
            self.streamed = True
            self.done = True
        elif kind == Kind.ERROR:
            self.error = body_to_error(body)
            self.done = True
        else:
            return False
        self.changed.set()
        return self.done

    def fail(self, error: RemoteError) -> None:
        if not self.done:
            self.error = error
            self.done = True
            self.changed.set()

    async def wait(self) -> None:
        await self.changed.wait()
        self.changed = trio.Event()


class RpcClient:
    """Calls to one RpcServer, multiplexed by stream id over one Pair1 connection.

    Use as ``async with RpcClient(address) as client`` or ``await nursery.start(client.run)``.
    When the connection drops, every call in flight fails with :class:`Unreachable`
    (retryable) rather than waiting for an answer that cannot come.
    """

    def __init__(self, address: str, *, timeout: float | None = None,
                 guard: FrameGuard | None = None):
        self.address = address
        self.default_timeout = timeout
        self.guard = guard
        self._sids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._outbox: list[Envelope] = []
        self._wakeup = trio.Event()
        self._sock: TrioSocket | None = None
        self._connected = trio.Event()
        self._cancel_scope: trio.CancelScope | None = None
        self._closed = False

    # -- lifetime -----------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raw = pynng.Pair1()
        self._sock = sock = TrioSocket(raw)
        try:
            with trio.CancelScope() as self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    sock.on_pipe_event(added=self._pipe_added, removed=self._pipe_removed)
                    raw.dial(self.address, block=False)
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._reader)
                    task_status.started(self)
        finally:
            self._closed = True
            sock.close()
            for pending in self._pending.values():
                pending.fail(Unreachable(f"client to {self.address} closed"))
            self._pending.clear()

    async def __aenter__(self) -> "RpcClient":
        self._nursery_cm = trio.open_nursery()
        nursery = await self._nursery_cm.__aenter__()
        try:
            await nursery.start(self.run)
        except BaseException as exc:
            await self._nursery_cm.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        self.close()
        return await self._nursery_cm.__aexit__(*exc_info)

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

    def _pipe_added(self, pipe: pynng.Pipe) -> None:
        self._connected.set()

    def _pipe_removed(self, pipe: pynng.Pipe) -> None:
        self._connected = trio.Event()
        lost = Unreachable(f"connection to {self.address} lost")
        for pending in self._pending.values():
            pending.fail(lost)
        self._pending.clear()

    # -- I/O tasks ----------------------------------------------------------------
    async def _writer(self) -> None:
        sock = self._sock
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._outbox:
                batch = self._outbox[:MAX_BATCH]
                del self._outbox[:MAX_BATCH]
                frame = encode(batch)
                if self.guard is not None:
                    frame = self.guard.seal(frame)
                await sock.send(frame)

    async def _reader(self) -> None:
        sock = self._sock
        pending = self._pending
        while True:
            frame = await sock.recv()
            try:
                if self.guard is not None:
                    frame = self.guard.open(frame)
                envelopes = decode(frame)
            except CodecError:
                continue  # a corrupt frame answers nobody; its callers time out
            for kind, sid, body in envelopes:
                slot = pending.get(sid)
                if slot is not None and slot.push(kind, body):
                    del pending[sid]

    # -- calls ----------------------------------------------------------------------
    def _start(self, target: str, event: str, payload: Any) -> tuple[int, _Pending]:
        if self._closed or self._sock is None:
            raise Closed(f"client to {self.address} is not running")
        sid = next(self._sids)
        slot = _Pending()
        self._pending[sid] = slot
        try:
            encode(((Kind.REQUEST, sid, (target, event, payload)),))
        except CodecError as exc:
            del self._pending[sid]
            raise BadMessage(f"request payload cannot be encoded: {exc}") from None
        self._outbox.append(Envelope(Kind.REQUEST, sid, (target, event, payload)))
        self._wakeup.set()
        return sid, slot

    def _abandon(self, sid: int) -> None:
        if self._pending.pop(sid, None) is not None and not self._closed:
            self._outbox.append(Envelope(Kind.CANCEL, sid, None))
            self._wakeup.set()

    def _timeout(self, timeout: float | None) -> float:
        t = self.default_timeout if timeout is None else timeout
        return float("inf") if t is None else t

    async def call(self, target: str, event: str, payload: Any = None, *,
                   timeout: float | None = None) -> Any:
        """One request; the RESULT value, or the list of chunks of a streamed reply."""
        sid, slot = self._start(target, event, payload)
        limit = self._timeout(timeout)
        try:
            with trio.move_on_after(limit):
                while not slot.done:
                    await slot.wait()
                if slot.error is not None:
                    raise slot.error
                return list(slot.items) if slot.streamed else slot.items[0]
        finally:
            if not slot.done:
                self._abandon(sid)
        raise TimeoutError_(f"no answer to {target}/{event} from {self.address} within {limit:g} s")

    def stream(self, target: str, event: str, payload: Any = None, *,
               timeout: float | None = None) -> "ReplyStream":
        """Iterate the reply's chunks as they arrive (a RESULT is one chunk).
        ``timeout`` bounds the wait for each next chunk."""
        return ReplyStream(self, target, event, payload, self._timeout(timeout))


class ReplyStream:
    """``async for chunk in client.stream(...)``; also an async context manager that
    cancels the request on the server if left early."""

    def __init__(self, client: RpcClient, target: str, event: str, payload: Any, timeout: float):
        self._client = client
        self._args = (target, event, payload)
        self._timeout = timeout
        self._sid: int | None = None
        self._slot: _Pending | None = None

    async def __aenter__(self) -> "ReplyStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.aclose()

    def aclose(self) -> None:
        if self._slot is not None and not self._slot.done:
            self._client._abandon(self._sid)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        self._sid, slot = self._client._start(*self._args)
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
