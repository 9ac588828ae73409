"""How a Requester chooses among the Responders that can serve a request: small
pluggable strategies, one job each (Moleculer's ``strategies/``), pure (no I/O, no trio).

A strategy is asked :meth:`Strategy.choose` with the eligible Responders' ids (connected,
not held off by their circuit breaker, not tried for this request yet) and answers one
of them; strategies that learn from traffic are told when a request is sent to a
Responder and when its answer came (:meth:`Strategy.sent`, :meth:`Strategy.answered`).

- ``round-robin`` (default): each in turn.
- ``random``: uniformly at random.
- ``least-pending``: the one with the fewest requests in flight from this Requester
  (cote's pending-balanced requester); ties in turn.
- ``lowest-latency``: the lowest moving average of recent response times (cote's
  time-balanced requester), with exploration: a Responder never measured is tried first,
  and a share ``explore`` of requests goes to another one at random, so a Responder that
  was slow and recovered gets traffic (and a fresh measurement) again.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from typing import AbstractSet, ClassVar, Sequence

ALPHA = 0.2             # weight of a new sample in the moving average of response times
EXPLORE = 0.05          # share of requests a lowest-latency requester sends elsewhere


class Strategy(ABC):
    """Choose one of ``ids`` (never empty, in a stable order)."""

    name: ClassVar[str]
    learns: ClassVar[bool] = False     # wants sent()/answered() (they cost per request)

    @abstractmethod
    def choose(self, ids: Sequence[str]) -> str: ...

    def sent(self, rid: str) -> None:
        """A request went to ``rid``."""

    def answered(self, rid: str, seconds: float, ok: bool) -> None:
        """``rid`` answered (``ok``: with a value, not an error) after ``seconds``."""

    def keep(self, rids: AbstractSet[str]) -> None:
        """Only these Responders remain: forget what was learnt of the others."""


class RoundRobin(Strategy):
    name = "round-robin"

    def __init__(self) -> None:
        self.turn = 0

    def choose(self, ids: Sequence[str]) -> str:
        rid = ids[self.turn % len(ids)]
        self.turn += 1
        return rid


class Random(Strategy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, ids: Sequence[str]) -> str:
        return ids[self.rng.randrange(len(ids))]


class LeastPending(Strategy):
    name = "least-pending"
    learns = True

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.turn = 0

    def choose(self, ids: Sequence[str]) -> str:
        pending = self.pending
        low = min(pending.get(rid, 0) for rid in ids)
        tied = [rid for rid in ids if pending.get(rid, 0) == low]
        self.turn += 1
        return tied[self.turn % len(tied)]

    def sent(self, rid: str) -> None:
        self.pending[rid] = self.pending.get(rid, 0) + 1

    def answered(self, rid: str, seconds: float, ok: bool) -> None:
        left = self.pending.get(rid, 0) - 1
        if left > 0:
            self.pending[rid] = left
        else:
            self.pending.pop(rid, None)

    def keep(self, rids: AbstractSet[str]) -> None:
        for rid in [r for r in self.pending if r not in rids]:
            del self.pending[rid]


class LowestLatency(Strategy):
    name = "lowest-latency"
    learns = True

    def __init__(self, *, alpha: float = ALPHA, explore: float = EXPLORE,
                 rng: random.Random | None = None) -> None:
        if not 0 < alpha <= 1 or not 0 <= explore < 1:
            raise ValueError("need 0 < alpha <= 1 and 0 <= explore < 1")
        self.alpha = alpha
        self.explore = explore
        self.rng = rng or random.Random()
        self.average: dict[str, float] = {}   # rid -> moving average of its response times

    def choose(self, ids: Sequence[str]) -> str:
        average = self.average
        unknown = [rid for rid in ids if rid not in average]
        if unknown:
            return unknown[0]                  # measure a newcomer before judging it
        if len(ids) > 1 and self.rng.random() < self.explore:
            return ids[self.rng.randrange(len(ids))]
        return min(ids, key=average.__getitem__)

    def answered(self, rid: str, seconds: float, ok: bool) -> None:
        if not ok:
            seconds = max(seconds, self.average.get(rid, seconds)) * 2   # errors count as slow
        before = self.average.get(rid)
        self.average[rid] = seconds if before is None else \
            before + self.alpha * (seconds - before)

    def keep(self, rids: AbstractSet[str]) -> None:
        for rid in [r for r in self.average if r not in rids]:
            del self.average[rid]


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RoundRobin, Random, LeastPending, LowestLatency)}


def strategy(spec: str | Strategy) -> Strategy:
    """A strategy by name (``"least-pending"``) or the instance given."""
    if isinstance(spec, Strategy):
        return spec
    cls = STRATEGIES.get(spec) if isinstance(spec, str) else None
    if cls is None:
        raise ValueError(f"balance must be one of {', '.join(STRATEGIES)} or a Strategy, "
                         f"got {spec!r}")
    return cls()
