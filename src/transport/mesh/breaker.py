"""Per-peer circuit breaker and retry backoff: pure policy, time passed in.

A Responder that keeps failing (unreachable, timing out, or answering with retryable
errors) should stop receiving traffic until it recovers, instead of eating every
other request in the round-robin.  Closed -> (``threshold`` consecutive failures)
-> open for ``cooldown`` seconds -> half-open: one trial request; its success closes
the breaker, its failure opens it again with a doubled cooldown (capped).
"""
from __future__ import annotations

from dataclasses import dataclass


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
