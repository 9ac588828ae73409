"""Per-event accounting of one app: what :meth:`engine.app.App.submit` accepted and
refused, and how each accepted job ended, by event name.

The pools count per app (``info()["done"]``...); this counts per *event*, for the
node's metrics (``engine/node/metrics.py``) and its dashboard.  It lives with the app,
not the pool, so its counts carry on when a failed pool is replaced.

Hot path: jobs are submitted tens of thousands of times a second, so accepting one
costs a dict lookup, one increment and one done callback (bound once per event, not
per job); the callback, run by the pool as it answers the job, adds a few increments
and a bisect into fixed latency buckets.  Refusals are the rare path.

Event names come from callers, so their number is bounded: past :data:`MAX_EVENTS`
names an app's new ones are counted under :data:`OTHER` (a client calling random
names cannot grow the metrics without end).
"""
from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Callable, Sequence

from engine.errors import JobCancelled

if TYPE_CHECKING:
    from engine.pool.job import Job

# Upper bounds (seconds) of the latency buckets, Prometheus's ``le``; +Inf is implied.
BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                              0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
MAX_EVENTS = 128        # distinct event names counted per app
OTHER = "(other)"       # where the names past MAX_EVENTS are counted


class EventCounts:
    """One event's counters.  ``buckets[i]`` counts done jobs whose latency (accepted
    to answered, seconds) is at most ``BUCKETS[i]`` and above the bound before it; the
    last one those above every bound (not cumulative: see :meth:`cumulative`)."""

    __slots__ = ("name", "accepted", "done", "cancelled", "streamed", "failed", "refused",
                 "buckets", "seconds", "finished")

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.done = 0
        self.cancelled = 0
        self.streamed = 0                     # done jobs that answered with a stream of chunks
        self.failed: dict[str, int] = {}      # error code -> jobs answered with it
        self.refused: dict[str, int] = {}     # error code -> submits refused with it
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0                    # sum of the done jobs' latencies
        self.finished = self._finished        # the done callback, bound once

    def _finished(self, job: Job, bisect: Callable[[Sequence[float], float], int] = bisect_left,
                  bounds: tuple[float, ...] = BUCKETS) -> None:
        # (bisect and bounds as defaults: locals, read faster than globals, per job)
        error = job.error
        if error is None:
            self.done += 1
            # finished_at is set before a job's callbacks run (were it not: a latency of 0)
            latency = (job.finished_at or job.submitted_at) - job.submitted_at
            self.buckets[bisect(bounds, latency)] += 1
            self.seconds += latency
            if job.streaming:
                self.streamed += 1
        elif type(error) is JobCancelled:
            self.cancelled += 1
        else:
            code = error.code
            self.failed[code] = self.failed.get(code, 0) + 1

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    @property
    def in_flight(self) -> int:
        """Accepted and not answered yet."""
        return self.accepted - self.done - self.cancelled - self.failed_total

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count)`` pairs, Prometheus's cumulative buckets, +Inf last."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.buckets):
            total += count
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the done jobs' latency in seconds, interpolated
        within its bucket as Prometheus's ``histogram_quantile`` does; None before the
        first done job.  Past the last bound it answers that bound."""
        return bucket_quantile(q, self.buckets)

    def to_dict(self) -> dict[str, object]:
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {"accepted": self.accepted, "done": self.done, "failed": dict(self.failed),
                "cancelled": self.cancelled, "refused": dict(self.refused),
                "streamed": self.streamed, "in_flight": self.in_flight,
                "latency_seconds": {"sum": round(self.seconds, 6), "buckets": list(self.buckets)},
                "latency_ms": {"p50": None if p50 is None else round(p50 * 1000, 3),
                               "p99": None if p99 is None else round(p99 * 1000, 3)}}


def bucket_quantile(q: float, buckets: list[int]) -> float | None:
    """The ``q`` quantile of counts in :data:`BUCKETS` (per-bucket, not cumulative,
    +Inf last), linearly interpolated within the bucket it falls in."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[i - 1] if i else 0.0
            return lower + (BUCKETS[i] - lower) * ((rank - seen) / count)
        seen += count
    return BUCKETS[-1]


class EventStats:
    """An app's :class:`EventCounts` by event name (at most :data:`MAX_EVENTS` + 1)."""

    __slots__ = ("_by_event",)

    def __init__(self) -> None:
        self._by_event: dict[str, EventCounts] = {}

    def _counts(self, event: str) -> EventCounts:
        counts = self._by_event.get(event)
        if counts is None:
            if len(self._by_event) >= MAX_EVENTS:
                event = OTHER
                counts = self._by_event.get(OTHER)
            if counts is None:
                counts = self._by_event[event] = EventCounts(event)
        return counts

    def accepted(self, event: str, job: Job) -> None:
        """``job`` (of ``event``) was accepted: count it now, and how it ends when it
        is answered."""
        counts = self._by_event.get(event) or self._counts(event)
        counts.accepted += 1
        try:
            job.add_done_callback(counts.finished)
        except AttributeError:   # a test's stand-in job without callbacks: accepted only
            pass

    def refused(self, event: str, code: str) -> None:
        """A submit of ``event`` was refused with the error whose code is ``code``
        (``queue-full``, ``app-broken``, ``shutting-down``)."""
        refused = self._counts(event).refused
        refused[code] = refused.get(code, 0) + 1

    def events(self) -> list[EventCounts]:
        """Every event's counters, by name (read them; do not change them)."""
        return [self._by_event[name] for name in sorted(self._by_event)]

    def get(self, event: str) -> EventCounts | None:
        return self._by_event.get(event)

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {c.name: c.to_dict() for c in self.events()}
