"""``Outbox``: packed envelopes waiting for one writer task, sent as few frames as can be.

Every sender in this package follows the same rule.  An envelope is packed once, when it
is queued (:func:`codec.encode_envelope`).  When nothing is queued and the link takes a
frame without blocking, the envelope goes out at once: a lone message pays no scheduler
pass, and the writer task is not woken for it either.  So that a burst does not become a
system call per envelope, only one envelope per ``DIRECT_GAP`` goes out that way; the
rest are queued for the writer, which first lets the tasks already runnable add theirs,
then sends everything as frames of up to ``MAX_BATCH`` envelopes: one system call and one
wake-up of the peer instead of many.
"""
from __future__ import annotations

from time import perf_counter
from typing import Callable, Iterator

import trio

from transport.codec import join_frame

MAX_BATCH = 512  # envelopes per frame; keeps one frame's encode/decode short
# What a link's ``try_send`` returns when the socket took only the start of the frame:
# the link keeps the rest, and the writer must finish it (the link's ``flush``)
# before anything else goes out.
SENT_PARTLY = 2
# A link's direct write: False (it would block, or the writer is mid-frame), True (the
# whole frame went) or SENT_PARTLY.
TrySend = Callable[[bytes], bool | int]
# s between direct writes: longer than the gap between two envelopes of one burst (a
# few µs), shorter than a round trip to another process (~40 µs and up here), so lone
# request/reply traffic always goes direct and bursts always batch.
DIRECT_GAP = 20e-6


class Outbox:
    __slots__ = ("items", "size", "held", "max_frame", "_wakeup", "_direct_at")

    def __init__(self, max_frame: int | None = None) -> None:
        """``max_frame``: the most bytes the peer takes in one frame (None: no limit);
        a batch is cut short to fit it (each envelope fits on its own: its sender
        checked)."""
        self.max_frame = max_frame
        self.items: list[bytes] = []
        self.size = 0  # bytes queued (what a sender waits on: a slow reader's backlog)
        # True while the sender knows more envelopes follow at once (a frame of many
        # requests being answered, a batch of calls being started): nothing goes direct,
        # so the whole burst leaves as one frame instead of the first alone + the rest.
        # Whoever sets it ends it with release().
        self.held = False
        self._wakeup = trio.Event()
        self._direct_at = -1.0  # perf_counter() of the last direct write

    def __len__(self) -> int:
        return len(self.items)

    def put(self, packed: bytes, try_send: TrySend | None = None) -> bool:
        """Queue one packed envelope, or, when nothing is queued, write it at once
        through ``try_send`` (which returns False if the link would block or the writer
        is mid-frame, True when it wrote the frame, SENT_PARTLY when it wrote only the
        start).  Returns True if it was queued.  Whatever ``try_send`` raises
        propagates, nothing queued."""
        if try_send is not None and not self.items and not self.held:
            now = perf_counter()
            if now - self._direct_at >= DIRECT_GAP:
                sent = try_send(join_frame([packed]))
                if sent:
                    self._wrote(sent, now)
                    return False
        self.items.append(packed)
        self.size += len(packed)
        if not self.held:  # held: release() sends the burst or wakes the writer
            self._wakeup.set()
        return True

    def release(self, try_send: TrySend | None = None) -> int:
        """End a hold.  The burst queued meanwhile leaves now, as one frame, when the
        link takes it without blocking, rather than when the writer task next runs:
        a sender that keeps working after its burst (``send_many`` consuming the
        answers already in) would otherwise hold it back until its next await, and
        the peer would sit idle.  Returns how many envelopes went."""
        self.held = False
        items = self.items
        if not items:
            return 0
        sent: bool | int = False
        try:
            if try_send is not None and len(items) <= MAX_BATCH and (
                    self.max_frame is None or self.size <= self.max_frame - 5):
                sent = try_send(join_frame(items))
        finally:
            if not sent:
                self._wakeup.set()  # the writer sends them (or finds the link gone)
        if not sent:
            return 0
        count = len(items)
        items.clear()
        self.size = 0
        self._wrote(sent, perf_counter())
        return count

    def _wrote(self, sent: bool | int, now: float) -> None:
        """A direct write went (``sent`` as ``try_send`` said)."""
        self._direct_at = now
        if sent == SENT_PARTLY:
            self._wakeup.set()  # the writer finishes the frame

    def wake(self) -> None:
        """Make the writer look again (its link changed, or it should stop)."""
        self._wakeup.set()

    def clear(self) -> int:
        """Drop everything queued (its peer is gone); returns how many were dropped."""
        dropped = len(self.items)
        self.items.clear()
        self.size = 0
        return dropped

    async def wait(self) -> None:
        """The writer's wait: until something is queued, a direct write left the rest
        of its frame to the writer, or :meth:`wake` is called."""
        await self._wakeup.wait()
        if self.items:
            await trio.lowlevel.cancel_shielded_checkpoint()  # let runnable senders add theirs
        self._wakeup = trio.Event()

    def frames(self) -> Iterator[tuple[bytes, int]]:
        """Take what is queued as ``(frame, envelopes in it)``, batch by batch; what the
        caller does not consume (it stopped on a dead link) stays queued."""
        limit = self.max_frame
        while self.items:
            batch = self.items[:MAX_BATCH]
            size = sum(map(len, batch))
            if limit is not None and size > limit - 5:
                batch = _fit(batch, limit - 5)
                size = sum(map(len, batch))
            del self.items[:len(batch)]
            self.size -= size
            yield join_frame(batch), len(batch)


def _fit(batch: list[bytes], limit: int) -> list[bytes]:
    """The longest start of ``batch`` within ``limit`` bytes (at least one envelope)."""
    total = 0
    for n, packed in enumerate(batch):
        total += len(packed)
        if total > limit:
            return batch[:max(1, n)]
    return batch
