"""The browser-facing wire format of Sockend: pure, no I/O, no trio.

One JSON object per websocket *text* frame (docs/sockend.md has the full grammar):

- browser → sockend: ``{"id": 1, "type": "randomRequest", "data": {...}, "timeout": 2.5}``
  (``data`` and ``timeout`` optional); an upload adds ``"chunked": true`` and is followed
  by ``{"id": 1, "chunk": <any JSON>}``... and ``{"id": 1, "end": true}``, the browser
  keeping at most 64 chunks beyond the credit granted;
- sockend → browser: ``{"id": 1, "ok": true, "data": ...}`` or
  ``{"id": 1, "ok": false, "error": {"code", "type", "message", "retryable"}}``,
  ``{"id": 1, "credit": n}`` (an upload may send n more chunks), and publisher events
  ``{"event": "randomUpdate", "data": ...}``.

:func:`parse_request` is the only parser that faces the network; it raises only
:class:`BadFrame`, which carries the request id when one could be read so the browser
can match the error to its call.  :class:`EventOutbox` is the per-browser bounded event
buffer: a browser that does not keep up skips events (counted, and told how many) and
is evicted after too many, so it never holds back the others.
"""
from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from transport.errors import BadMessage, RemoteError, error_to_body

MAX_ID_LENGTH = 128
MAX_TYPE_LENGTH = 256
_NAMESPACE = re.compile(r"[A-Za-z0-9_.~-]{1,64}")

SKIPPED_EVENT = "$skipped"   # sent to a browser that missed events: {"count": n}


class BadFrame(ValueError):
    """A browser frame that is not a valid request.  ``id`` is the request id when the
    frame was readable far enough to have one (else None); ``error`` is what to send."""

    def __init__(self, message: str, id: Any = None):
        super().__init__(message)
        self.id = id
        self.error = BadMessage(message)


class BadPath(ValueError):
    """A websocket path that names no valid namespace."""


def namespace_from_path(path: str) -> str:
    """``/`` → the default namespace ``""``, ``/rnd`` → ``rnd`` (socket.io style).
    A query string is ignored; anything but one plain segment is refused."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        raise BadPath(f"path must start with '/', got {path[:80]!r}")
    name = path[1:].rstrip("/") if path != "/" else ""
    if name and not _NAMESPACE.fullmatch(name):
        raise BadPath(f"namespace must be 1-64 of [A-Za-z0-9_.~-], got {name[:80]!r}")
    return name


@dataclass(frozen=True)
class ClientRequest:
    id: int | str
    type: str
    data: dict[str, Any]
    timeout: float | None = None
    chunked: bool = False     # an upload: chunk frames follow


@dataclass(frozen=True)
class ClientChunk:
    """One chunk of an upload (``end``: the upload is complete, ``value`` unused)."""
    id: int | str
    value: Any = None
    end: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(message: str | bytes) -> ClientRequest | ClientChunk:
    """Decode one browser frame: a request, or a chunk of an upload.  Raises only
    :class:`BadFrame`."""
    if not isinstance(message, str):
        raise BadFrame("binary frames are not accepted: send JSON text frames")
    try:
        obj = json.loads(message, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(f"not JSON: {exc}"[:200]) from None
    if not isinstance(obj, dict):
        raise BadFrame("a request is a JSON object")
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str)) \
            or (isinstance(rid, str) and not 0 < len(rid) <= MAX_ID_LENGTH) \
            or (isinstance(rid, int) and not -2**53 < rid < 2**53):
        raise BadFrame("'id' must be an integer or a string of 1-128 characters")
    if "chunk" in obj or "end" in obj:  # a frame of an upload in progress
        if set(obj) == {"id", "chunk"}:
            return ClientChunk(rid, obj["chunk"])
        if set(obj) == {"id", "end"} and obj["end"] is True:
            return ClientChunk(rid, end=True)
        raise BadFrame("an upload frame is {id, chunk} or {id, end: true}", rid)
    rtype = obj.get("type")
    if not isinstance(rtype, str) or not 0 < len(rtype) <= MAX_TYPE_LENGTH:
        raise BadFrame("'type' must be a string of 1-256 characters", rid)
    data = obj.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadFrame("'data' must be a JSON object (it becomes the request, plus 'type')", rid)
    timeout = obj.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise BadFrame("'timeout' must be a positive number of seconds", rid)
    chunked = obj.get("chunked", False)
    if chunked is not True and chunked is not False:
        raise BadFrame("'chunked' must be true or false", rid)
    extra = set(obj) - {"id", "type", "data", "timeout", "chunked"}
    if extra:
        raise BadFrame(f"unknown fields: {sorted(extra)[:5]}", rid)
    return ClientRequest(rid, rtype, data, float(timeout) if timeout is not None else None,
                         chunked)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def error_frame(rid: Any, exc: BaseException) -> str:
    return _dumps({"id": rid, "ok": False, "error": error_to_body(exc)})


def ok_frame(rid: Any, data: Any) -> str:
    """The answer frame; an answer JSON cannot carry (bytes, NaN, ...) becomes an error
    rather than a crash or a silently mangled value."""
    try:
        return _dumps({"id": rid, "ok": True, "data": data})
    except (TypeError, ValueError, RecursionError) as exc:
        return error_frame(rid, RemoteError(f"the answer cannot be sent as JSON: {exc}"[:300],
                                            type="Unserializable"))


def credit_frame(rid: Any, chunks: int) -> str:
    return _dumps({"id": rid, "credit": chunks})


def event_frame(name: str, data: Any) -> str | None:
    """The event frame, or None when the event's data cannot be JSON (the caller counts it)."""
    try:
        return _dumps({"event": name, "data": data})
    except (TypeError, ValueError, RecursionError):
        return None


