"""Length-prefixed frames over a trio byte stream (a socketpair, a TCP connection).

Same face as :class:`transport.sockets.TrioSocket` (``send``/``recv``/``close``), so an
:class:`transport.channel.EnvelopeChannel` runs over either.  Used where nng's extra
latency matters and the peers are known: between a node and its own slave processes a
Unix socketpair inherited by the child does ~9,100 sequential round trips/s here against
~3,300 for nng Pair0 over ipc, and its end-of-file tells each side at once that the other
died.

A frame is a 4-byte big-endian length followed by that many bytes, at most
``max_message`` of them (default :data:`transport.codec.DEFAULT_MAX_MESSAGE`, 16 MiB): a
longer length is refused (:class:`CodecError`) as soon as its 4 bytes are read, so one
connection never buffers more than one frame of that size.

Over a socket (the usual case) reads and writes go straight to the non-blocking
socket and wait on its descriptor only when it would block: trio's generic
``receive_some``/``send_all`` cost a scheduler pass each, which at tens of thousands of
frames a second is most of the time spent.  :meth:`FramedStream.recv_many` hands back
every complete frame one read brought, so a busy peer costs one wake-up per batch.

Bulk data (streamed replies, chunked requests: frames of 64 KiB and more) is what the
rest is shaped by.  A read takes up to :data:`READ_SIZE` (256 KiB) into a buffer
reused by every stream of the thread (``recv_into``: no fresh allocation, whose pages
the kernel would fault in on each read), so a stream of 64 KiB frames costs one
system call and one wake-up per three or four frames, not two per frame; a frame is
copied once out of the stream's buffer.  A frame is written as its length and its body
in one ``writev`` (the two are never concatenated: a copy of the body per frame).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NoReturn

import trio

from transport.codec import DEFAULT_MAX_MESSAGE
from transport.errors import Closed, CodecError
from transport._outbox import SENT_PARTLY

_HEADER = struct.Struct(">I")
_pack_header = _HEADER.pack
_NO_LOCK = nullcontext()   # (reusable: entering it does nothing)
_unpack_header = _HEADER.unpack_from
MAX_MESSAGE = DEFAULT_MAX_MESSAGE  # the default largest frame read
MAX_FRAME = MAX_MESSAGE  # (its older name)
READ_SIZE = 1 << 18  # bytes one read may bring (a few 64 KiB chunks' frames)


class _ReadBuffer(threading.local):
    """The buffer every stream of a thread reads into: what a read brings is appended
    to the stream's own buffer before anything awaits, so one per thread is enough,
    and a thousand idle connections hold no read buffer each."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


_read_buffer = _ReadBuffer()


