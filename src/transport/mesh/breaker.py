"""Per-peer circuit breaker and retry backoff: pure policy, time passed in.

A Responder that keeps failing (unreachable, timing out, or answering with retryable
errors) should stop receiving traffic until it recovers, instead of eating every
other request in the round-robin.  Closed -> (``threshold`` consecutive failures)
-> open for ``cooldown`` seconds -> half-open: one trial request; its success closes
the breaker, its failure opens it again with a doubled cooldown (capped).

:class:`DialBackoff` is the same idea one step earlier: a peer whose *dial* failed
(its connection never came up within the dial timeout: a dead or fake endpoint) is
not dialed again until its backoff has passed, so a table full of peers that never
answer costs a bounded trickle of dials instead of a link each.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    threshold: int = 3
    cooldown: float = 1.0
    max_cooldown: float = 30.0
    failures: int = 0
    state: str = "closed"        # closed | open | half-open
    opened_at: float = 0.0
    current_cooldown: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float) -> bool:
        """May a request go to this peer now?  (Half-open lets exactly one through.)"""
        if self.state == "closed":
            return True
        if self.state == "open" and now - self.opened_at >= self.current_cooldown:
            self.state = "half-open"
            self.trial_in_flight = False
        if self.state == "half-open" and not self.trial_in_flight:
            return True
        return False

    def on_dispatch(self) -> None:
        if self.state == "half-open":
            self.trial_in_flight = True

    def on_success(self) -> None:
        if not self.failures and self.state == "closed":
            return  # already healthy (the common case, once per answer)
        self.failures = 0
        self.state = "closed"
        self.current_cooldown = 0.0
        self.trial_in_flight = False

    def on_failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half-open":
            self._open(now, min(self.max_cooldown, max(self.cooldown, self.current_cooldown * 2)))
        elif self.state == "closed" and self.failures >= self.threshold:
            self._open(now, self.cooldown)

    def _open(self, now: float, cooldown: float) -> None:
        self.state = "open"
        self.opened_at = now
        self.current_cooldown = cooldown
        self.trial_in_flight = False


def backoff(attempt: int, *, base: float = 0.02, cap: float = 1.0) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped.
    (No jitter: the round-robin already spreads retries over responders.)"""
    return min(cap, base * 2.0 ** (attempt - 1))


@dataclass
class DialBackoff:
    """Peers whose dial failed, and when each may be dialed again: ``base`` seconds
    after its first failure, doubling with each further one up to ``cap``; a success
    forgets it.  At most ``max_entries`` are remembered (the earliest due is forgotten
    first: the worst that costs is one early dial)."""

    base: float = 1.0
    cap: float = 60.0
    max_entries: int = 4096
    _due: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (at, delay)
    _heap: list[tuple[float, str]] = field(default_factory=list)

    def allows(self, peer_id: str, now: float) -> bool:
        entry = self._due.get(peer_id)
        return entry is None or now >= entry[0]

    def failed(self, peer_id: str, now: float) -> float:
        """Record a failed dial; returns when the peer may be dialed again."""
        entry = self._due.get(peer_id)
        delay = self.base if entry is None else min(self.cap, entry[1] * 2)
        if entry is None and len(self._due) >= self.max_entries:
            self._forget_earliest()
        at = now + delay
        self._due[peer_id] = (at, delay)
        heapq.heappush(self._heap, (at, peer_id))
        if len(self._heap) > 2 * self.max_entries:  # superseded entries pile up: rebuild
            self._heap = [(a, p) for p, (a, _) in self._due.items()]
            heapq.heapify(self._heap)
        return at

    def succeeded(self, peer_id: str) -> None:
        self._due.pop(peer_id, None)

    def next_due(self, now: float) -> float | None:
        """The earliest time after ``now`` at which a backed-off peer may be dialed."""
        heap = self._heap
        while heap:
            at, peer_id = heap[0]
            entry = self._due.get(peer_id)
            if entry is not None and entry[0] == at and at > now:
                return at
            heapq.heappop(heap)  # superseded, forgotten, or already due
        return None

    def __len__(self) -> int:
        return len(self._due)

    def _forget_earliest(self) -> None:
        earliest = min(self._due, key=lambda p: self._due[p][0])
        del self._due[earliest]
