"""The websocket under a Socket.IO session: wsproto on the TCP stream, with no task of
its own and writes in batches.

trio-websocket (Sockend's own protocol uses it) gives every connection a reader task
and a memory channel, and every message its own lock, frame and ``send``.  A Socket.IO
session already has a reader and a writer, and its writer usually holds several
messages (acks, events) when it wakes: here the reader parses in the caller's task
(wsproto, which also does the handshake and answers pings), and the writer sends
everything it has in one ``send_all``.  A server's frames are not masked, so they are
built directly (:func:`ws_frame`): the frames of a published event are built once and
the same bytes go to every client of the namespace.
"""
from __future__ import annotations

import struct
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Request,
                            TextMessage)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from sockend.engineio import Message as EngineMessage

MAX_READ = 65536


class WebSocketClosed(Exception):
    """The websocket is closed; ``code`` says why (1006: without a close frame)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"websocket closed ({code})")
        self.code = code


def ws_frame(message: EngineMessage) -> bytes:
    """One unfragmented, unmasked server frame: text for ``str``, binary for ``bytes``."""
    if isinstance(message, str):
        payload, first = message.encode(), 0x81
    else:
        payload, first = message, 0x82
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


class SioWebSocket:
    def __init__(self, stream: trio.abc.Stream, conn: WSConnection, max_message_size: int) -> None:
        self._stream = stream
        self._conn = conn
        self._max = max_message_size
        self._parts: list[str | bytes] = []
        self._size = 0
        self._send_lock = trio.StrictFIFOLock()   # the reader answers pings, the writer writes
        self.closed = False

    @classmethod
    async def accept(cls, stream: trio.abc.Stream, head_bytes: bytes, max_message_size: int) -> "SioWebSocket | None":
        """Complete the upgrade of a request whose bytes (head and anything after) were
        read already; None when they are not a websocket handshake."""
        conn = WSConnection(ConnectionType.SERVER)
        try:
            conn.receive_data(head_bytes)
            for event in conn.events():
                if isinstance(event, Request):
                    await stream.send_all(conn.send(AcceptConnection()))
                    return cls(stream, conn, max_message_size)
        except (LocalProtocolError, RemoteProtocolError):
            return None
        return None

    async def receive(self) -> list[EngineMessage]:
        """The next complete messages (at least one).  Raises WebSocketClosed."""
        while True:
            out: list[EngineMessage] = []
            try:
                for event in self._conn.events():
                    if isinstance(event, Message):
                        message = self._assemble(event)
                        if message is not None:
                            out.append(message)
                    elif isinstance(event, Ping):
                        await self.send(self._conn.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        await self._answer_close(event)
                        raise WebSocketClosed(event.code)
            except RemoteProtocolError as exc:
                await self.close(exc.event_hint.code if isinstance(exc.event_hint, CloseConnection) else 1002)
                raise WebSocketClosed(1002) from None
            if out:
                return out
            try:
                data = await self._stream.receive_some(MAX_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = True
                raise WebSocketClosed(1006)
            self._conn.receive_data(bytes(data))

    def _assemble(self, event: Message[Any]) -> EngineMessage | None:
        data = event.data
        self._size += len(data)
        if self._size > self._max:
            raise _TooBig()
        if event.message_finished and not self._parts:
            self._size = 0
            return data if isinstance(event, TextMessage) else bytes(data)
        self._parts.append(data)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        if isinstance(event, BytesMessage):
            return b"".join(bytes(p) for p in parts)   # type: ignore[arg-type]
        return "".join(parts)   # type: ignore[arg-type]

    async def send(self, data: bytes) -> None:
        """Write frames (raises WebSocketClosed once the peer is gone)."""
        if self.closed:
            raise WebSocketClosed(1006)
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed = True
                raise WebSocketClosed(1006) from None

    async def _answer_close(self, event: CloseConnection) -> None:
        try:
            await self.send(self._conn.send(event.response()))
        except (WebSocketClosed, LocalProtocolError):
            pass
        self.closed = True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        try:
            await self.send(self._conn.send(CloseConnection(code=code, reason=reason)))
        except (WebSocketClosed, LocalProtocolError):
            pass
        self.closed = True


class _TooBig(Exception):
    """A message over the limit (the reader closes with 1009)."""


async def receive_or_close(ws: SioWebSocket) -> list[EngineMessage]:
    """:meth:`SioWebSocket.receive`, closing with 1009 a message over the limit."""
    try:
        return await ws.receive()
    except _TooBig:
        await ws.close(1009, "message too big")
        raise WebSocketClosed(1009) from None
