"""Polling for a message due any moment instead of sleeping until it comes.

A lone request to a peer that answers in tens of microseconds spends more of its round
trip waking up than on the wire: trio's I/O poll wakes the client's reader task, which
hands the answer to the caller, which is woken in turn; the server sleeps in the same
way between one request and the next.  Measured here between two processes (mesh
Requester → Responder, sequential): parking both sides ~8,500 round trips/s; the client
polling its socket for the answer (a non-blocking read in a loop: the kernel's
``busy_poll``, done in user space) ~17,000/s; the server also polling for its client's
next request ~24,000/s, p99 230 → 85 µs.  A bare trio TCP echo does ~16,000/s.

Polling holds the trio loop and burns CPU, so it is done only:

- for a message that is due: the answer to a client's only call in flight
  (``RpcClient``, on by default; a cluster link turns it off, the engine's other clients
  of a node keep it: ``python -m bench.polling`` measures why, docs/architecture.md has
  the figures); the next request of a server's only client once
  every earlier one is answered (``RpcServer(spin=True)``: the mesh Responder turns it
  on; the engine's node, a hub of many links, does not); the answer to a server's only
  request in flight, when its handler returned a :class:`Deferred` that can poll (the
  node: a lone job's reply from its slave, so the node wakes once per request, not
  twice; native-server sequential +8-20%);
- when no other task of the process is waiting in trio's run queue and no deadline
  falls within :data:`SPIN_BUDGET` (:func:`quiet`, which reads trio's runner: the one
  read of trio's privates, kept in :mod:`transport._trio_internals`), and for at most
  that long (a task trio already took into the current batch is not seen, and waits
  with the rest);
- while it pays (:class:`SpinPolicy`): a poll that ends empty-handed (a slow peer, or
  one in this same process, which cannot answer while we poll) makes the next 1, 2, 4
  … up to :data:`MAX_SKIP` chances park instead; a poll that gets its message ends
  that back-off.  A slow or in-process peer costs one wasted budget per thousand
  calls; a fast one gets every call polled.

A run of polled messages takes no scheduler pass (one costs about as much as the poll
saved) except every :data:`YIELD_EVERY`, which bounds how long other tasks' I/O waits.

Spinning only pays while the peer has a CPU of its own.  On a busy machine the peer's
message is late *because* we spin, and every µs spun is taken from it.  So a poll spins
only a little longer than a message met spinning usually waits, and hardly at all while
spins keep missing (:meth:`SpinPolicy.spin_for`), then sleeps in the kernel on the socket
(:func:`wait_readable`, up to :data:`SLEEP_BUDGET`): the thread is woken the moment
the message lands, with no pass through trio's scheduler, and costs no CPU meanwhile.
While asleep it also watches trio's own poller, so any other task's I/O (or a wake-up
from another thread) ends the wait at once: sleeping there is as attentive as trio's
own wait.  Measured here (2 vCPUs of a VM, mesh sequential): an idle machine keeps the
spinning figures (a prompt answer is met spinning; waking from sleep costs a VM ~60 µs
and more CPU than it saves), a loaded one stops burning the peer's CPU.
"""
from __future__ import annotations

import select
from time import perf_counter
from typing import Callable

import trio

from transport._trio_internals import io_fd, quiet

__all__ = ["MAX_SKIP", "SLEEP_BUDGET", "SPIN_BUDGET", "YIELD_EVERY", "SpinPolicy", "poll_for",
           "poll_next", "quiet", "spin_until", "wait_readable"]

SPIN_BUDGET = 150e-6   # s: about 2.5 fast round trips here, well under a slow one
MAX_SKIP = 1024        # chances to poll given up after a run of empty-handed polls, at most
YIELD_EVERY = 1e-3     # s: the longest run of polled messages without a scheduler pass
SLEEP_BUDGET = 1e-3    # s: the longest wait asleep for a due message (trio's I/O wakes it)
SPIN_FIRST_MIN = 10e-6  # s: the least spun before sleeping


class SpinPolicy:
    """Pure bookkeeping (no I/O; the caller passes the time): whether the next chance
    to poll is taken, how long it spins before it sleeps, and when a run of polled
    messages must yield.

    Two back-offs, each doubling per miss in a row (1, 2, 4 … ``max_skip``) and ended
    by a hit: a poll that got nothing at all (a slow peer, or one in this process)
    makes the next chances park instead (:meth:`allow`); one that got its message only
    after it went to sleep makes the next ones sleep at once instead of spinning
    (:meth:`spin_for`), so a slow peer is not spun for, yet a spin now and then finds
    out when the peer is prompt again.  The spin's length is learnt only from messages
    met spinning: one met asleep waited the wake-up too, and learning from it would
    lengthen the wait it is meant to measure."""

    __slots__ = ("budget", "max_skip", "polls", "hits", "typical", "_skip", "_penalty",
                 "_spin_skip", "_spin_penalty", "_spun", "_yield_at")

    def __init__(self, budget: float | None = None, max_skip: int = MAX_SKIP) -> None:
        # SPIN_BUDGET read now, not at import: a test on a loaded machine raises it.
        self.budget = SPIN_BUDGET if budget is None else budget
        self.max_skip = max_skip
        self.polls = 0        # polls made
        self.hits = 0         # polls that got their message
        self.typical = SPIN_BUDGET / 4  # s: how long a hit met spinning waited (average)
        self._skip = 0        # chances still to give up before the next poll
        self._penalty = 0     # what the last empty-handed poll cost, in chances
        self._spin_skip = 0   # polls still to sleep at once, without spinning
        self._spin_penalty = 0
        self._spun = False    # the current poll was given a spin of its own
        self._yield_at = 0.0

    @property
    def skipping(self) -> int:
        return self._skip

    def allow(self) -> bool:
        """Take this chance to poll?  One refused counts toward the back-off."""
        if self._skip:
            self._skip -= 1
            return False
        return True

    def spin_for(self) -> float:
        """How long the poll now starting spins before it sleeps until its socket is
        readable: a little over what a message met spinning usually waits (a prompt
        peer's is met spinning: waking from sleep costs a VM tens of µs), at most the
        budget; hardly at all while spins keep missing (see the class)."""
        if self._spin_skip:
            self._spin_skip -= 1
            self._spun = False
            return SPIN_FIRST_MIN
        self._spun = True
        return min(self.budget, SPIN_FIRST_MIN + 2 * self.typical)

    def record(self, hit: bool, waited: float | None = None, asleep: bool = False) -> None:
        """How an allowed poll ended: ``waited`` s for its message if it was a hit,
        ``asleep`` if it went to sleep first."""
        self.polls += 1
        if hit:
            self.hits += 1
            self._penalty = 0
            if not asleep:
                self._spin_penalty = 0
                if waited is not None:
                    self.typical += (waited - self.typical) / 8
            elif self._spun:  # it spun, in vain: spin less often for a while
                self._spin_penalty = min(self.max_skip, self._spin_penalty * 2 or 1)
                self._spin_skip = self._spin_penalty
        else:
            self._penalty = min(self.max_skip, self._penalty * 2 or 1)
            self._skip = self._penalty
        self._spun = False

    def yield_due(self, now: float) -> bool:
        """Is a scheduler pass due (one every YIELD_EVERY)?"""
        if now >= self._yield_at:
            self._yield_at = now + YIELD_EVERY
            return True
        return False


