"""What an app records when one of its parts fails (docs/architecture.md, "Faults").

A *part* is what an app runs and replaces on its own: one slave and its link, one
driver, the pool, the maintenance channel.  When one fails, its supervisor answers the
jobs it held with a typed error, replaces it, and records the fault here: counted by
kind (``info()["faults"]``) and the last few kept with their reasons, each with a
number that only grows, so the maintenance channel publishes each one once (topic
``fault``).  Pure bookkeeping: no I/O, no trio.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

KEEP = 16  # faults kept with their reasons, per log

# One sequence for every log in the process: a reader of several logs (an app's pool
# and its drivers) tells new faults from those it has seen by this number alone.
_sequence = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Fault:
    seq: int
    time: float      # time.time()
    part: str        # "slave 4711", "driver 'web'", "pool"
    kind: str        # "link-garbage", "driver-crash", ...
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc`` (a nursery's group, nested), or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, or of the first few inside a group (a
    nursery's), for a fault's reason."""
    found = leaves(exc)
    text = "; ".join(f"{type(e).__name__}: {e}" for e in found[:3])
    return text + (f" (and {len(found) - 3} more)" if len(found) > 3 else "")


class FaultLog:
    def __init__(self, keep: int = KEEP) -> None:
        self.counts: dict[str, int] = {}
        self._recent: deque[Fault] = deque(maxlen=keep)

    def record(self, part: str, kind: str, reason: str) -> Fault:
        fault = Fault(next(_sequence), time.time(), part, kind, reason)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._recent.append(fault)
        return fault

    def recent(self) -> list[dict[str, Any]]:
        """The last faults, oldest first, as plain dicts (for ``info``)."""
        return [f.as_dict() for f in self._recent]

    def __len__(self) -> int:
        return sum(self.counts.values())


class Backoff:
    """When to start a failed part again: ``first`` seconds after a failure, doubling
    with each failure in a row up to ``cap``; a part that had run for ``stable_after``
    seconds when it failed starts over from ``first``.  Pure: fed how long the part
    ran, it answers the delay."""

    def __init__(self, first: float = 0.5, cap: float = 30.0, stable_after: float = 30.0) -> None:
        self.first = first
        self.cap = cap
        self.stable_after = stable_after
        self.in_a_row = 0

    def failed(self, ran_for: float | None) -> float:
        """The part failed after running ``ran_for`` seconds (None: it never started):
        the delay before its next start."""
        if ran_for is not None and ran_for >= self.stable_after:
            self.in_a_row = 0
        self.in_a_row += 1
        return float(min(self.cap, self.first * 2 ** min(self.in_a_row - 1, 32)))
