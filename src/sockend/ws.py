"""The server side of a browser's websocket, read by the task that asks for messages.

trio-websocket (what Sockend used) gives every connection a reader task that parses
frames with wsproto and hands each message to ``get_message()`` through a memory
channel, and takes a lock (a scheduler pass) before every write.  Sequential requests
through Sockend (``python -m bench --only sockend``, 2-core VM) spent ~75 µs from a
browser's frame to its request leaving for the mesh and ~36 µs from the answer to its
frame leaving, of ~390 µs per round trip; most of it that reader task, its channel,
wsproto's pure-Python frame parser and the lock.  :class:`ServerWebSocket` (~43 and
~21 µs) does the work in the task that calls :meth:`~ServerWebSocket.get_message`:

- a *plain* frame, what a browser sends (final, masked, text or binary, no extension
  bits, shorter than 64 KiB and ``max_message_size``, valid UTF-8 if text), is cut and
  unmasked here; the first frame that is anything else (a ping, a close, a fragment, a
  bad one) and everything after it go to wsproto, the same protocol engine as before,
  so what it refuses and how (the close codes) is unchanged;
- an unfragmented message is framed here as wsproto frames it (same bytes);
- a write takes the lock without a scheduler pass when nobody holds it.

What Sockend and a browser see is trio-websocket's behaviour: the same handshake answer
(wsproto's), the same ``ConnectionClosed``/``CloseReason``, messages that came before
the peer's close are still returned, a message over ``max_message_size`` (counted as
trio-websocket counts it) closes with 1009, a ping is answered, a peer's close is
answered and the TCP connection closed, :meth:`aclose` sends a close frame and waits
for the peer's.  The differences: nothing is read ahead of the reader (trio-websocket
buffered up to ``message_queue_size`` messages), so a ping or a close is acted on when
the connection's reader next reads (Sockend's always does); an invalid upgrade is
answered and the connection closed at once (trio-websocket then sat out the handshake
timeout); and the reason of a 1007 (bad UTF-8: no close frame is sent, only the server
sees it) may count the bad byte's position from another point.
fuzz/test_sockend_ws_fuzz.py holds both to that, for any frames cut anywhere.
"""
from __future__ import annotations

import codecs
from collections import deque

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Event, Ping, Request,
                            TextMessage)
from wsproto.frame_protocol import CloseReason as CloseCode
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_BYTES = 4096   # read at a time, as trio-websocket
_TEXT, _BINARY = 0x81, 0x82   # the first byte of a final text / binary frame, no RSV bits
_PLAIN = (_TEXT, _BINARY)
_ABNORMAL = CloseCode.ABNORMAL_CLOSURE.value   # 1006


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")()


