"""Refusing replays: which (sender, counter, time) a receiver has already accepted.

Pure: no I/O, no trio, time passed in.  Used by the mesh's sealed frames
(transport/mesh/sealing.py) and by signed discovery beacons (transport/mesh/discovery.py).

Every authenticated message carries the sender's id, a counter that only grows (per
sender), and the sender's wall-clock time.  A receiver accepts a message only if

- its time is within ``max_skew`` seconds of the receiver's clock (either way: the
  clock-skew tolerance between hosts), and
- its counter has not been accepted from that sender before: the receiver keeps, per
  sender, the highest counter accepted and a bitmap of the ``window`` counters below it
  (so messages that arrive a little out of order, as datagrams may, are still taken);
  anything older than that is refused, and so is anything older than the first
  message the receiver took from that sender.

Why both: the counter makes a replay inside the time window fail; the time window lets
the receiver forget a sender ``max_skew`` after its last message (anything of its that
could be replayed is then refused for being old), so memory stays bounded without the
receiver having to remember every sender for ever.  The table holds at most
``max_senders``; when it is full the least recently heard sender is forgotten and a
*floor* remembers the latest time it had: a message from a sender the receiver does
not know, or knows again only since the floor was that high, is accepted only with a
time after the floor, so forgetting never reopens a replay.  The price, only while
more than ``max_senders`` senders are active within the clock window: a newcomer
whose clock is behind the forgotten ones' is refused until its time passes the floor.

``check`` looks without changing anything and ``commit`` records: a message is
committed only after it has been authenticated, so forged messages never move a
sender's counter.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_MAX_SKEW = 30.0   # seconds: hosts' clocks must agree this closely
DEFAULT_WINDOW = 1024     # counters below the highest that are still told apart
DEFAULT_MAX_SENDERS = 4096

# What check() answers when it refuses (None: accept).
REPLAYED = "replayed"     # this counter was accepted before, or is too far behind
STALE = "stale"           # the message's time is outside the clock window


@dataclass(slots=True)
class _Sender:
    high: int       # the highest counter accepted
    seen: int       # bit i set: counter ``high - i`` was accepted
    last: float     # the latest message time accepted (the sender's clock)
    floor: float    # the table's floor when this entry was made (it may be a comeback)


class ReplayWindow(Generic[K]):
    """The receiver's memory of what it accepted, per sender (module docstring)."""

    def __init__(self, *, max_skew: float = DEFAULT_MAX_SKEW, window: int = DEFAULT_WINDOW,
                 max_senders: int = DEFAULT_MAX_SENDERS) -> None:
        if max_skew <= 0 or window < 1 or max_senders < 1:
            raise ValueError("need max_skew > 0, window >= 1, max_senders >= 1")
        self.max_skew = max_skew
        self.window = window
        self.max_senders = max_senders
        self._mask = (1 << window) - 1
        self._senders: dict[K, _Sender] = {}
        self.floor = float("-inf")  # latest time of a sender forgotten while it could replay

    def __len__(self) -> int:
        return len(self._senders)

    def check(self, sender: K, counter: int, at: float, now: float) -> str | None:
        """None if a message (``counter``, sent at ``at`` by the sender's clock) may be
        accepted at ``now``; else why not (REPLAYED or STALE).  Changes nothing."""
        if not -self.max_skew <= now - at <= self.max_skew:
            return STALE
        if counter < 1:
            return REPLAYED
        s = self._senders.get(sender)
        if s is None:
            return REPLAYED if at <= self.floor else None
        if at <= s.floor:
            return REPLAYED  # from before it was forgotten: may have been accepted then
        if counter > s.high:
            return None
        behind = s.high - counter
        if behind >= self.window or (s.seen >> behind) & 1:
            return REPLAYED
        return None

    def commit(self, sender: K, counter: int, at: float, now: float) -> None:
        """Record an accepted (checked, then authenticated) message."""
        s = self._senders.get(sender)
        if s is None:
            if len(self._senders) >= self.max_senders:
                self._make_room(now)
            # Whatever came before its first message here counts as seen: were this a
            # sender forgotten earlier, its older counters might have been accepted.
            self._senders[sender] = _Sender(counter, self._mask, at, self.floor)
            return
        if counter > s.high:
            s.seen = ((s.seen << (counter - s.high)) | 1) & self._mask
            s.high = counter
        else:
            s.seen |= 1 << (s.high - counter)
        if at > s.last:
            s.last = at

    def accept(self, sender: K, counter: int, at: float, now: float) -> str | None:
        """``check`` and, when it accepts, ``commit`` (for messages already authenticated)."""
        verdict = self.check(sender, counter, at, now)
        if verdict is None:
            self.commit(sender, counter, at, now)
        return verdict

    def _make_room(self, now: float) -> None:
        """Forget senders silent for longer than the clock window (nothing of theirs can
        be replayed: it would be refused as stale); if that frees nothing, the sixteenth
        heard from least recently, raising the floor to their latest time (a batch, so that a
        full table costs one scan per many newcomers, not one each)."""
        horizon = now - self.max_skew
        senders = self._senders
        for k in [k for k, s in senders.items() if s.last < horizon]:
            del senders[k]
        if len(senders) >= self.max_senders:
            batch = max(1, self.max_senders // 16)
            for k in heapq.nsmallest(batch, senders, key=lambda k: senders[k].last):
                self.floor = max(self.floor, senders.pop(k).last)