def wait_readable(fd: int, io: int, timeout: float) -> bool:
    """Sleep in the kernel until ``fd`` is readable (True), or ``timeout`` s pass, or
    ``io`` (trio's poller: :func:`transport._trio_internals.io_fd`) is readable, that
    is, anything else this run waits for is ready (False: trio's turn)."""
    try:
        ready, _, _ = select.select((fd, io), (), (), timeout)
    except (ValueError, OSError):  # a descriptor past select's range, or closed
        return False
    return fd in ready


def _sleeping(policy: SpinPolicy, fd: int) -> tuple[int | None, float]:
    """(trio's poller, or None when the poll cannot sleep: no socket, or no poller
    found) and the poll's whole budget: longer when it may sleep, which costs no CPU."""
    io = io_fd() if fd >= 0 else None
    return io, policy.budget if io is None else max(policy.budget, SLEEP_BUDGET)


def spin_until(policy: SpinPolicy, step: Callable[[], object],
               done: Callable[[], bool], fd: int = -1) -> bool:
    """One chance to poll for an answer that is due: if the policy allows it and the
    process is quiet, call ``step`` (read and act on whatever has arrived) until
    ``done()`` or the budget is spent; the policy records how it ended (also when
    ``step`` raises, which propagates).  True if it is done.  ``fd``: the socket the
    answer comes on; after spinning for :meth:`SpinPolicy.spin_for` the thread sleeps
    in the kernel until it is readable (:func:`wait_readable`), up to
    :data:`SLEEP_BUDGET`, instead of spinning on."""
    io, budget = _sleeping(policy, fd)
    if not policy.allow() or not quiet(budget):
        return False
    start = perf_counter()
    end = start + budget
    spin_end = end if io is None else start + policy.spin_for()
    asleep = False
    try:
        while True:
            step()
            if done():
                break
            now = perf_counter()
            if now < spin_end:
                continue
            if now >= end or io is None:
                break
            asleep = True
            if not wait_readable(fd, io, end - now):
                step()  # (whatever came with trio's turn)
                break
    finally:
        hit = done()
        policy.record(hit, perf_counter() - start if hit else None, asleep)
    return hit


async def poll_next(policy: SpinPolicy | None, poll: Callable[[], list[bytes]],
                    expecting: Callable[[], bool], fd: int = -1) -> list[bytes]:
    """For a loop that reads its next message once it has acted on the last (a
    server): that message polled for a moment, when ``expecting()`` (nothing of its
    own still in progress, so the peer's next move is to send it) and the policy and
    the process allow; [] otherwise, and then the loop parks as usual.
    Yields every YIELD_EVERY first (a run of polled messages never reaches the
    loop's own checkpoint), where nothing is read yet, so a cancellation loses
    nothing."""
    if policy is None:
        return []
    if policy.yield_due(perf_counter()):
        await trio.lowlevel.checkpoint()
    io, budget = _sleeping(policy, fd)
    if not expecting() or not policy.allow() or not quiet(budget):
        return []
    start = perf_counter()
    spin = policy.spin_for() if io is not None else budget
    got = poll_for(poll, budget, fd if io is not None else -1, spin, io)
    waited = perf_counter() - start
    policy.record(bool(got), waited if got else None, waited > spin)
    return got


def poll_for(poll: Callable[[], list[bytes]], budget: float, fd: int = -1,
             spin: float | None = None, io: int | None = None) -> list[bytes]:
    """What ``poll`` returns as soon as it returns something, or [] after ``budget`` s.
    ``fd``: the socket ``poll`` reads; after ``spin`` s (default :data:`SPIN_BUDGET`)
    the thread sleeps in the kernel until it is readable (:func:`wait_readable`)
    instead of spinning on."""
    clock = perf_counter
    start = clock()
    end = start + budget
    if fd >= 0 and io is None:
        io = io_fd()
    spin_end = end if io is None or fd < 0 else start + (SPIN_BUDGET if spin is None else spin)
    while True:
        frames = poll()
        if frames:
            return frames
        now = clock()
        if now >= end:
            return frames
        if now >= spin_end and (io is None or not wait_readable(fd, io, end - now)):
            return poll()
