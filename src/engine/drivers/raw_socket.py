"""``raw-socket-server``: plain TCP for clients with no nng at all (``nc`` works).

Options: ``endpoint`` (``host:port``), ``framing`` (``line``, the default, or
``length-prefixed``: a 4-byte big-endian length then that many bytes), ``max-frame``
(bytes, default 1 MiB; a longer frame gets an error reply and the connection closes).

Each frame is one job; the reply goes back on the same connection, in request order,
so a client may pipeline.  The exact bytes (see docs/drivers.md):

line framing
    request: one line of UTF-8 text (``\\n`` or ``\\r\\n``), given to the handler as a str.
    reply:   one line: the result as text (a str without newlines as-is, anything else
             as JSON), or ``ERROR <code>: <message>``.
length-prefixed framing
    request: the frame's bytes, given to the handler as bytes.
    reply:   a frame whose first byte says what follows: ``0x00`` raw bytes (the
             result was bytes or str, UTF-8), ``0x01`` msgpack of any other result,
             ``0x02`` an error as UTF-8 ``<code>: <message>``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import trio
from transport.bind_hosts import bind_host
from transport.codec import pack
from transport.errors import BadMessage, CodecError, RemoteError, TransportError
from transport.streams import cut_frames

from engine.errors import DriverError
from engine.drivers.base import NO_ROOM, Driver, DriverHost, run_job
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_number, opt_str, parse_host_port
from engine.drivers.registry import register

PIPELINE_DEPTH = 64   # replies pending per connection before we stop reading it
READ_SIZE = 64 * 1024


class FrameTooLarge(Exception):
    pass


class Framer(Protocol):
    """Pure: bytes as they arrive in, complete frames out (raises FrameTooLarge)."""

    def feed(self, data: bytes) -> list[bytes]: ...


class LineFramer:
    """Pure: bytes in, complete lines out (without their line ending)."""

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            frames.append(line[:-1] if line.endswith(b"\r") else line)
        # The partial line may end in the "\r" of a "\r\n" whose "\n" is still to come.
        partial = len(self.buffer) - self.buffer.endswith(b"\r")
        if partial > self.max_frame or any(len(f) > self.max_frame for f in frames):
            raise FrameTooLarge(f"line longer than {self.max_frame} bytes")
        return frames


class LengthPrefixedFramer:
    """Pure: bytes in, complete length-prefixed frames out: the engine's own stream
    framing (:func:`transport.streams.cut_frames`), with this driver's ``max-frame``."""

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        try:
            return cut_frames(self.buffer, self.max_frame)
        except CodecError as exc:  # a length over max_frame
            raise FrameTooLarge(str(exc)) from None


def encode_line_reply(value: Any = None, error: RemoteError | None = None) -> bytes:
    if error is not None:
        text = f"ERROR {error.code}: {error.message or error.type}".replace("\n", " ")
    elif isinstance(value, str) and "\n" not in value:
        text = value
    elif isinstance(value, (bytes, bytearray)) and b"\n" not in value:
        return bytes(value) + b"\n"
    else:
        text = json.dumps(value, ensure_ascii=False, default=_json_fallback)
    return text.encode("utf-8") + b"\n"


def encode_frame_reply(value: Any = None, error: RemoteError | None = None) -> bytes:
    if error is not None:
        body = b"\x02" + f"{error.code}: {error.message or error.type}".encode("utf-8")
    elif isinstance(value, (bytes, bytearray)):
        body = b"\x00" + bytes(value)
    elif isinstance(value, str):
        body = b"\x00" + value.encode("utf-8")
    else:
        try:
            body = b"\x01" + pack(value)
        except CodecError as exc:
            return encode_frame_reply(error=BadMessage(f"result could not be encoded: {exc}"))
    return len(body).to_bytes(4, "big") + body


