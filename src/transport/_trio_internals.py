"""The one place this package reads trio's private state: is the run loop quiet?

Polling for a message due any moment (:mod:`transport._spin`) must not hold the loop
while another task waits to run or a deadline is near.  trio answers that publicly with
``trio.lowlevel.current_statistics()``, but it first counts the waiters of every
registered descriptor: 4 µs with none and 30 µs with 1,000 sockets here, asked once per
poll of a round trip that takes 40 µs.  trio's runner has the two facts at hand (its run
queue and its deadline heap), so :func:`quiet` reads them there.

Those are trio's privates, so they are looked up here only, once, when this module is
imported: if a trio release moved them, :func:`quiet` is the public (slower, equally
correct) way for the whole process, and a :class:`RuntimeWarning` says so once.
``pyproject.toml`` pins trio below the next minor release for the same reason; the
test ``test_quiet_reads_trios_run_state_directly`` notices a move first.

It also hands out trio's epoll descriptor (:func:`io_fd`), which a poll that sleeps
watches beside its own socket (:func:`transport._spin.wait_readable`); where it is not
found, polls spin as they did before they could sleep.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import trio

__all__ = ["FAST", "io_fd", "quiet", "quiet_public"]

# What quiet() reads: GLOBAL_RUN_CONTEXT.runner.{runq, deadlines.next_deadline(), clock}.
_RUNNER_FIELDS = ("runq", "deadlines", "clock")

_warned = False


def _resolve() -> tuple[Any, str | None]:
    """trio's per-thread run context, or None and why it is not where expected."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT, Deadlines, Runner
    except ImportError as exc:
        return None, f"trio._core._run has moved ({exc})"
    try:
        fields = inspect.get_annotations(Runner)
    except TypeError as exc:  # not a class any more
        return None, f"trio's Runner is not a class ({exc})"
    missing = [name for name in _RUNNER_FIELDS if name not in fields]
    if missing:
        return None, f"trio's Runner has no {', '.join(missing)}"
    if not callable(getattr(Deadlines, "next_deadline", None)):
        return None, "trio's Deadlines has no next_deadline()"
    return GLOBAL_RUN_CONTEXT, None


def _warn_once(why: str) -> None:
    """One warning per process, however often trio's internals are found missing."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(f"transport: {why} (trio {trio.__version__}); polling for messages now "
                  "asks trio.lowlevel.current_statistics(), which is slower",
                  RuntimeWarning, stacklevel=2)


def quiet_public(budget: float) -> bool:
    """:func:`quiet` the public way (what the fast one is checked against)."""
    stats = trio.lowlevel.current_statistics()
    return not stats.tasks_runnable and stats.seconds_to_next_deadline >= budget


def _select(resolve: Callable[[], tuple[Any, str | None]]) -> Callable[[float], bool]:
    """The quiet() this process uses: read from trio's runner when ``resolve`` finds it,
    else the public one (and a warning, once)."""
    context, why = resolve()
    if why is not None:
        _warn_once(why)
        return quiet_public

    def quiet_fast(budget: float) -> bool:
        """:func:`quiet_public`, read from trio's runner."""
        try:
            runner = context.runner
            if runner.runq:
                return False
            due: bool = runner.deadlines.next_deadline() - runner.clock.current_time() >= budget
            return due
        except AttributeError as exc:  # outside a run (the public way raises for that),
            answer = quiet_public(budget)  # or a runner unlike the one resolved: say so
            _warn_once(f"trio's runner has changed shape ({exc})")
            return answer

    return quiet_fast


# No task of this trio run is in the run queue, and none is due within ``budget`` s
# (call it inside a trio run only).
quiet: Callable[[float], bool] = _select(_resolve)
# True when quiet() reads trio's runner directly (a trio that moved it: False).
FAST = quiet is not quiet_public


def _io_fd_from(context: Any) -> Callable[[], int | None]:
    def io_fd() -> int | None:
        """The descriptor of this trio run's I/O poller (epoll on Linux), or None.

        It polls readable as soon as anything the run waits for is ready: another
        task's socket, a wake-up from another thread, a signal.  Sleeping in the kernel
        on it and on one socket of our own (:func:`transport._spin.wait_readable`) is
        then as attentive as trio's own wait, without a pass through its scheduler.
        None where trio's I/O manager is not epoll (another OS) or has moved: callers
        then spin without sleeping, as before."""
        if context is None:
            return None
        try:
            return int(context.runner.io_manager._epoll.fileno())
        except (AttributeError, ValueError):
            return None

    return io_fd


io_fd: Callable[[], int | None] = _io_fd_from(_resolve()[0])
