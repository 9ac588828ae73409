"""Just enough HTTP/1.1 for Sockend's single port: read a request head, tell a websocket
upgrade from a plain GET, and answer the latter with a static file.

One :class:`HttpExchange` per connection: an h11 server connection parses the request
head (bounded in size; the caller bounds the time) and writes the response, so the
status line, the framing (``Content-Length``, no body after a HEAD) and
``Connection: close`` come from h11 and match the request h11 parsed.  h11 is already a
dependency of trio-websocket's wsproto.  The bytes read (:attr:`RequestHead.raw`) are
handed to the websocket handshake (:mod:`sockend.ws`), so it sees the request exactly as
sent; a Socket.IO POST's body is read after the head (:meth:`HttpExchange.read_body`).

Static files: ``/sockend.js`` is the browser client shipped in this package; with a
``static`` directory, ``/`` is its ``index.html`` and ``/name`` any file directly in it
(or below it).  Every path is resolved and must stay inside the directory (no ``..``, no
symlink escape), and no segment of it may start with a dot, neither as asked nor once
resolved (``/.env``, ``/.git/config``, a visible symlink to either): a site folder is
often a project folder, and its dotfiles are its secrets.  A refused path gets the same
404 as a missing file, so nothing tells what exists.  Only GET and HEAD; every response
closes the connection.
"""
from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

import h11
import trio

MAX_HEAD = 8192
MAX_FILE = 16 * 1024 * 1024
CLIENT_DIR = Path(__file__).parent / "static"
TEXT = "text/plain; charset=utf-8"
_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]+")
_TEXT_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".html": "text/html",
               ".css": "text/css", ".json": "application/json", ".txt": "text/plain"}


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]   # lower-case names; repeated headers joined with ", "
    raw: bytes                # every byte read so far (the head and anything after it)

    @property
    def is_websocket(self) -> bool:
        return "websocket" in self.headers.get("upgrade", "").lower()


class HeadError(Exception):
    """The peer sent no valid request head (garbage, too big, or closed early)."""


class HttpExchange:
    """One request head in, one response out, through one h11 server connection.

    :meth:`receive` and :meth:`response` are pure (bytes in, bytes out);
    :meth:`read_head` is the only I/O.  A response can be made whether or not a head
    was parsed: after a :class:`HeadError` it is the ``400`` h11 allows an unparsable
    request.
    """

    def __init__(self) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._raw = bytearray()
        self._head_only = False   # the request was a HEAD: the response has no body

    def receive(self, data: bytes | bytearray) -> RequestHead | None:
        """Feed bytes read from the peer: the request head once it is complete, else
        None (read more).  Raises HeadError."""
        self._raw += data
        if len(self._raw) > MAX_HEAD + 4096:
            raise HeadError("request head too large")
        self._conn.receive_data(bytes(data))
        return self._next_head()

    def _next_head(self) -> RequestHead | None:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HeadError(f"bad request head: {exc}") from None
        if isinstance(event, h11.Request):
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("latin-1").lower()
                val = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
            method = event.method.decode("ascii", "replace")
            self._head_only = method == "HEAD"
            return RequestHead(method, event.target.decode("latin-1"), headers, bytes(self._raw))
        if event is not h11.NEED_DATA:
            raise HeadError(f"unexpected {type(event).__name__} before a request head")
        return None

    async def read_head(self, stream: trio.abc.ReceiveStream) -> RequestHead:
        """Read one request head (the caller bounds the time).  Raises HeadError.
        A request body stays in the h11 connection for :meth:`read_body`."""
        while True:
            data = await stream.receive_some(4096)
            if not data:
                raise HeadError("connection closed before a request head")
            head = self.receive(data)
            if head is not None:
                return head

    async def read_body(self, stream: trio.abc.ReceiveStream, limit: int) -> bytes:
        """The request's body, after :meth:`read_head` (the caller bounds the time).
        Raises HeadError when it is over ``limit`` bytes or the peer stops early."""
        body = bytearray()
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HeadError(f"bad request body: {exc}") from None
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise HeadError(f"request body over {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    raise HeadError("connection closed inside a request body")
                self._conn.receive_data(bytes(data))
            else:
                raise HeadError(f"unexpected {type(event).__name__} in a request body")

    def response(self, status: int, body: bytes, ctype: str = TEXT,
                 extra: list[tuple[str, str]] | None = None) -> bytes:
        """The whole response (head, and body unless the request was a HEAD), ready to
        send; the connection closes after it.  ``extra``: more headers (CORS)."""
        # Connection last: h11 moves it there itself when the client asked to close,
        # so every response has the same head whatever the request said.
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-cache"),
                   ("X-Content-Type-Options", "nosniff"), *(extra or ()), ("Connection", "close")]
        out = self._send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=headers))
        if not self._head_only:
            out += self._send(h11.Data(data=body))
        return out + self._send(h11.EndOfMessage())

    def _send(self, event: h11.Event) -> bytes:
        return self._conn.send(event) or b""   # None only for ConnectionClosed


def resolve_static(target: str, static_dir: Path | None) -> Path | None:
    """The file a GET of ``target`` serves, or None.  Never leaves ``static_dir``."""
    path = unquote(target.split("?", 1)[0].split("#", 1)[0])
    if path == "/sockend.js":
        # An app's own sockend.js (in static_dir) wins over the shipped one.
        own = _inside(static_dir, ["sockend.js"]) if static_dir else None
        return own or CLIENT_DIR / "sockend.js"
    if static_dir is None:
        return None
    segments = [s for s in path.split("/") if s]
    if not segments:
        segments = ["index.html"]
    if not all(_SEGMENT.fullmatch(s) and not s.startswith(".") for s in segments):
        return None   # (this also refuses "." and "..")
    return _inside(static_dir, segments)


def _inside(root: Path, segments: list[str]) -> Path | None:
    """The file ``root/segments`` once every symlink is resolved, if it is still a
    file inside ``root`` and no part of its path below ``root`` starts with a dot."""
    try:
        base = root.resolve(strict=True)
        candidate = base.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):   # ValueError: a NUL in the path
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    if any(part.startswith(".") for part in candidate.relative_to(base).parts):
        return None   # a visible name linked to a dotfile (or into a dot folder)
    return candidate


def content_type(path: Path) -> str:
    ctype = _TEXT_TYPES.get(path.suffix.lower())
    if ctype:
        return ctype + "; charset=utf-8"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


async def serve_static(stream: trio.abc.SendStream, exchange: HttpExchange, head: RequestHead,
                       static_dir: Path | None) -> int:
    """Answer a plain HTTP request; returns the status sent."""
    if head.method not in ("GET", "HEAD"):
        await stream.send_all(exchange.response(405, b"only GET and HEAD\n"))
        return 405
    path = resolve_static(head.target, static_dir)
    body = None
    if path is not None:
        try:
            if path.stat().st_size <= MAX_FILE:
                body = await trio.Path(path).read_bytes()
        except OSError:
            body = None
    if path is None or body is None:
        await stream.send_all(exchange.response(404, b"not found\n"))
        return 404
    await stream.send_all(exchange.response(200, body, content_type(path)))
    return 200
