"""A small etcd v3 client over its JSON gateway: trio TCP streams and hand-written HTTP/1.1.

Why not a library: the etcd Python clients pull in grpcio (large, threads of its own,
no trio) or are unmaintained; the registry needs seven calls, and etcd serves every one of
them as JSON over plain HTTP (the grpc-gateway: ``POST /v3/kv/range`` and so on, keys and
values base64, 64-bit integers as strings, fields at their zero value left out).  So a
unary call opens a connection, sends one request with ``Connection: close`` and reads one
answer (``Content-Length`` or chunked); :meth:`EtcdClient.watch_prefix` keeps its
connection and reads the gateway's stream, one JSON message a line in a chunked body.

Every failure is an :class:`EtcdError` whose message names the address and what went
wrong, so the registry can log it and show it in ``engine nodes`` as it is.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from contextlib import aclosing
from typing import Any, AsyncGenerator, Literal

import trio

DEFAULT_TIMEOUT = 5.0           # seconds for one unary call, connect included
MAX_BODY = 64 * 1024 * 1024     # an answer larger than this is refused, not buffered
MAX_HEADER = 64 * 1024


class EtcdError(Exception):
    """etcd could not be used for this call: unreachable, timed out, refused the request
    (``etcd answered 400: ...``), answered something unreadable, or a watch ended."""


class EtcdCompacted(EtcdError):
    """A watch asked for history etcd has compacted away: read everything again."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    key: str
    value: bytes            # empty for a DELETE
    mod_revision: int       # the revision of the change (for a DELETE, the deletion's)


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) and text else b""


def prefix_end(prefix: str) -> bytes:
    """etcd's range end for "every key starting with ``prefix``": the prefix with its
    last byte incremented (bytes 0xff are dropped first)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\x00"              # etcd: from the key to the end of the keyspace
    raw[-1] += 1
    return bytes(raw)


def _int(value: Any) -> int:
    """A gateway int64: a string, a number, or absent (zero)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise EtcdError(f"etcd answered a malformed number: {value!r}") from None


def _kv(d: Any) -> KeyValue:
    if not isinstance(d, dict):
        raise EtcdError(f"etcd answered a malformed key-value: {d!r}")
    return KeyValue(_unb64(d.get("key")).decode(errors="replace"), _unb64(d.get("value")),
                    _int(d.get("mod_revision")), _int(d.get("lease")))


class _Response:
    """One HTTP response as read so far: status, headers, and a reader for the body."""

    def __init__(self, stream: trio.abc.Stream, where: str):
        self.stream = stream
        self.where = where
        self.buf = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        self.buf += data
        return True

    async def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEADER or not await self._fill():
                raise EtcdError(f"etcd at {self.where} closed the connection mid-answer")
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EtcdError(f"etcd at {self.where} closed the connection mid-answer")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_head(self) -> None:
        status = (await self._line()).decode("latin-1").split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or not status[1].isdigit():
            raise EtcdError(f"etcd at {self.where} answered something that is not HTTP: "
                            f"{' '.join(status)[:80]!r}")
        self.status = int(status[1])
        while line := await self._line():
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, piece by piece, as it arrives (chunked, sized, or until EOF)."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_text = (await self._line()).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise EtcdError(f"etcd at {self.where} sent a bad chunk size "
                                    f"{size_text[:20]!r}") from None
                if size == 0:
                    return
                if size > MAX_BODY:
                    raise EtcdError(f"etcd at {self.where} sent a chunk of {size} bytes")
                yield await self._exactly(size)
                await self._exactly(2)          # the chunk's CRLF
        elif "content-length" in self.headers:
            length = _int(self.headers["content-length"])
            if length > MAX_BODY:
                raise EtcdError(f"etcd at {self.where} sent a body of {length} bytes")
            yield await self._exactly(length)
        else:
            while self.buf or await self._fill():
                yield bytes(self.buf)
                self.buf.clear()

    async def body(self) -> bytes:
        out = bytearray()
        async with aclosing(self.chunks()) as pieces:
            async for piece in pieces:
                out += piece
                if len(out) > MAX_BODY:
                    raise EtcdError(f"etcd at {self.where} sent more than {MAX_BODY} bytes")
        return bytes(out)