class FramedStream:
    """Frames over ``stream``: a connected stdlib socket (adopted: closing the
    FramedStream closes it), a ``trio.SocketStream`` (its descriptor is taken over, see
    :func:`_adopt`), or any other trio stream (read and written through the generic
    trio methods)."""

    def __init__(self, stream: trio.abc.Stream | socket.socket, *,
                 max_message: int = MAX_MESSAGE):
        # The stdlib socket read and written directly (None: the generic trio methods).
        self._sock: socket.socket | None = None
        if isinstance(stream, socket.socket):
            self._sock = stream
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(stream))
        elif isinstance(stream, trio.SocketStream):
            stream, self._sock = _adopt(stream)
        self.stream: trio.abc.Stream = stream
        self.max_message = max_message  # the largest frame read; a longer one is a CodecError
        self._buffer = bytearray()
        self._send_lock = trio.StrictFIFOLock()  # frames from concurrent senders never interleave
        self._tail = b""  # the unsent rest of a frame try_send_nowait could only half write
        # Held around each direct write once another thread may write too
        # (:meth:`allow_thread_sends`), so its frames never land inside one of ours.
        # Until then a no-op: a real lock on every write cost ~20 µs per round trip
        # through a node (bench, rr family), where nothing else writes.
        self._write_lock: AbstractContextManager[Any] = _NO_LOCK
        self._thread_sends = False
        self._lost: OSError | None = None  # a socket error poll_frames met, for recv_many

    @property
    def max_frame(self) -> int:
        """:attr:`max_message`, under the name the framing layer knows it by."""
        return self.max_message

    # -- sending ----------------------------------------------------------------------
    def try_send_nowait(self, data: bytes) -> bool | int:
        """Write a frame now if the socket takes it without blocking: True when all of
        it went, ``SENT_PARTLY`` when only its start did (the rest waits for
        :meth:`flush` or the next :meth:`send`), False when nothing was written."""
        if self._send_lock.locked() or self._sock is None:
            return False
        with self._write_lock:  # (the tail is read under it: another thread may set it)
            if self._tail:
                return False
            return self._write_between_frames(self._sock, data)

    def try_send_parts_nowait(self, head: bytes, data: bytes) -> bool | int:
        """:meth:`try_send_nowait` of the frame ``head + data``, written without
        joining the two: for a large envelope, ``head`` the array header that makes it
        a frame of one (:func:`transport.codec.join_frame` would copy it whole)."""
        if self._send_lock.locked() or self._sock is None:
            return False
        with self._write_lock:
            if self._tail:
                return False
            return self._write_between_frames(self._sock, data, head)

    def _write_between_frames(self, sock: socket.socket, data: bytes,
                              head: bytes = b"") -> bool | int:
        """Write the frame of ``head + data`` without blocking; its unsent rest becomes
        the tail.  Only with the write lock held, and no frame half written (no tail,
        no send)."""
        header = _pack_header(len(head) + len(data))
        if head:
            header += head
        try:
            sent = _send_frame(sock, header, data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise Closed(f"stream closed: {exc}") from None
        if sent < len(header) + len(data):
            self._tail = _rest(header, data, sent)
            return SENT_PARTLY
        return True

    def allow_thread_sends(self) -> None:
        """From now on :meth:`send_from_thread` may be called (from another thread);
        call it on the trio thread, between two sends."""
        if not self._thread_sends:
            self._write_lock = threading.Lock()
            self._thread_sends = True

    def send_from_thread(self, data: bytes) -> bool:
        """Write a frame from a thread other than trio's, if the stream is between
        frames and the socket takes it without blocking; False if it did not go.  For
        a slave's heartbeat while its trio thread is busy in a handler
        (engine/worker/runtime.py): the trio side's writes take the same lock, and
        a half-written frame's rest is left as the tail for the trio side to finish."""
        sock = self._sock
        if sock is None or not self._thread_sends:
            return False
        with self._write_lock:
            if self._tail or self._send_lock.locked():
                return False
            try:
                return bool(self._write_between_frames(sock, data))
            except Closed:
                return False

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._flush_tail()
                await self._send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Closed(f"stream closed: {exc}") from None

    async def _send_all(self, data: bytes) -> None:
        """Write the frame of ``data`` (its length, then it)."""
        header = _pack_header(len(data))
        sock = self._sock
        if sock is None:
            await self.stream.send_all(header + data)
            return
        # The lock's acquisition was this call's checkpoint; write what the socket
        # takes now and wait for room only for the rest.
        try:
            with self._write_lock:
                sent = _send_frame(sock, header, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise Closed(f"stream closed: {exc}") from None
        if sent < 4:
            await self.stream.send_all(header[sent:])
            sent = 4
        if sent - 4 < len(data):
            await self.stream.send_all(memoryview(data)[sent - 4:])

    async def flush(self) -> None:
        """Finish writing what :meth:`try_send_nowait` left half sent."""
        if self._tail:
            async with self._send_lock:
                try:
                    await self._flush_tail()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise Closed(f"stream closed: {exc}") from None

    async def _flush_tail(self) -> None:
        # Under the send lock, so no other thread's frame starts from here on; one
        # being written ends before the write lock is ours, its rest left as the tail.
        with self._write_lock:
            tail, self._tail = self._tail, b""
        if tail:
            await self.stream.send_all(tail)

    # -- receiving --------------------------------------------------------------------
    async def recv(self) -> bytes:
        """The next frame."""
        frames = self._frames(1)
        if frames:
            return frames[0]  # already read (an earlier call yielded for it)
        while True:
            await self._read()
            frames = self._frames(1)
            if frames:
                return frames[0]

    async def recv_many(self) -> list[bytes]:
        """Every complete frame buffered (at least one), reading once if none is."""
        frames = self._frames(0)
        if frames:
            return frames
        while True:
            await self._read()
            frames = self._frames(0)
            if frames:
                return frames

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed, or for a stream without one), to
        sleep on until it is readable (transport/_spin.py)."""
        sock = self._sock
        return -1 if sock is None else sock.fileno()

    def poll_frames(self) -> list[bytes]:
        """Complete frames available without waiting: those buffered, else what one
        non-blocking read brings (often none).  Trouble is left for the next
        :meth:`recv_many`, which raises it: a bad length stays in the buffer, the end
        of the stream is met again, and a socket error (which the socket reports only
        once) is kept for it."""
        sock = self._sock
        try:
            frames = self._frames(0)
            if frames or sock is None:
                return frames
            view = _read_buffer.view
            try:
                size = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return []  # nothing yet
            except OSError as exc:
                self._lost = exc
                return []
            if not size:
                return []  # the end of the stream
            self._buffer += view[:size]
            return self._frames(0)
        except CodecError:
            return []

    def _frames(self, limit: int) -> list[bytes]:
        """Cut up to ``limit`` (0: all) complete frames off the buffer."""
        return cut_frames(self._buffer, self.max_message, limit)

    async def _read(self) -> None:
        """Append at least one byte to the buffer; one checkpoint either way."""
        sock = self._sock
        if sock is None:
            try:
                chunk = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # Over TLS the reason is the cause (an ssl.SSLError: e.g. the peer
                # refused our certificate); it stays chained for whoever must tell.
                cause = exc.__cause__
                raise Closed(f"stream closed: {str(exc) or cause}") from cause
            if not chunk:
                self._ended()
            self._buffer += chunk
            return
        try:
            size: int | None = sock.recv_into(_read_buffer.view)
        except (BlockingIOError, InterruptedError):
            size = None
        except OSError as exc:
            raise Closed(f"stream closed: {exc}") from None
        if size is None:
            while True:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except (trio.ClosedResourceError, OSError) as exc:
                    raise Closed(f"stream closed: {exc}") from None
                # (after the await: another task of this thread may have read into
                # the shared buffer meanwhile; nothing awaits from here to the copy)
                view = _read_buffer.view
                try:
                    size = sock.recv_into(view)
                    break
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise Closed(f"stream closed: {exc}") from None
            if not size:
                self._ended()
            self._buffer += view[:size]
            return
        if not size:
            self._ended()
        # Data was there at once: still yield once (buffered first, so a
        # cancellation here loses nothing).
        self._buffer += _read_buffer.view[:size]
        await trio.lowlevel.checkpoint()

    def _ended(self) -> NoReturn:
        """The read met the end of the stream."""
        lost = self._lost  # what a poll read instead of the end of the stream
        raise Closed(f"stream closed: {lost}" if lost else "peer closed the stream")

    async def discard_until_closed(self) -> None:
        """Read and drop whatever the peer still sends until it closes its end (or the
        link fails): a server that hung up on a peer lets it read the reason first
        (see :meth:`shutdown_write`).  Bound it with a timeout."""
        self._buffer.clear()
        try:
            while True:
                await self._read()
                self._buffer.clear()
        except Closed:
            pass

    # -- lifetime -----------------------------------------------------------------------
    def shutdown_write(self) -> None:
        """Send the end of the stream after what was written (the peer reads it all,
        then end-of-file), keeping the reading side open.  Closing a socket outright
        while the peer's data sits unread in it makes the kernel reset the connection,
        and a reset can destroy what was just written before the peer reads it."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone

    def close(self) -> None:
        """Close now, waking whoever waits on the socket (a stream that is not a socket's
        closes at the next :meth:`aclose`)."""
        # SocketStream.aclose is only async for the checkpoint; closing the socket is sync.
        # A TLS stream is closed by its socket too (abruptly: no close_notify; the peer
        # sees the end of the stream all the same).
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()

    async def aclose(self) -> None:
        await self.stream.aclose()


def frame_header(size: int) -> bytes:
    """The 4-byte length that precedes a frame of ``size`` bytes."""
    return _HEADER.pack(size)


def cut_frames(buffer: bytearray, max_frame: int = MAX_MESSAGE, limit: int = 0) -> list[bytes]:
    """Cut up to ``limit`` (0: all) complete frames off the front of ``buffer``; a
    partial frame stays.  Raises CodecError for a length over ``max_frame``."""
    size = len(buffer)
    pos = 0
    out: list[bytes] = []
    with memoryview(buffer) as view:  # (released before the buffer is cut below)
        while size - pos >= 4:
            (length,) = _unpack_header(buffer, pos)
            if length > max_frame:
                raise CodecError(f"frame of {length} bytes exceeds the {max_frame} limit")
            end = pos + 4 + length
            if end > size:
                break
            out.append(bytes(view[pos + 4:end]))  # the frame's one copy
            pos = end
            if len(out) == limit:
                break
    if pos:
        del buffer[:pos]
    return out


def _send_frame(sock: socket.socket, header: bytes, data: bytes) -> int:
    """Write a frame's length (and whatever else precedes ``data``) and its body in
    one system call, without joining them (a copy of the body); how many bytes went,
    of the two."""
    if len(data) < 4096:  # (small: a join is cheaper than a second iovec)
        return sock.send(header + data)
    return os.writev(sock.fileno(), (header, data))


def _rest(header: bytes, data: bytes, sent: int) -> bytes:
    """What is left of a frame (``header`` then ``data``) of which ``sent`` bytes
    were written."""
    if sent < len(header):
        return header[sent:] + data
    return data[sent - len(header):]


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of Unix stream sockets: keep one, hand the other to a child
    (``subprocess``'s ``pass_fds``) and open it there with :func:`from_fd`.

    Each end may hold :data:`PAIR_BUFFER` bytes its peer has not read yet, instead of
    the system's default (~200 KB: three 64 KiB chunks), so a streaming slave writes
    several chunks before it waits for its node to read, and each side wakes up once
    per batch of chunks rather than once per chunk (the kernel caps it at
    ``net.core.wmem_max``)."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in pair:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PAIR_BUFFER)
        except OSError:
            pass  # the default, then
    return pair


PAIR_BUFFER = 1 << 20  # bytes of unread frames a socketpair's end may hold


def _adopt(stream: trio.SocketStream) -> tuple[trio.SocketStream, socket.socket]:
    """Take over the descriptor of ``stream``'s socket: a stdlib socket of our own over
    it, and a fresh SocketStream over that.

    A trio socket keeps its stdlib socket private, and the fast paths above need the
    stdlib one's non-blocking ``send``/``recv`` (trio's own cost a scheduler pass
    each).  ``detach()`` hands the descriptor over whole, so exactly one socket object
    owns it at any time: nothing is duplicated, nothing closed twice; the old trio
    socket is left closed (closing it again, as ``trio.serve_listeners`` does with the
    stream it handed out, is a no-op)."""
    sock = socket.socket(fileno=stream.socket.detach())
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock)), sock


def from_socket(sock: socket.socket) -> FramedStream:
    """Frames over a connected stdlib socket, which the FramedStream now owns."""
    return FramedStream(sock)


def from_fd(fd: int) -> FramedStream:
    """Adopt an inherited socket descriptor (the child's end of :func:`socketpair`)."""
    return from_socket(socket.socket(fileno=fd))
