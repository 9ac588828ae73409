"""What every driver shares: option validation helpers and counters.

Drivers validate their manifest options with the helpers here so every mistake is a
:class:`engine.errors.ManifestError` naming the field path (``drivers.spool.path``)
and what was expected.  ``raw`` is the driver's manifest object; the keys the
manifest itself consumes (``type``, ``emit``) are ignored here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import trio
from transport.errors import QueueFull, RemoteError

from engine.errors import AppBroken, DriverError, ShuttingDown
from engine.drivers.registry import OptionContext

# Keys of a driver object that belong to the manifest, not to the driver.
COMMON_KEYS = frozenset({"type", "emit"})

_MISSING = object()


def check_keys(raw: Any, ctx: OptionContext, allowed: Iterable[str]) -> dict:
    """``raw`` must be an object with no keys beyond ``allowed`` (typos fail loudly)."""
    if not isinstance(raw, dict):
        raise ctx.error("", "an object", raw)
    known = COMMON_KEYS | set(allowed)
    for key in raw:
        if key not in known:
            raise ctx.error(str(key), f"no such option (known: {', '.join(sorted(allowed)) or 'none'})", raw[key])
    return raw


def opt_number(raw: dict, ctx: OptionContext, name: str, *, default: Any = _MISSING,
               minimum: float | None = None, integer: bool = False) -> Any:
    value = raw.get(name, default)
    if value is _MISSING:
        raise ctx.error(name, "a number (required)")
    if value is default and default is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ctx.error(name, kind, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ctx.error(name, f"a finite {kind[2:]}", value)
    if minimum is not None and value < minimum:
        raise ctx.error(name, f"{kind} >= {minimum:g}", value)
    return value


def opt_str(raw: dict, ctx: OptionContext, name: str, *, default: Any = _MISSING,
            choices: Iterable[str] | None = None) -> Any:
    value = raw.get(name, default)
    if value is _MISSING:
        raise ctx.error(name, "a string (required)")
    if value is default and default is None:
        return None
    if not isinstance(value, str) or not value:
        raise ctx.error(name, "a non-empty string", value)
    if choices is not None and value not in choices:
        raise ctx.error(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def opt_bool(raw: dict, ctx: OptionContext, name: str, *, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ctx.error(name, "true or false", value)
    return value


def parse_host_port(text: str, ctx: OptionContext, name: str) -> tuple[str, int]:
    """``host:port`` or ``tcp://host:port`` (port 0: the OS picks one)."""
    body = text[len("tcp://"):] if text.startswith("tcp://") else text
    host, sep, port = body.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ctx.error(name, "host:port (e.g. 127.0.0.1:9000)", text)
    return host, int(port)


# Schemes whose address is host:port (ws/wss may add a path after it).
_HOST_PORT_SCHEMES = ("tcp", "tls+tcp", "nng+tcp", "ws", "wss")


def check_url(text: str, ctx: OptionContext, name: str) -> str:
    """Catch at manifest load what would otherwise fail only when the driver binds:
    ``scheme://host:port`` needs a port in 0..65535 (host may be empty: every
    interface); ``ipc://``, ``unix://``, ``inproc://``... need a path or name."""
    scheme, sep, rest = text.partition("://")
    if scheme in _HOST_PORT_SCHEMES:
        hostport = rest.split("/", 1)[0] if scheme in ("ws", "wss") else rest
        _host, colon, port = hostport.rpartition(":")
        if not colon or not port.isdigit() or int(port) > 65535:
            raise ctx.error(name, f"{scheme}://host:port with a port in 0-65535", text)
    elif not sep or not rest.strip("/"):
        raise ctx.error(name, f"{scheme}:// followed by a path", text)
    return text


def sole_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (or exc itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextmanager
def bare_driver_errors() -> Iterator[None]:
    """Re-raise a DriverError that a nursery wrapped in a group as itself, so the
    app reports "port taken", not an exception group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = sole_leaf(group)
        if isinstance(leaf, DriverError):
            raise leaf from None
        raise


# Submission failures that mean "the pool has no room right now", as opposed to
# a job that ran and failed.  Timers count these as skipped ticks.
NO_ROOM = (QueueFull, ShuttingDown, AppBroken)


@dataclass
class DriverStats:
    """Counters every driver reports through ``info()``."""

    ticks: int = 0          # events seen (timer firings, requests, file changes)
    submitted: int = 0      # jobs handed to the pool
    skipped: int = 0        # events dropped or refused because the pool had no room
    done: int = 0           # jobs answered successfully
    errors: int = 0         # jobs that failed (handler errors, slave deaths...)
    last_error: str | None = None
    held: int = 0           # times the driver had to wait for room in the pool
    started_at: float = field(default_factory=time.time)

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"

    def as_dict(self) -> dict:
        return {
            "ticks": self.ticks, "submitted": self.submitted, "skipped": self.skipped,
            "done": self.done, "errors": self.errors, "last_error": self.last_error, "held": self.held,
            "in_flight": self.submitted - self.done - self.errors,
        }


# Backoff while the pool has no room (sinks, monitors): short at first so a brief
# burst costs little latency, capped so a long stall costs little CPU.
HOLD_BACKOFF = (0.002, 0.1)


async def submit_holding(app: Any, event: str, payload: Any, stats: DriverStats) -> Any:
    """Submit, waiting (with backoff) while the pool refuses for lack of room.

    For drivers whose source keeps its own backlog (a socket's buffers, the kernel's
    inotify queue): holding here stops them reading, so the backpressure reaches the
    producer instead of the event being dropped.  Only this driver's task waits.
    """
    delay = HOLD_BACKOFF[0]
    while True:
        try:
            job = app.submit(event, payload)
        except NO_ROOM:
            stats.held += 1 if delay == HOLD_BACKOFF[0] else 0
            await trio.sleep(delay)
            delay = min(delay * 2, HOLD_BACKOFF[1])
            continue
        stats.submitted += 1
        return job


async def run_job(job: Any, stats: DriverStats) -> Any:
    """Await a submitted job's result, counting it; RemoteErrors are counted and re-raised."""
    try:
        value = await job.result()
    except RemoteError as exc:
        stats.failed(exc)
        raise
    stats.done += 1
    return value


async def run_job_quietly(job: Any, stats: DriverStats) -> None:
    """For fire-and-forget events: the failure is counted (and shown in info/top), not raised."""
    try:
        await run_job(job, stats)
    except RemoteError:
        pass
