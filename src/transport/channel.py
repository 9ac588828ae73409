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

What cannot go is one message's failure, never the link's (docs/architecture.md,
"Faults"): a message over the link's limit (``max_message``, from the stream's
``max_frame``) or one msgpack cannot carry is refused when it is queued, so no frame
the peer must reject is ever written, and frames of many envelopes are cut to fit the
limit too.  :meth:`send_nowait` (replies) sends an ERROR on the same stream instead;
:meth:`send` and :meth:`send_or_refuse` (requests, chunks) raise :class:`BadMessage`
to their caller, whose job it is.  A link that breaks while the writer writes (the peer
died) ends the writer quietly: the reader meets the end of the stream and says so.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import trio

from transport.codec import Envelope, Kind, decode, encode_envelope
from transport.errors import BadMessage, Closed, CodecError, error_to_body
from transport._outbox import SENT_PARTLY, Outbox, TrySend
from transport.streams import FramedStream

# Bytes a frame adds around its envelopes (the msgpack array header, up to 5 bytes):
# an envelope that fits the link's limit less this fits a frame of its own.
FRAME_OVERHEAD = 5
# An envelope this large (a chunk of bulk data) goes out as a frame of its own, at
# once when the stream link takes it, written beside its frame's headers rather than
# joined to them (a copy of it); batching it with others would save nothing.
DIRECT_BYTES = 1 << 14
_ONE = b"\x91"  # the array header of a frame of one envelope

if TYPE_CHECKING:  # not imported at run time: slaves use streams only, and pynng is heavy
    from transport.sockets import TrioSocket


class EnvelopeChannel:
    def __init__(self, sock: TrioSocket | FramedStream, *, high_water: int = 4096,
                 max_message: int | None = None, strict: bool = False):
        """``max_message``: the largest packed envelope it sends (default: what fits
        a frame of the stream's ``max_frame``; no limit over nng unless given).
        ``strict``: a frame that does not decode raises :class:`CodecError` from
        :meth:`receive` (the peer is broken: a slave, whose lost answers would leave
        jobs unanswered) instead of being counted and skipped (a client's bad frame)."""
        self.sock = sock
        self.strict = strict
        # A stream link writes a lone frame at once, reads every frame a read brought,
        # and can be polled (transport/_spin.py); an nng socket does none of these.
        self._stream = sock if isinstance(sock, FramedStream) else None
        self._try_send: TrySend | None = (
            self._stream.try_send_nowait if self._stream is not None else None)
        self.high_water = high_water
        max_frame = self._stream.max_frame if self._stream is not None else None
        if max_message is not None:
            max_frame = max_message + FRAME_OVERHEAD
        self.max_message = max_frame - FRAME_OVERHEAD if max_frame is not None else sys.maxsize
        # Frames of many envelopes are cut to fit the peer's limit as well.
        self._outbox = Outbox(max_frame)
        self._drained = trio.Event()
        self._closed = False
        self.frames_sent = 0
        self.frames_received = 0
        self.bad_frames = 0

    # -- sending ------------------------------------------------------------------
    def send_nowait(self, kind: int, sid: int, body: Any = None) -> None:
        """Queue one envelope.  One that cannot go (a body msgpack cannot carry, or a
        message over the link's limit) is replaced by an ERROR on the same stream, so
        its receiver is told instead of left waiting: for replies, whose sender has no
        one else to tell."""
        if self._closed:
            raise Closed("channel closed")
        try:
            packed = encode_envelope(kind, sid, body)
        except CodecError as exc:
            packed = encode_envelope(Kind.ERROR, sid, error_to_body(
                BadMessage(f"message could not be encoded: {exc}")))
        if len(packed) > self.max_message:
            packed = encode_envelope(Kind.ERROR, sid, error_to_body(
                BadMessage(self._too_large(kind, len(packed)))))
        self._put(packed)

    def send_or_refuse(self, kind: int, sid: int, body: Any = None) -> None:
        """Queue one envelope, or raise :class:`BadMessage` (nothing queued) when it
        cannot go: for requests, whose sender answers its own caller with it (a job
        whose payload is over the link's limit fails; the link is untouched)."""
        if self._closed:
            raise Closed("channel closed")
        try:
            packed = encode_envelope(kind, sid, body)
        except CodecError as exc:
            raise BadMessage(f"message could not be encoded: {exc}") from None
        if len(packed) > self.max_message:
            raise BadMessage(self._too_large(kind, len(packed)))
        self._put(packed)

    def _put(self, packed: bytes) -> None:
        """Queue a packed envelope, or write it now (the outbox's rule, and a large
        one on its own when nothing waits before it)."""
        outbox, stream = self._outbox, self._stream
        if len(packed) >= DIRECT_BYTES and stream is not None and not outbox \
                and not outbox.held:
            sent = stream.try_send_parts_nowait(_ONE, packed)
            if sent:
                self.frames_sent += 1
                if sent == SENT_PARTLY:
                    outbox.wake()  # the writer finishes the frame
                return
        if not outbox.put(packed, self._try_send):
            self.frames_sent += 1

    def _too_large(self, kind: int, size: int) -> str:
        try:
            what = Kind(kind).name
        except ValueError:
            what = f"kind {kind}"
        return (f"{what} message of {size} bytes is over this link's limit of "
                f"{self.max_message} bytes (send large data as a stream of chunks)")

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
        """Queue one envelope once the outbox is under ``high_water``; raises
        :class:`BadMessage` (nothing queued) when it cannot go, like
        :meth:`send_or_refuse`: a stream's producer learns that its chunk was refused."""
        while len(self._outbox) >= self.high_water:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()
        self.send_or_refuse(kind, sid, body)
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to nng."""
        while self._outbox:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """The writer task; run it in the nursery that owns the channel.  It returns
        when the link breaks (the peer is gone: its reader meets the end of the
        stream); nothing more can be sent then (:class:`Closed`)."""
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
        except Closed:
            pass  # the peer is gone mid-write: the link's end, not the writer's failure
        finally:
            self._closed = True
            self._drained.set()

    # -- receiving ----------------------------------------------------------------
    async def receive(self) -> list[Envelope]:
        """The envelopes of the next frame, or of every frame already arrived (over a
        stream: one wake-up per burst).  Malformed frames are counted and skipped.
        Raises :class:`Closed` at the link's end, and :class:`CodecError` when a stream's
        framing is lost (a length over its limit): nothing more can be read from it."""
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
                if self.strict:
                    raise
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

