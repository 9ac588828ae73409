"""A batching envelope channel over one connected link: a :class:`TrioSocket` (nng)
or a :class:`transport.streams.FramedStream`.

Senders append envelopes to an outbox and return at once; a single writer task
packs everything queued since its last send into one frame, so with many messages
in flight dozens share one send, which is where throughput comes from.  A lone
message on an idle stream link is written at once instead (one scheduler pass less).

The outbox is bounded: :meth:`send` waits while it is over ``high_water`` so a
fast producer cannot grow memory without limit; :meth:`send_nowait` skips the
wait for replies that must not block (they are bounded by the requests that
caused them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from transport.codec import Envelope, Kind, decode, encode_envelope
from transport.errors import BadMessage, Closed, CodecError, error_to_body
from transport._outbox import Outbox, TrySend
from transport.streams import FramedStream

if TYPE_CHECKING:  # not imported at run time: slaves use streams only, and pynng is heavy
    from transport.sockets import TrioSocket


class EnvelopeChannel:
    def __init__(self, sock: TrioSocket | FramedStream, *, high_water: int = 4096):
        self.sock = sock
        # A stream link writes a lone frame at once, reads every frame a read brought,
        # and can be polled (transport/_spin.py); an nng socket does none of these.
        self._stream = sock if isinstance(sock, FramedStream) else None
        self._try_send: TrySend | None = (
            self._stream.try_send_nowait if self._stream is not None else None)
        self.high_water = high_water
        self._outbox = Outbox()
        self._drained = trio.Event()
        self._closed = False
        self.frames_sent = 0
        self.frames_received = 0
        self.bad_frames = 0

    # -- sending ------------------------------------------------------------------
    def send_nowait(self, kind: int, sid: int, body: Any = None) -> None:
        """Queue one envelope.  A body msgpack cannot carry is replaced by an ERROR
        on the same stream, so its receiver is told instead of left waiting."""
        if self._closed:
            raise Closed("channel closed")
        try:
            packed = encode_envelope(kind, sid, body)
        except CodecError as exc:
            packed = encode_envelope(Kind.ERROR, sid, error_to_body(
                BadMessage(f"message could not be encoded: {exc}")))
        if not self._outbox.put(packed, self._try_send):
            self.frames_sent += 1

    def hold(self) -> None:
        """Queue what is sent until :meth:`release`: the sender knows more follow at
        once (a frame of answers being acted on), and they should leave as one frame."""
        self._outbox.held = True

    def release(self) -> None:
        try:
            if self._outbox.release(self._try_send):
                self.frames_sent += 1
                self._drained.set()
        except Closed:
            pass  # the link is gone; its reader sees it

    async def send(self, kind: int, sid: int, body: Any = None) -> None:
        while len(self._outbox) >= self.high_water:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
        self.send_nowait(kind, sid, body)
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to nng."""
        while self._outbox:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """The writer task; run it in the nursery that owns the channel."""
        task_status.started()
        try:
            stream = self._stream
            while True:
                await self._outbox.wait()
                if stream is not None:
                    await stream.flush()  # the rest of a frame a direct write began
                for frame, _ in self._outbox.frames():
                    await self.sock.send(frame)
                    self.frames_sent += 1
                self._drained.set()
        finally:
            self._closed = True
            self._drained.set()

    # -- receiving ----------------------------------------------------------------
    async def receive(self) -> list[Envelope]:
        """The envelopes of the next frame, or of every frame already arrived (over a
        stream: one wake-up per burst).  Malformed frames are counted and skipped."""
        stream = self._stream
        while True:
            frames = await stream.recv_many() if stream is not None else [await self.sock.recv()]
            out = self._decode(frames)
            if out:
                return out

    def poll(self) -> list[Envelope]:
        """The envelopes of frames already arrived, without waiting ([] if none, or
        over nng): for whoever is the one reader meanwhile (transport/_spin.py)."""
        stream = self._stream
        return self._decode(stream.poll_frames()) if stream is not None else []

    def _decode(self, frames: list[bytes]) -> list[Envelope]:
        out: list[Envelope] = []
        for frame in frames:
            try:
                envelopes = decode(frame)
            except CodecError:
                self.bad_frames += 1
                continue
            self.frames_received += 1
            if out:
                out.extend(envelopes)
            else:
                out = envelopes
        return out

    def close(self) -> None:
        self._closed = True
        self._drained.set()
        self.sock.close()

