"""What the Redis registry says to Redis, and reads back: pure, no I/O, no trio.

RESP2 (the protocol every Redis since 1.2 speaks): a command is an array of bulk
strings; a reply is a simple string (``+OK``), an error (``-ERR ...``), an integer, a
bulk string (``$-1`` is nil) or an array of replies.  The registry needs a handful of
commands (AUTH, SELECT, SET, SADD, SREM, SMEMBERS, MGET, EXPIRE), so this module and a
trio stream (:mod:`transport.mesh.redis_registry`) are the whole client.

Bounded, as anything that reads from the network must be: a bulk string over
``MAX_BULK`` bytes, an array over ``MAX_ITEMS`` items or nested deeper than
``MAX_DEPTH`` is a :class:`RespProtocolError`, not a buffer grown without end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union
from urllib.parse import unquote, urlsplit

MAX_BULK = 16 * 1024 * 1024   # a beacon is < 8 KiB; nothing we ask for comes near this
MAX_ITEMS = 1_000_000
MAX_DEPTH = 8
DEFAULT_REDIS_PORT = 6379


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-WRONGPASS ...``): returned in its
    place in a pipeline's replies, raised by a single call."""


class RespProtocolError(ValueError):
    """Bytes that are not RESP (or exceed its bounds here): the connection is useless."""


Reply = Union[bytes, str, int, None, RespError, list["Reply"]]


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as RESP: ``*N`` then each argument as a bulk string."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _line(buf: bytes | bytearray, pos: int) -> tuple[bytes, int] | None:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > 64 * 1024:
            raise RespProtocolError("a RESP header line longer than 64 KiB")
        return None
    return bytes(buf[pos:end]), end + 2


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise RespProtocolError(f"not an integer: {text[:40]!r}") from None


def parse_reply(buf: bytes | bytearray, pos: int = 0, depth: int = 0
                ) -> tuple[Reply, int] | None:
    """One reply starting at ``buf[pos]`` and where the next one starts, or None when
    ``buf`` does not hold all of it yet.  Raises only :class:`RespProtocolError`."""
    if depth > MAX_DEPTH:
        raise RespProtocolError(f"RESP arrays nested deeper than {MAX_DEPTH}")
    got = _line(buf, pos)
    if got is None:
        return None
    line, pos = got
    if not line:
        raise RespProtocolError("an empty RESP line")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode("utf-8", "replace"), pos
    if kind == b"-":
        return RespError(rest.decode("utf-8", "replace")), pos
    if kind == b":":
        return _int(rest), pos
    if kind == b"$":
        n = _int(rest)
        if n == -1:
            return None, pos
        if not 0 <= n <= MAX_BULK:
            raise RespProtocolError(f"a bulk string of {n} bytes")
        if len(buf) < pos + n + 2:
            return None
        if buf[pos + n:pos + n + 2] != b"\r\n":
            raise RespProtocolError("a bulk string not followed by CRLF")
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == b"*":
        n = _int(rest)
        if n == -1:
            return None, pos
        if not 0 <= n <= MAX_ITEMS:
            raise RespProtocolError(f"an array of {n} items")
        items: list[Reply] = []
        for _ in range(n):
            got_item = parse_reply(buf, pos, depth + 1)
            if got_item is None:
                return None
            item, pos = got_item
            items.append(item)
        return items, pos
    raise RespProtocolError(f"unknown RESP type {kind!r}")


class RespParser:
    """Bytes in (as they arrive, split anywhere), replies out, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_reply(self) -> tuple[bool, Reply]:
        """``(True, reply)`` for the next whole reply, ``(False, None)`` until one is in."""
        got = parse_reply(self._buf)
        if got is None:
            return False, None
        reply, used = got
        del self._buf[:used]
        return True, reply

    @property
    def buffered(self) -> int:
        return len(self._buf)


@dataclass(frozen=True)
class RedisUrl:
    """``redis://[[user]:password@]host[:port][/db]``, parsed."""

    host: str
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        """The URL for logs: the password never shows."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        elif self.username:
            auth = f"{self.username}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisUrl:
    """Raises ValueError naming what is wrong (``rediss://`` (TLS) is not supported)."""
    if not isinstance(url, str):
        raise ValueError(f"redis URL must be a string, got {url!r}")
    parts = urlsplit(url.strip())
    if parts.scheme != "redis":
        raise ValueError(f"redis URL must be redis://host[:port][/db], got {url!r}"
                         + (" (TLS, rediss://, is not supported)" if parts.scheme == "rediss"
                            else ""))
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:
        raise ValueError(f"redis URL has a bad port: {url!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"redis URL names no host: {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"redis URL's path must be a database number, got {url!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return RedisUrl(host, port, int(path) if path else 0, username or None, password)
