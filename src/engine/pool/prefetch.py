"""How far a slave may run ahead of its node: the pool's prefetch rule (pure, no I/O).

A slave with ``concurrency`` slots may be handed more jobs than it runs at once; it
queues them (FIFO) and starts the next the moment a slot frees, with no node <-> slave
round trip in between.  For short jobs that is several times the throughput (bench:
6,000 -> 25,000 echo requests/s through 2 slaves with concurrency 1).  The price is
head-of-line blocking: a job queued on a slave waits behind the jobs ahead of it there,
even if another slave goes idle meanwhile.  Celery prefetches a fixed 4 tasks per
worker and documents that caveat; here the engine decides per job:

- ``prefetch: "auto"`` (the default): a job may be queued on a busy slave only when
  the jobs that slave already holds are *expected* to be done within
  ``PREFETCH_BUDGET`` (2 ms) per slot.  The expectation is each held job's event's
  recent service time (an EWMA per event, measured by the policy when a slave answers);
  an event never answered yet has no estimate, so nothing is queued behind it.  Slow
  events (a 50 ms report, a hung ``while True``) are therefore never prefetched behind,
  while a stream of 0.1 ms echoes fills a slave up to ``AUTO_PREFETCH_MAX`` deep.
  The bound holds as far as the past predicts the future: a usually quick event that
  suddenly takes long still delays what was queued behind it (at most 16 jobs).
- ``prefetch: N``: always up to N jobs beyond concurrency, whatever they are; 0 = off.

Either way a free slot anywhere wins over queueing behind a busy slave (the policy's
least-loaded choice), and a slave that dies fails its queued jobs with SlaveDied like
the one it was running: they are not requeued, since the node cannot know whether the
slave had started them, and running a job twice is worse than reporting a failure.
"""
from __future__ import annotations

from typing import Any, Literal

AUTO_PREFETCH_MAX = 16    # most jobs an auto-prefetching slave holds beyond its concurrency
PREFETCH_BUDGET = 0.002   # s of expected work ahead (per slot) a queued job may wait behind
SERVICE_EWMA_ALPHA = 0.2  # weight of the newest service-time sample
MAX_EVENTS = 1024         # events with an estimate; past that, new events get none

Setting = int | Literal["auto"]


def check_setting(value: object) -> Setting:
    if value == "auto":
        return "auto"
    if type(value) is int and value >= 0:  # not a bool
        return value
    raise ValueError(f"prefetch must be \"auto\" or a whole number >= 0, got {value!r}")


class ServiceTimes:
    """How long each event's jobs take: an EWMA per event, for at most ``MAX_EVENTS``
    events (the thread backend uses it too, to choose inline or thread)."""

    def __init__(self) -> None:
        self.service: dict[str, float] = {}  # event -> EWMA of its service time, seconds

    def estimate(self, event: str) -> float | None:
        """Expected service time of ``event`` (None: never measured yet)."""
        return self.service.get(event)

    def sample(self, event: str, seconds: float) -> None:
        old = self.service.get(event)
        if old is not None:
            self.service[event] = old + SERVICE_EWMA_ALPHA * (seconds - old)
        elif len(self.service) < MAX_EVENTS:
            self.service[event] = seconds


class PrefetchRule(ServiceTimes):
    """The rule, and the service times it judges by (sampled by the pool policy)."""

    def __init__(self, setting: Setting) -> None:
        super().__init__()
        self.setting = setting = check_setting(setting)
        self.auto = setting == "auto"
        self.limit = AUTO_PREFETCH_MAX if setting == "auto" else setting

    def allows(self, queued: int, held: dict[str, int], concurrency: int) -> bool:
        """May a slave whose ``concurrency`` slots are all taken, holding ``queued``
        jobs beyond them and ``held`` jobs per event in all, take one more to queue?
        (Judged by today's estimates, so a slave stops getting more as soon as one of
        the events it holds turns out slow.)"""
        if queued >= self.limit:
            return False
        if not self.auto:
            return True
        ahead = 0.0
        service = self.service
        for event, n in held.items():  # one or two events, typically
            estimate = service.get(event)
            if estimate is None:
                return False
            ahead += n * estimate
        return ahead <= PREFETCH_BUDGET * concurrency

    def info(self) -> dict[str, Any]:
        slowest = sorted(self.service.items(), key=lambda kv: -kv[1])[:10]
        return {"mode": "auto" if self.auto else "fixed", "max": self.limit,
                "service_ms": {event: round(s * 1000, 3) for event, s in slowest}}
