"""Errors the engine raises or delivers to callers.

Wire-visible ones subclass :class:`transport.errors.RemoteError` and are registered
under a stable ``code`` so clients rebuild the same type on the other side.
"""
from __future__ import annotations

from transport.errors import QueueFull, RemoteError, UnknownEvent, register_error

__all__ = [
    "AppBroken", "AppNotFound", "DriverError", "EngineError", "JobCancelled", "LanguageUnavailable",
    "ManifestError",
    "PeerLost",
    "QueueFull", "RedeployFailed", "RequestTimeout",
    "ShuttingDown", "SlaveDied", "SlaveHung", "UnknownEvent",
]


class EngineError(Exception):
    """Base of local (not wire-visible) engine errors."""


class ManifestError(EngineError):
    """A manifest that cannot be hosted: names the file, the field path and what was expected."""

    def __init__(self, file: str, path: str, expected: str, got: object = None):
        self.file = file
        self.path = path
        self.expected = expected
        self.got = got
        where = f"{file}: {path}" if path else file
        detail = f"expected {expected}"
        if got is not None:
            detail += f", got {got!r:.80}"
        super().__init__(f"{where}: {detail}")


class LanguageUnavailable(ManifestError):
    """The manifest's language plugin cannot run on this node: its runtime (or the
    library its slaves need) is not installed.  Refused at deploy; other apps run on."""

    def __init__(self, file: str, plugin: str, missing: str):
        self.plugin = plugin
        self.missing = missing
        super().__init__(file, "type", f"a language this node can run: the {plugin} plugin "
                                       f"needs {missing}")


class DriverError(EngineError):
    """A driver could not start (port taken, path missing...)."""


@register_error
class SlaveDied(RemoteError):
    """The slave running the job exited (crash, signal, OOM kill)."""

    code = "slave-died"
    retryable = True


@register_error
class SlaveHung(RemoteError):
    """The slave running the job missed heartbeats and was killed: the process stopped
    answering (stopped, wedged, its link gone quiet), not merely a slow job (that is
    :class:`RequestTimeout`'s business)."""

    code = "slave-hung"
    retryable = True


@register_error
class RequestTimeout(RemoteError):
    """The job was not answered within its app's ``request-timeout`` (queued and
    running time together).  Its handler was asked to stop; a slave whose handler
    cannot stop (a plain function) is replaced.  Not retried: the job may have run."""

    code = "request-timeout"


@register_error
class AppBroken(RemoteError):
    """The app's slaves keep dying before their handshake; it is backing off."""

    code = "app-broken"
    retryable = True


@register_error
class AppNotFound(RemoteError):
    """No app of that name is deployed on the node."""

    code = "app-not-found"


@register_error
class ShuttingDown(RemoteError):
    """The app or node is draining and accepts no new jobs."""

    code = "shutting-down"
    retryable = True


@register_error
class JobCancelled(RemoteError):
    """The job was cancelled (its caller gave up: a timeout, a disconnect,
    ``Job.cancel()``) before it was answered.  On the slave link, also the slave's
    acknowledgement of a CANCEL."""

    code = "cancelled"


@register_error
class RedeployFailed(RemoteError):
    """A new version of a running app could not start (its code does not import, a
    driver cannot bind, a redeploy is already under way): the running version keeps
    serving, untouched."""

    code = "redeploy-failed"


@register_error
class PeerLost(RemoteError):
    """The cluster node that was running a forwarded request went silent or left before
    it answered (or, on that node, the node that sent it did).  The request may or may
    not have run there, so it is not retried on another node: retrying is the caller's
    call."""

    code = "peer-lost"
