"""Which beacon destinations are failing, since when and why: what discovery logs and
what :meth:`Discovery.problems` shows.  Pure (fed sends and failures with the time).

A beacon that cannot be sent costs only that beacon, so discovery never stops for it;
but a destination that *keeps* failing (the broadcast address on a host without a
route for it, an unreachable seed) leaves a node running alone, and that must be seen:
one warning when a destination starts failing (or fails differently), one note when it
works again, never a line per beacon.
"""
from __future__ import annotations

import errno as errno_module
import os
from dataclasses import dataclass

Address = tuple[str, int]


def errno_name(code: int | None) -> str:
    """``ENETUNREACH`` for 101 (the number itself when it has no name)."""
    if code is None:
        return "error"
    return errno_module.errorcode.get(code, str(code))


def describe_errno(code: int | None) -> str:
    """``ENETUNREACH (Network is unreachable)``."""
    if code is None:
        return "error"
    return f"{errno_name(code)} ({os.strerror(code)})"


@dataclass
class Failing:
    """A destination failing since ``since`` with ``errno`` (``count`` failures)."""

    errno: int | None
    since: float
    count: int = 1


class BeaconHealth:
    """Failing destinations, bounded by the caller (it tracks only the destinations it
    beacons to, which are bounded, and :meth:`keep` drops the rest)."""

    def __init__(self) -> None:
        self._failing: dict[Address, Failing] = {}

    def __bool__(self) -> bool:
        return bool(self._failing)

    def failed(self, dest: Address, errno: int | None, now: float) -> bool:
        """Record a failure; True when it should be logged: the first for ``dest``, or
        a different error than before (the time it started is kept then)."""
        current = self._failing.get(dest)
        if current is None:
            self._failing[dest] = Failing(errno, now)
            return True
        current.count += 1
        if current.errno != errno:
            current.errno = errno
            return True
        return False

    def sent(self, dest: Address) -> Failing | None:
        """Record a success; the failure it ends (to be logged), if ``dest`` was failing."""
        if not self._failing:
            return None
        return self._failing.pop(dest, None)

    def keep(self, dests: set[Address]) -> None:
        """Forget destinations no longer beaconed to (a peer gone, its address with it)."""
        for dest in [d for d in self._failing if d not in dests]:
            del self._failing[dest]

    def problems(self, now: float) -> list[str]:
        return [f"beacons to {host}:{port} not sent: {errno_name(f.errno)} since "
                f"{now - f.since:.0f} s ({f.count} failed)"
                for (host, port), f in self._failing.items()]


__all__ = ["BeaconHealth", "Failing", "describe_errno", "errno_name"]
