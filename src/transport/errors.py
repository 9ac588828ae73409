"""Typed errors that cross the wire.

Every failure a caller can see is an instance of :class:`RemoteError` (or a subclass
registered under a stable ``code``).  On the wire an error is a msgpack map
``{"code": str, "type": str, "message": str, "retryable": bool}`` so a client in any
language can read it, plus ``"data"`` (any msgpack value) when the error carries a value
for its caller (:class:`Rejected`: cote's "reject the promise with any value");
:func:`error_to_body` and :func:`body_to_error` convert.
"""
from __future__ import annotations

from typing import Any


class TransportError(Exception):
    """Base class of everything this package raises."""


class CodecError(TransportError):
    """Bytes that are not a valid frame or envelope."""


class Closed(TransportError):
    """The socket or channel was closed."""


_REGISTRY: dict[str, type["RemoteError"]] = {}


def register_error(cls: type["RemoteError"]) -> type["RemoteError"]:
    """Class decorator: make ``body_to_error`` rebuild ``cls`` from its ``code``."""
    _REGISTRY[cls.code] = cls
    return cls


@register_error
class RemoteError(TransportError):
    """An error delivered to a caller: a stable ``code``, the original ``type`` name,
    a human ``message`` and whether retrying the same request may succeed."""

    code = "error"
    retryable = False

    data: Any = None     # a value for the caller (None: none), sent as the body's "data"

    def __init__(self, message: str = "", *, type: str | None = None, retryable: bool | None = None,
                 data: Any = None):
        super().__init__(message)
        self.message = message
        self.type = type or self.__class__.__name__
        if retryable is not None:
            self.retryable = retryable
        if data is not None:
            self.data = data

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type

    def __reduce__(self):  # keep pickling (e.g. across threads) faithful
        return (_rebuild, (self.code, self.message, self.type, self.retryable, self.data))


def _rebuild(code: str, message: str, type_: str, retryable: bool, data: Any = None) -> RemoteError:
    return body_to_error({"code": code, "message": message, "type": type_, "retryable": retryable,
                          "data": data})


@register_error
class TimeoutError_(RemoteError):
    """No answer within the caller's deadline."""

    code = "timeout"
    retryable = True


@register_error
class QueueFull(RemoteError):
    """Backpressure: the receiver's bounded queue is full; the request was not accepted."""

    code = "queue-full"
    retryable = True


@register_error
class Unreachable(RemoteError):
    """No peer could be reached to serve the request."""

    code = "unreachable"
    retryable = True


@register_error
class UnknownEvent(RemoteError):
    """The receiver has no handler for the requested event or type."""

    code = "unknown-event"


@register_error
class BadMessage(RemoteError):
    """The request could not be decoded or has the wrong shape."""

    code = "bad-message"


@register_error
class Unauthorized(RemoteError):
    """The receiver requires credentials the request did not carry, or carried wrong
    (e.g. a node's control endpoint without its token: docs/security.md)."""

    code = "unauthorized"


@register_error
class Forbidden(RemoteError):
    """A policy refused the request (a Sockend hook: sockend/hooks.py), whoever asks
    and however often: not retryable."""

    code = "forbidden"


@register_error
class HandlerError(RemoteError):
    """User code raised; ``type`` is the exception's class name."""

    code = "handler"


@register_error
class Rejected(RemoteError):
    """A handler's refusal carrying a value for its caller, as cote's handlers reject
    their promise with any value: ``raise Rejected({"reason": "out of stock"})``; the
    caller catches ``Rejected`` and reads ``.data``."""

    code = "rejected"

    def __init__(self, data: Any = None, message: str = "", *, type: str | None = None,
                 retryable: bool | None = None):
        if not message and data is not None:
            message = f"{data!r:.200}"
        super().__init__(message, type=type, retryable=retryable, data=data)


def error_to_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, RemoteError):
        body = {"code": exc.code, "type": exc.type, "message": exc.message,
                "retryable": exc.retryable}
        if exc.data is not None:
            body["data"] = exc.data
        return body
    return {"code": HandlerError.code, "type": type(exc).__name__, "message": str(exc), "retryable": False}


def body_to_error(body: Any) -> RemoteError:
    """Rebuild a typed error from a wire body; anything malformed becomes a BadMessage."""
    if not isinstance(body, dict):
        return BadMessage(f"malformed error body: {body!r:.200}")
    code = body.get("code")
    cls = _REGISTRY.get(code, RemoteError) if isinstance(code, str) else RemoteError
    message = body.get("message", "")
    type_ = body.get("type")
    retryable = body.get("retryable")
    error = cls.__new__(cls)
    RemoteError.__init__(
        error, message if isinstance(message, str) else repr(message),
        type=type_ if isinstance(type_, str) else None,
        retryable=retryable if isinstance(retryable, bool) else None,
        data=body.get("data"),
    )
    return error
