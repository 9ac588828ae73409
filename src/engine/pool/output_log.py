"""A slave's output, as it happens, in its node's log (Cocaine's ``log-output``): pure,
no I/O, no trio.

A slave's stdout and stderr reach its node as lines on one pipe (engine/pool/slave.py).
The slave's Python ``logging`` records arrive there too, one line each
(engine/protocol/output_lines.py): the node logs them at their level, and a plain line
(a ``print``, a C library's stderr) at INFO, each as ``APP[PID] text`` on the logger
``engine.app.APP``.

A chatty app must not flood its node: each slave may log ``rate`` lines a second, with
bursts of ``2 x rate`` (:class:`OutputGate`, a token bucket).  The first line over says
so (a WARNING: dropping), what goes over is counted, and the next line that gets through,
or the slave's end, says how many were dropped.  The crashlog keeps every line
regardless (its own bound).

Per app, ``engine.log-output`` (docs/manifest.md, :class:`engine.manifest.EngineConfig`):
``true`` (the default: up to 50 lines/s per slave), ``false`` (nothing forwarded: the
crashlog only), or a number of lines per second.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OutputGate:
    """Which of one slave's lines reach the node's log: ``rate`` lines a second, bursts
    of twice that; ``rate`` 0 lets none through."""

    rate: float
    tokens: float = -1.0          # (a full bucket at the first line)
    last: float = 0.0
    dropped: int = 0              # lines over the rate since the last one let through

    @property
    def burst(self) -> float:
        return 2 * self.rate

    def admit(self, now: float) -> tuple[bool, int]:
        """Whether a line at ``now`` is logged, and what to say first: -1 (the first
        line dropped: "dropping"), N > 0 (N lines were dropped before this one), 0."""
        if self.rate <= 0:
            return False, 0
        if self.tokens < 0:
            self.tokens, self.last = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.dropped += 1
            return False, -1 if self.dropped == 1 else 0
        self.tokens -= 1
        dropped, self.dropped = self.dropped, 0
        return True, dropped

    def close(self) -> int:
        """The lines dropped since the last one let through (the slave ended)."""
        dropped, self.dropped = self.dropped, 0
        return dropped
