"""Just enough HTTP/1.1 for Sockend's single port: read a request head, tell a websocket
upgrade from a plain GET, and answer the latter with a static file.

The head is parsed by h11 (already a dependency of trio-websocket's wsproto) and bounded
in size and time.  The bytes read are replayed to trio-websocket through
:class:`PrefixedStream`, so the upgrade handshake sees the request exactly as sent.

Static files: ``/sockend.js`` is the browser client shipped in this package; with a
``static`` directory, ``/`` is its ``index.html`` and ``/name`` any file directly in it
(or below it).  Every path is resolved and must stay inside the directory (no ``..``, no
symlink escape); only GET and HEAD; every response closes the connection.
"""
from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import h11
import trio

MAX_HEAD = 8192
MAX_FILE = 16 * 1024 * 1024
CLIENT_DIR = Path(__file__).parent / "static"
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


async def read_head(stream: trio.abc.ReceiveStream) -> RequestHead:
    """Read one request head (the caller bounds the time).  Raises HeadError."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HeadError(f"bad request head: {exc}") from None
        if isinstance(event, h11.Request):
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("latin-1").lower()
                val = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {val}" if key in headers else val
            return RequestHead(event.method.decode("ascii", "replace"),
                               event.target.decode("latin-1"), headers, bytes(raw))
        if event is not h11.NEED_DATA:
            raise HeadError(f"unexpected {type(event).__name__} before a request head")
        data = await stream.receive_some(4096)
        if not data:
            raise HeadError("connection closed before a request head")
        raw += data
        if len(raw) > MAX_HEAD + 4096:
            raise HeadError("request head too large")
        conn.receive_data(data)


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes already read from it (the request head)."""

    def __init__(self, prefix: bytes, stream: trio.abc.Stream):
        self._prefix = prefix
        self.stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return out
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.stream.aclose()


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
    if not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        return None
    return _inside(static_dir, segments)


def _inside(root: Path, segments: list[str]) -> Path | None:
    try:
        base = root.resolve(strict=True)
        candidate = base.joinpath(*segments).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    return candidate


def content_type(path: Path) -> str:
    ctype = _TEXT_TYPES.get(path.suffix.lower())
    if ctype:
        return ctype + "; charset=utf-8"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def response(status: int, reason: str, body: bytes, ctype: str = "text/plain; charset=utf-8",
             *, head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-cache",
             "X-Content-Type-Options: nosniff", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)


async def serve_static(stream: trio.abc.SendStream, head: RequestHead,
                       static_dir: Path | None) -> int:
    """Answer a plain HTTP request; returns the status sent."""
    if head.method not in ("GET", "HEAD"):
        await stream.send_all(response(405, "Method Not Allowed", b"only GET and HEAD\n"))
        return 405
    path = resolve_static(head.target, static_dir)
    body = None
    if path is not None:
        try:
            if path.stat().st_size <= MAX_FILE:
                body = await trio.Path(path).read_bytes()
        except OSError:
            body = None
    if body is None:
        await stream.send_all(response(404, "Not Found", b"not found\n",
                                       head_only=head.method == "HEAD"))
        return 404
    await stream.send_all(response(200, "OK", body, content_type(path),
                                   head_only=head.method == "HEAD"))
    return 200