def _unmask(mask: bytes, payload: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def _frame(first: int, payload: bytes) -> bytes:
    """A server's (unmasked) frame, as wsproto makes it."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def frame(message: str | bytes) -> bytes:
    """One message as a server's frame: built once, it can be sent to many websockets
    (:meth:`ServerWebSocket.send_frames`; Socket.IO's fan-out does)."""
    if isinstance(message, str):
        return _frame(_TEXT, message.encode())
    return _frame(_BINARY, message)


def _reply(conn: WSConnection, event: Event) -> bytes:
    """What wsproto writes for ``event`` now; nothing if it may not be sent any more."""
    try:
        return conn.send(event)
    except LocalProtocolError:
        return b""


async def accept_websocket(stream: trio.abc.Stream, head: bytes, *,
                           max_message_size: int) -> ServerWebSocket | None:
    """Answer the upgrade request whose bytes were already read (``head``): the open
    websocket, or None once an invalid request got wsproto's refusal (a 400 or 426,
    what trio-websocket sent) or the peer hung up.  The caller bounds the time."""
    conn = WSConnection(ConnectionType.SERVER)
    data: bytes | None = head
    while True:
        try:
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, Request):
                    await stream.send_all(conn.send(AcceptConnection()))
                    return ServerWebSocket(stream, conn, max_message_size=max_message_size)
        except RemoteProtocolError as err:
            if err.event_hint is not None:
                await stream.send_all(conn.send(err.event_hint))
            return None
        if data is None:
            return None
        data = bytes(await stream.receive_some(RECEIVE_BYTES)) or None


class ServerWebSocket:
    """An open server-side websocket (from :func:`accept_websocket`).  One task reads
    (:meth:`get_message`); any number may write (:meth:`send_message`)."""

    def __init__(self, stream: trio.abc.Stream, conn: WSConnection, *,
                 max_message_size: int) -> None:
        self._stream = stream
        self._conn = conn
        self._max_message_size = max_message_size
        self._messages: deque[str | bytes] = deque()   # received, not yet returned
        self._parts: list[str | bytes] = []   # a message wsproto delivers in parts
        self._size = 0
        self._plain = True       # every frame so far was plain: cut here, not by wsproto
        self._partial = bytearray()   # the start of a plain frame, the rest still to come
        self._wanted = 0         # ... and its length, once known (else its header's)
        self._text_at = -1       # where its payload starts, if it is a text frame
        self._utf8 = _utf8_decoder()   # ... checked so far (as wsproto checks it)
        self._checked = 0
        self._close_reason: CloseReason | None = None
        self._closing = False    # aclose() began: messages are dropped
        self._closed = trio.Event()   # the close handshake is over, or the stream is gone
        self._stream_closed = False
        self._reading = False
        self._send_lock = trio.StrictFIFOLock()

    @property
    def closed(self) -> CloseReason | None:
        """Why it closed, None while it is open."""
        return self._close_reason

    async def get_message(self) -> str | bytes:
        """The next message; ConnectionClosed once the connection is closed and every
        message received before the peer's close was returned."""
        if self._messages and not self._closing:
            await trio.lowlevel.checkpoint()
            return self._messages.popleft()
        while True:
            if self._close_reason is not None or self._stream_closed:
                await trio.lowlevel.checkpoint()
                raise ConnectionClosed(self._close_reason)
            await self._read()   # (its read is this call's checkpoint)
            if self._messages and not self._closing:
                return self._messages.popleft()

    async def get_messages(self) -> list[str | bytes]:
        """Every message received so far (at least one): a reader that handles a batch
        at a time (Socket.IO's) wakes once for them.  ConnectionClosed as get_message."""
        first = await self.get_message()
        if not self._messages or self._closing:
            return [first]
        out = [first, *self._messages]
        self._messages.clear()
        return out

    async def send_frames(self, data: bytes) -> None:
        """Write frames already built with :func:`frame` (any number, in one write)."""
        if self._close_reason is not None or self._conn.state is not ConnectionState.OPEN:
            raise ConnectionClosed(self._close_reason)
        await self._write(data)

    async def send_message(self, message: str | bytes) -> None:
        if self._close_reason is not None:
            raise ConnectionClosed(self._close_reason)
        if isinstance(message, str):
            first, payload = _TEXT, message.encode()
        elif isinstance(message, bytes):
            first, payload = _BINARY, message
        else:
            raise ValueError("message must be str or bytes")
        if self._conn.state is ConnectionState.OPEN:
            await self._write(_frame(first, payload))
        else:   # closing: wsproto refuses it (ConnectionClosed)
            await self._send(TextMessage(data=message) if isinstance(message, str)
                             else BytesMessage(data=message))

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame, wait for the peer's (the caller bounds the time), close
        the TCP connection.  Nothing to do once closed (by the peer, a message over the
        limit, a broken stream: as trio-websocket, the caller closes that stream)."""
        if self._close_reason is not None:
            return
        self._close_reason = CloseReason(1000, None)   # as trio-websocket, whatever the code
        self._closing = True
        self._messages.clear()
        try:
            if self._conn.state is ConnectionState.OPEN:
                await self._send(CloseConnection(code=code, reason=reason))
            while not self._closed.is_set():
                if self._reading:   # another task is reading: it sees the peer's close
                    await self._closed.wait()
                else:
                    await self._read()
        except ConnectionClosed:
            pass
        finally:
            await self._close_stream()

    # -- reading ----------------------------------------------------------------------------
    async def _read(self) -> None:
        """Read once and act on what came (messages queued, a ping or a close answered);
        raises only Cancelled."""
        self._reading = True
        try:
            data = bytes(await self._stream.receive_some(RECEIVE_BYTES))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        finally:
            self._reading = False
        if not data:   # the TCP connection ended without a close handshake
            await self._abort()
            return
        conn = self._conn
        if conn.state is ConnectionState.CLOSED:
            return
        if self._plain:
            data = self._cut_plain_frames(data)
            if self._closing:
                self._messages.clear()
            if not data:
                return
        try:
            conn.receive_data(data)
        except RemoteProtocolError as err:   # (a handshake's: not once open)
            if err.event_hint is not None:
                await self._send(err.event_hint, quiet=True)
            await self._close_stream()
            return
        replies = b""   # answered in wsproto's state at each event, written after them all
        close: CloseConnection | None = None
        too_big = False
        for event in conn.events():   # with no checkpoint in between
            if isinstance(event, (TextMessage, BytesMessage)):
                if not self._closing and not too_big and not self._add_part(event):
                    # As trio-websocket: the close says why, what was queued (or comes
                    # after it) is dropped, nothing more is read (the caller closes the
                    # stream), but the events already read are still acted on.
                    too_big = True
                    why = f"Exceeded maximum message size: {self._max_message_size} bytes"
                    self._messages.clear()
                    self._close_reason = CloseReason(1009, why)
                    replies += _reply(conn, CloseConnection(code=1009, reason=why))
            elif isinstance(event, Ping):
                replies += _reply(conn, event.response())   # (refused once closing)
            elif isinstance(event, CloseConnection):
                close = event
                if conn.state is ConnectionState.REMOTE_CLOSING:
                    if self._close_reason is None:   # send_message fails from now on
                        self._close_reason = CloseReason(event.code, event.reason or None)
                    replies += _reply(conn, event.response())
                break
        if replies:
            await self._write(replies, quiet=True)
        if close is not None:
            self._close_reason = CloseReason(close.code, close.reason or None)
            self._closed.set()
            await self._close_stream()   # a server closes TCP at once (RFC 6455 7.1.1)
        elif too_big:
            self._closed.set()

    def _cut_plain_frames(self, data: bytes) -> bytes:
        """Queue the messages of the plain frames at the start of what was read, keep
        the start of an incomplete one; what is left from the first frame that is not
        plain on is wsproto's (and so is everything after it)."""
        if self._partial:
            self._partial += data   # (a frame trickling in costs no copy per read)
            if len(self._partial) < self._wanted:
                return b"" if self._text_valid_so_far() else self._hand_over()
            buf, self._partial = bytes(self._partial), bytearray()
        else:
            buf = data
        pos, size = 0, len(buf)
        messages, limit = self._messages, self._max_message_size
        while pos < size:
            if size - pos < 2:
                if buf[pos] not in _PLAIN:
                    break
                return self._keep(buf, pos, 2)
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            if first not in _PLAIN or not second & 0x80 or length == 127:
                break   # a control frame, a fragment, RSV bits, unmasked, 64 KiB or more
            start = pos + 6
            if length == 126:
                if size - pos < 4:
                    return self._keep(buf, pos, 4)
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                if length < 126:
                    break   # a longer length encoding than needed: wsproto refuses it
                start = pos + 8
            if length > limit:
                break   # perhaps over the limit: wsproto's path counts as trio-websocket
            end = start + length
            if end > size:
                return self._keep(buf, pos, end - pos, start if first == _TEXT else -1)
            payload = _unmask(buf[start - 4:start], buf[start:end])
            if first == _TEXT:
                try:
                    messages.append(payload.decode("utf-8"))
                except UnicodeDecodeError:
                    break   # wsproto closes with 1007
            else:
                messages.append(payload)
            pos = end
        if pos == size:
            return b""
        self._plain = False
        return buf[pos:]

    def _keep(self, buf: bytes, pos: int, wanted: int, text_at: int = -1) -> bytes:
        """Keep the incomplete frame at ``pos``: nothing is cut before ``wanted`` bytes
        of it are there (its header's first bytes, or the whole frame).  A text frame's
        payload (from ``text_at``) is checked as it comes, as wsproto checks it: its
        UTF-8 going wrong before its end is wsproto's to answer (1007) at once."""
        self._partial = bytearray(buf[pos:])
        self._wanted = wanted
        self._text_at = text_at - pos if text_at >= 0 else -1
        if self._text_at >= 0:
            self._utf8 = _utf8_decoder()
            self._checked = 0
            if not self._text_valid_so_far():
                return self._hand_over()
        return b""

    def _text_valid_so_far(self) -> bool:
        """False when the text frame being kept has shown UTF-8 no end can repair."""
        if self._text_at < 0:
            return True
        at = self._text_at + self._checked
        new = bytes(self._partial[at:])
        if new:
            mask = bytes(self._partial[self._text_at - 4:self._text_at])
            turn = self._checked % 4
            try:
                self._utf8.decode(_unmask(mask[turn:] + mask[:turn], new), False)
            except UnicodeDecodeError:
                return False
            self._checked += len(new)
        return True

    def _hand_over(self) -> bytes:
        """From here on wsproto reads everything, starting with the frame kept."""
        self._plain = False
        data, self._partial = bytes(self._partial), bytearray()
        return data

    def _add_part(self, event: TextMessage | BytesMessage) -> bool:
        """Queue a message wsproto delivered, once complete (str, or bytes, as
        trio-websocket's); False when it grew over ``max_message_size`` (``len`` of its
        parts, as trio-websocket counts)."""
        part: str | bytes = event.data if isinstance(event, TextMessage) else bytes(event.data)
        self._size += len(part)
        if self._size > self._max_message_size:
            self._parts, self._size = [], 0
            return False
        if not event.message_finished:
            self._parts.append(part)
            return True
        if self._parts:
            self._parts.append(part)
            part = "".join(self._parts) if isinstance(part, str) else b"".join(self._parts)  # type: ignore[arg-type]
        self._messages.append(part)
        self._parts, self._size = [], 0
        return True

    # -- writing and closing ------------------------------------------------------------------
    async def _send(self, event: Event, quiet: bool = False) -> None:
        """Write one wsproto event; ConnectionClosed if it cannot go (``quiet``: no error)."""
        try:
            data = self._conn.send(event)
        except Exception:   # wsproto: not in a state to send that (closing)
            if quiet:
                return
            raise ConnectionClosed(self._close_reason) from None
        await self._write(data, quiet)

    async def _write(self, data: bytes, quiet: bool = False) -> None:
        lock = self._send_lock
        try:
            if lock.locked():
                async with lock:
                    await self._stream.send_all(data)
            else:
                # Nobody is writing: the lock without a scheduler pass, so the frame
                # leaves now (send_all's checkpoint comes after the write).
                lock.acquire_nowait()
                try:
                    await self._stream.send_all(data)
                finally:
                    lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort()
            if not quiet:
                raise ConnectionClosed(self._close_reason) from None

    async def _abort(self) -> None:
        """The stream ended or broke without a close handshake: 1006."""
        if self._conn.state is ConnectionState.OPEN:
            self._conn.send(CloseConnection(code=_ABNORMAL))   # (only its state changes)
        if self._close_reason is None:
            self._close_reason = CloseReason(_ABNORMAL, None)
        self._closed.set()
        await self._close_stream()

    async def _close_stream(self) -> None:
        self._closed.set()
        if self._stream_closed:
            return
        self._stream_closed = True
        try:
            await self._stream.aclose()
        except trio.BrokenResourceError:
            pass
