"""``Outbox``: packed envelopes waiting for one writer task, sent as few frames as can be.

Every sender in this package follows the same rule.  An envelope is packed once, when it
is queued (:func:`codec.encode_envelope`).  When the writer is idle and the link takes a
frame without blocking, that first envelope goes out at once, so a lone message pays no
scheduler pass.  Whatever is queued after it waits for the writer, which first lets the
tasks already runnable add theirs, then sends everything as frames of up to
``MAX_BATCH`` envelopes: one system call and one wake-up of the peer instead of many.
"""
from __future__ import annotations

from typing import Callable, Iterator

import trio

from .codec import join_frame

MAX_BATCH = 512  # envelopes per frame; keeps one frame's encode/decode short


class Outbox:
    __slots__ = ("items", "_wakeup")

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, packed: bytes, try_send: Callable[[bytes], bool] | None = None) -> bool:
        """Queue one packed envelope, or, when the writer is idle, write it at once
        through ``try_send`` (which returns False if the link would block).  Returns
        True if it was queued.  Whatever ``try_send`` raises propagates, nothing queued."""
        if try_send is not None and not self.items and not self._wakeup.is_set():
            if try_send(join_frame([packed])):
                self._wakeup.set()  # later envelopes, until the writer runs, batch up
                return False
        self.items.append(packed)
        self._wakeup.set()
        return True

    def wake(self) -> None:
        """Make the writer look again (its link changed, or it should stop)."""
        self._wakeup.set()

    def clear(self) -> int:
        """Drop everything queued (its peer is gone); returns how many were dropped."""
        dropped = len(self.items)
        self.items.clear()
        return dropped

    async def wait(self) -> None:
        """The writer's wait: until something is queued or :meth:`wake` is called."""
        await self._wakeup.wait()
        if self.items:
            await trio.lowlevel.cancel_shielded_checkpoint()  # let runnable senders add theirs
        self._wakeup = trio.Event()

    def frames(self) -> Iterator[tuple[bytes, int]]:
        """Take what is queued as ``(frame, envelopes in it)``, batch by batch; what the
        caller does not consume (it stopped on a dead link) stays queued."""
        while self.items:
            batch = self.items[:MAX_BATCH]
            del self.items[:MAX_BATCH]
            yield join_frame(batch), len(batch)