def _json_fallback(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return repr(value)


@dataclass(frozen=True)
class RawSocketOptions:
    host: str
    port: int
    framing: str = "line"
    max_frame: int = 1 << 20


class _Pending:
    """One reply slot, filled by the job's task, written by the connection's writer in order."""

    __slots__ = ("ready", "data")

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.data = b""


@register("raw-socket-server")
class RawSocketServer(Driver[RawSocketOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.address: tuple[str, int] | None = None
        self.connections = 0
        self.resets = 0          # connections the client reset before all replies went out
        line = self.options.framing == "line"
        self._framer: Callable[[int], Framer] = LineFramer if line else LengthPrefixedFramer
        self._encode = encode_line_reply if line else encode_frame_reply

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> RawSocketOptions:
        check_keys(raw, ctx, ["endpoint", "framing", "max-frame"])
        host, port = parse_host_port(opt_str(raw, ctx, "endpoint"), ctx, "endpoint")
        framing = opt_str(raw, ctx, "framing", default="line", choices=("line", "length-prefixed"))
        max_frame = opt_number(raw, ctx, "max-frame", default=1 << 20, minimum=1, integer=True)
        return RawSocketOptions(host=host, port=port, framing=framing, max_frame=max_frame)

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.options.port,
                                                      host=bind_host(self.options.host))
        except (OSError, TransportError) as exc:
            raise DriverError(f"cannot listen on {self.options.host}:{self.options.port}: {exc}") from None
        self.address = listeners[0].socket.getsockname()[:2]
        task_status.started(self.address)

        async def handle(stream: trio.SocketStream) -> None:
            await self._connection(app, stream)

        await trio.serve_listeners(handle, listeners)

    async def _connection(self, app: DriverHost, stream: trio.SocketStream) -> None:
        self.connections += 1
        send, receive = trio.open_memory_channel[_Pending](PIPELINE_DEPTH)
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream, receive, nursery.cancel_scope)
                async with send:
                    await self._reader(app, stream, send, nursery)
        except* trio.BrokenResourceError:
            # The client reset the connection (the reader or the writer saw it, inside
            # the nursery, hence except*); its pending replies have nowhere to go.  One
            # client's reset must never reach serve_listeners: that would stop the app.
            self.resets += 1
        finally:
            self.connections -= 1

    async def _reader(self, app: DriverHost, stream: trio.SocketStream,
                      send: trio.MemorySendChannel[_Pending], nursery: trio.Nursery) -> None:
        framer = self._framer(self.options.max_frame)
        while data := await stream.receive_some(READ_SIZE):
            try:
                frames = framer.feed(data)
            except FrameTooLarge as exc:
                slot = _Pending()
                slot.data = self._encode(error=BadMessage(str(exc)))
                slot.ready.set()
                await send.send(slot)
                return  # the stream cannot be re-synchronised: answer, then close
            for frame in frames:
                slot = _Pending()
                await send.send(slot)   # blocks when PIPELINE_DEPTH replies are pending
                nursery.start_soon(self._serve, app, frame, slot)

    async def _writer(self, stream: trio.SocketStream, receive: trio.MemoryReceiveChannel[_Pending],
                      scope: trio.CancelScope) -> None:
        async with receive:
            async for slot in receive:
                await slot.ready.wait()
                await stream.send_all(slot.data)
        scope.cancel()  # all answered and the client sent EOF: close

    async def _serve(self, app: DriverHost, frame: bytes, slot: _Pending) -> None:
        self.stats.ticks += 1
        slot.data = await self._reply(app, frame)
        slot.ready.set()

    async def _reply(self, app: DriverHost, frame: bytes) -> bytes:
        if self.options.framing == "line":
            try:
                payload: Any = frame.decode("utf-8")
            except UnicodeDecodeError:
                err = BadMessage("line is not valid UTF-8")
                self.stats.failed(err)
                return self._encode(error=err)
        else:
            payload = frame
        try:
            job = app.submit(self.spec.emit, payload)
        except NO_ROOM as exc:
            self.stats.skipped += 1
            return self._encode(error=exc)
        self.stats.submitted += 1
        try:
            return self._encode(await run_job(job, self.stats))
        except RemoteError as exc:
            return self._encode(error=exc)

    def details(self) -> dict[str, Any]:
        host, port = self.address or (self.options.host, self.options.port)
        return {"endpoint": f"{host}:{port}", "framing": self.options.framing,
                "connections": self.connections, "resets": self.resets}