# -- per-browser event buffer -----------------------------------------------------------

QUEUED, SKIPPED, EVICT = "queued", "skipped", "evict"


class EventOutbox:
    """Events waiting to be written to one browser, at most ``limit`` of them.

    ``push`` never blocks: when full the event is skipped for this browser and counted;
    the count is reported to the browser (a ``$skipped`` event) as soon as it catches
    up, in order, so it knows exactly where the gap is.  ``push`` answers ``EVICT`` once
    more than ``max_skipped`` events in a row were skipped without the browser reading
    a single one: it is stalled, not merely slow.
    """

    def __init__(self, limit: int = 256, max_skipped: int = 4096,
                 skipped_frame: Callable[[int], Any] | None = None):
        if limit < 1 or max_skipped < 0:
            raise ValueError("need limit >= 1 and max_skipped >= 0")
        self._skipped_frame = skipped_frame or _skipped_frame   # (a protocol's own form)
        self.limit = limit
        self.max_skipped = max_skipped
        self._items: deque[Any] = deque()
        self._gap = 0          # events skipped after the last queued one, not yet reported
        self.skipped_total = 0
        self._skipped_run = 0  # skipped in a row, with no room made in between

    def push(self, frame: Any) -> str:
        if len(self._items) >= self.limit:
            self._gap += 1
            self.skipped_total += 1
            self._skipped_run += 1
            return EVICT if self._skipped_run > self.max_skipped else SKIPPED
        self._skipped_run = 0   # the browser made room: it is slow, not stalled
        if self._gap:
            # Report the gap in its place, so the browser knows exactly what it missed.
            self._items.append(self._skipped_frame(self._gap))
            self._gap = 0
        self._items.append(frame)
        return QUEUED

    def pop(self) -> Any:
        """The next frame to write (possibly a ``$skipped`` notice), or None when empty."""
        if self._items:
            return self._items.popleft()
        if self._gap:
            frame, self._gap = self._skipped_frame(self._gap), 0
            return frame
        return None

    def __len__(self) -> int:
        return len(self._items) + (1 if self._gap else 0)


def _skipped_frame(count: int) -> str:
    return _dumps({"event": SKIPPED_EVENT, "data": {"count": count}})
