"""A batching envelope channel over one connected :class:`TrioSocket`.

Senders append envelopes to an outbox and return at once; a single writer task
packs everything queued since its last send into one frame.  With one request in
flight that costs one scheduler pass; with many, dozens of envelopes share one
nng message, which is where throughput comes from (~45x here, see bench/).

The outbox is bounded: :meth:`send` waits while it is over ``high_water`` so a
fast producer cannot grow memory without limit; :meth:`send_nowait` skips the
wait for replies that must not block (they are bounded by the requests that
caused them).
"""
from __future__ import annotations

from typing import Any

import trio

from .codec import Envelope, decode, encode
from .errors import Closed, CodecError
from .sockets import TrioSocket

MAX_BATCH = 512  # envelopes per frame; keeps one frame's encode/decode short


class EnvelopeChannel:
    def __init__(self, sock: TrioSocket, *, high_water: int = 4096):
        self.sock = sock
        self.high_water = high_water
        self._outbox: list[Envelope] = []
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self._closed = False
        self.frames_sent = 0
        self.frames_received = 0
        self.bad_frames = 0

    # -- sending ------------------------------------------------------------------
    def send_nowait(self, kind: int, sid: int, body: Any = None) -> None:
        if self._closed:
            raise Closed("channel closed")
        env = Envelope(kind, sid, body)
        if not self._outbox and not self._wakeup.is_set():
            try_send = getattr(self.sock, "try_send_nowait", None)
            if try_send is not None:
                try:
                    if try_send(encode((env,))):
                        self.frames_sent += 1
                        self._wakeup.set()  # direct sends resume once the writer has run
                        return
                except CodecError:
                    pass
        self._outbox.append(env)
        self._wakeup.set()

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

    async def run_writer(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The writer task; run it in the nursery that owns the channel."""
        task_status.started()
        try:
            flush = getattr(self.sock, "flush", None)
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                if flush is not None:
                    await flush()
                while self._outbox:
                    batch = self._outbox[:MAX_BATCH]
                    del self._outbox[:MAX_BATCH]
                    try:
                        frame = encode(batch)
                    except CodecError:
                        frame = self._encode_salvaging(batch)
                    await self.sock.send(frame)
                    self.frames_sent += 1
                self._drained.set()
        finally:
            self._closed = True
            self._drained.set()

    def _encode_salvaging(self, batch: list[Envelope]) -> bytes:
        """One envelope in the batch cannot be packed: send the others, and turn
        the bad one into an ERROR on its stream so its caller is told, not left waiting."""
        from .codec import Kind
        from .errors import BadMessage, error_to_body

        good = []
        for env in batch:
            try:
                encode([env])
                good.append(env)
            except CodecError as exc:
                err = BadMessage(f"reply could not be encoded: {exc}")
                good.append(Envelope(Kind.ERROR, env.sid, error_to_body(err)))
        return encode(good)

    # -- receiving ----------------------------------------------------------------
    async def receive(self) -> list[Envelope]:
        """The next frame's envelopes. Malformed frames are counted and skipped."""
        while True:
            frame = await self.sock.recv()
            try:
                envelopes = decode(frame)
            except CodecError:
                self.bad_frames += 1
                continue
            self.frames_received += 1
            return envelopes

    def close(self) -> None:
        self._closed = True
        self._drained.set()
        self.sock.close()