class EtcdClient:
    """The calls :class:`engine.cluster.etcd_registry.EtcdRegistry` makes, one etcd
    endpoint (``HOST:PORT``, an ``etcd://`` or ``http://`` prefix is accepted)."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT):
        for scheme in ("etcd://", "http://"):
            if address.startswith(scheme):
                address = address[len(scheme):]
        address = address.rstrip("/")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd address: expected HOST:PORT, got {address!r}")
        self.address = address
        self.host = host.strip("[]")
        self.port = int(port)
        self.timeout = timeout

    # -- the wire -------------------------------------------------------------------------
    async def _open(self, path: str, body: dict[str, Any], *, close: bool) -> tuple[trio.abc.Stream, _Response]:
        """Connect, send ``POST path`` with ``body`` as JSON, read the answer's head."""
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.address}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n").encode()
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise EtcdError(f"etcd at {self.address} unreachable: {exc.strerror or exc}") from None
        try:
            await stream.send_all(head + payload)
            response = _Response(stream, self.address)
            await response.read_head()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
                raise EtcdError(f"etcd at {self.address} unreachable: {exc}") from None
            raise
        return stream, response

    def _check(self, response: _Response, body: bytes) -> None:
        if response.status != 200:
            message = body.decode(errors="replace").strip()
            try:
                parsed = json.loads(body)
                if isinstance(parsed, dict):
                    message = str(parsed.get("message") or parsed.get("error") or message)
            except ValueError:
                pass
            raise EtcdError(f"etcd answered {response.status}: {message[:300]}")

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary call, bounded by ``timeout``."""
        try:
            with trio.fail_after(self.timeout):
                stream, response = await self._open(path, body, close=True)
                try:
                    raw = await response.body()
                except (OSError, trio.BrokenResourceError) as exc:
                    raise EtcdError(f"etcd at {self.address} unreachable: {exc}") from None
                finally:
                    await trio.aclose_forcefully(stream)
        except trio.TooSlowError:
            raise EtcdError(f"etcd at {self.address} unreachable: no answer to {path} "
                            f"within {self.timeout:g} s") from None
        self._check(response, raw)
        if path == "/v3/lease/keepalive":       # a stream of one message: {"result": ...}
            raw = raw.split(b"\n", 1)[0]
        try:
            answer = json.loads(raw)
        except ValueError:
            raise EtcdError(f"etcd at {self.address} answered {path} with something that "
                            f"is not JSON: {raw[:80]!r}") from None
        if not isinstance(answer, dict):
            raise EtcdError(f"etcd at {self.address} answered {path} with {answer!r}")
        if "error" in answer:
            raise EtcdError(f"etcd at {self.address} refused {path}: {answer['error']}")
        return answer

    # -- the calls --------------------------------------------------------------------------
    async def get(self, key: str) -> KeyValue | None:
        answer = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix``, and the store's revision they were read at (a
        watch from revision + 1 then misses nothing)."""
        answer = await self._call("/v3/kv/range",
                                  {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        kvs = [_kv(d) for d in answer.get("kvs") or []]
        return kvs, _int((answer.get("header") or {}).get("revision"))

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        """Write ``key``; the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._call("/v3/kv/put", body)
        return _int((answer.get("header") or {}).get("revision"))

    async def txn_put_if(self, key: str, value: bytes, expect_mod_revision: int) -> bool:
        """Write ``key`` only if its mod revision is still ``expect_mod_revision`` (0: only
        if absent); False when another writer came first."""
        answer = await self._call("/v3/kv/txn", {
            "compare": [{"target": "MOD", "key": _b64(key), "result": "EQUAL",
                         "mod_revision": str(expect_mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}]})
        return bool(answer.get("succeeded"))

    async def delete(self, key: str) -> int:
        """Delete ``key``; how many keys went (0 or 1)."""
        answer = await self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return _int(answer.get("deleted"))

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        answer = await self._call("/v3/lease/grant", {"TTL": str(int(ttl))})
        lease = _int(answer.get("ID"))
        if not lease:
            raise EtcdError(f"etcd at {self.address} granted no lease: {answer}")
        return lease

    async def keepalive_once(self, lease: int) -> int:
        """Renew ``lease``; its new TTL in seconds, 0 if it is gone (expired, revoked)."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return _int((answer.get("result") or {}).get("TTL"))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now: every key attached to it is deleted."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if "not found" not in str(exc):     # gone already: what was wanted
                raise

    async def watch_prefix(self, prefix: str,
                           start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Every change under ``prefix`` from ``start_revision`` on, as it happens.  Ends
        only by raising :class:`EtcdError` (the connection dropped, etcd cancelled the
        watch) or :class:`EtcdCompacted` (the start revision is compacted away)."""
        request = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                      "start_revision": str(start_revision)}}
        try:
            with trio.fail_after(self.timeout):
                stream, response = await self._open("/v3/watch", request, close=False)
        except trio.TooSlowError:
            raise EtcdError(f"etcd at {self.address} unreachable: no answer to /v3/watch "
                            f"within {self.timeout:g} s") from None
        try:
            if response.status != 200:
                with trio.move_on_after(self.timeout):
                    self._check(response, await response.body())
                raise EtcdError(f"etcd answered {response.status} to /v3/watch")
            pending = bytearray()
            try:
                async with aclosing(response.chunks()) as pieces:
                    async for piece in pieces:
                        pending += piece
                        while (i := pending.find(b"\n")) >= 0:
                            line = bytes(pending[:i]).strip()
                            del pending[:i + 1]
                            if line:
                                for event in self._watch_message(line):
                                    yield event
            except (OSError, trio.BrokenResourceError) as exc:
                raise EtcdError(f"etcd at {self.address} unreachable: watch dropped: {exc}") from None
            raise EtcdError(f"etcd at {self.address} ended the watch on {prefix}")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def _watch_message(self, line: bytes) -> list[WatchEvent]:
        try:
            message = json.loads(line)
        except ValueError:
            raise EtcdError(f"etcd at {self.address} sent a watch line that is not JSON: "
                            f"{line[:80]!r}") from None
        if not isinstance(message, dict):
            raise EtcdError(f"etcd at {self.address} sent a watch message {message!r}")
        if "error" in message:
            raise EtcdError(f"etcd at {self.address} ended the watch: {message['error']}")
        result = message.get("result") or {}
        if _int(result.get("compact_revision")):
            raise EtcdCompacted(f"etcd at {self.address} compacted the watched history "
                                f"(up to revision {result['compact_revision']})")
        if result.get("canceled"):
            raise EtcdError(f"etcd at {self.address} cancelled the watch: "
                            f"{result.get('cancel_reason') or 'no reason given'}")
        events = []
        for d in result.get("events") or []:
            kv = _kv(d.get("kv") if isinstance(d, dict) else None)
            kind: Literal["PUT", "DELETE"] = "DELETE" if d.get("type") == "DELETE" else "PUT"
            events.append(WatchEvent(kind, kv.key, kv.value, kv.mod_revision))
        return events
