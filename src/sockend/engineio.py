"""Engine.IO v4, the transport under Socket.IO: one session, both transports, no I/O.

An :class:`EngineSession` is what a Socket.IO client's connection is to the server
whatever carries it: HTTP long-polling (the official client's default start), a
websocket from the start, or polling upgraded to a websocket.  It is a pure state
machine, like h11: the trio layer (:mod:`sockend.sio_server`) feeds it what arrived
(:meth:`receive_polling`, :meth:`receive_ws`), tells it the time (:meth:`tick`), and
writes what it hands out (:meth:`take_polling`, :meth:`take_ws`).

The packet codec is python-engineio's (``engineio.packet``, ``engineio.payload``): the
pure classes of the reference Python implementation, not a hand-written copy.  What
this module adds is the session: the handshake, the server's pings (in v4 the server
pings, the client answers ``pong`` within ``ping_timeout``), the upgrade dance
(``2probe``/``3probe`` on the new websocket, a ``noop`` to release the pending poll,
then ``upgrade``), and the limits (payload size, packets per payload, one poll at a
time), each broken rule a :class:`EngineProtocolError` that ends the session.
"""
from __future__ import annotations

import base64
import json
from collections import deque
from dataclasses import dataclass
from typing import Literal, Union

from engineio import packet as eio_packet

Message = Union[str, bytes]            # one Engine.IO MESSAGE's data
Transport = Literal["polling", "websocket"]
OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = range(7)
RECORD_SEPARATOR = "\x1e"
MAX_PACKETS_PER_PAYLOAD = 256           # a browser batches what it queued while offline


class EngineProtocolError(ValueError):
    """The client broke the Engine.IO protocol; the session ends (HTTP 400)."""


@dataclass(frozen=True)
class EngineConfig:
    ping_interval: float = 25.0         # seconds between the server's pings
    ping_timeout: float = 20.0          # seconds a pong may take
    max_payload: int = 1_000_000        # bytes of one POST body or websocket message

    def __post_init__(self) -> None:
        if not (self.ping_interval > 0 and self.ping_timeout > 0 and self.max_payload > 0):
            raise ValueError("ping_interval, ping_timeout and max_payload must be > 0")


class EngineSession:
    """One client's Engine.IO session.  ``state``: ``open`` until a close packet, a
    ping timeout or a protocol error, then ``closed`` (``close_reason`` says which)."""

    def __init__(self, sid: str, config: EngineConfig, transport: Transport, now: float) -> None:
        self.sid = sid
        self.config = config
        self.transport: Transport = transport
        self.state: Literal["open", "closed"] = "open"
        self.close_reason = ""
        self.upgrading = False             # a websocket probed, the upgrade not yet confirmed
        self._out: deque[tuple[int, Message | None]] = deque()
        self._probe_answers: deque[str] = deque()   # "3probe", for the websocket being probed
        self._release_poll = False         # the pending poll must return (noop) for the upgrade
        self.next_ping = now + config.ping_interval
        self.pong_due: float | None = None

    # -- the handshake -------------------------------------------------------------------
    def open_packet(self, upgrades: tuple[str, ...]) -> str:
        """The OPEN packet (``0{"sid":...}``): the first thing the client reads."""
        return str(OPEN) + json.dumps({
            "sid": self.sid, "upgrades": list(upgrades),
            "pingInterval": int(self.config.ping_interval * 1000),
            "pingTimeout": int(self.config.ping_timeout * 1000),
            "maxPayload": self.config.max_payload}, separators=(",", ":"))

    # -- inbound -------------------------------------------------------------------------
    def receive_polling(self, body: bytes) -> list[Message]:
        """A POST body: the messages it carries, in order.  Raises EngineProtocolError."""
        if self.transport != "polling" and not self.upgrading:
            raise EngineProtocolError("this session no longer polls")
        if len(body) > self.config.max_payload:
            raise EngineProtocolError(f"payload over {self.config.max_payload} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise EngineProtocolError("a polling payload is UTF-8 text") from None
        parts = text.split(RECORD_SEPARATOR) if text else []
        if len(parts) > MAX_PACKETS_PER_PAYLOAD:
            raise EngineProtocolError(f"more than {MAX_PACKETS_PER_PAYLOAD} packets in one payload")
        out: list[Message] = []
        for part in parts:
            if part.startswith("b"):    # a binary message, base64 (the only binary form here)
                try:
                    out.append(base64.b64decode(part[1:], validate=True))
                except ValueError:
                    raise EngineProtocolError("bad base64 in a binary packet") from None
                continue
            self._receive_text(part, out, via_ws=False)
        return out

    def receive_ws(self, message: Message) -> list[Message]:
        """One websocket message: the Engine.IO messages it carries (zero or one)."""
        if len(message) > self.config.max_payload:
            raise EngineProtocolError(f"message over {self.config.max_payload} bytes")
        if isinstance(message, (bytes, bytearray)):
            if self.transport != "websocket":
                raise EngineProtocolError("binary data before the upgrade")
            return [bytes(message)]
        out: list[Message] = []
        self._receive_text(message, out, via_ws=True)
        return out

    def _receive_text(self, encoded: str, out: list[Message], *, via_ws: bool) -> None:
        if not encoded or encoded[0] not in "0123456":
            raise EngineProtocolError(f"not an Engine.IO packet: {encoded[:40]!r}")
        kind = int(encoded[0])
        data = encoded[1:]
        probing = via_ws and self.transport == "polling"
        if probing:   # the only packets a websocket may send before the upgrade
            if kind == PING and data == "probe":
                self.upgrading = True
                self._release_poll = True
                self._probe_answers.append(str(PONG) + "probe")
            elif kind == UPGRADE and self.upgrading:
                self.transport = "websocket"
                self.upgrading = False
            else:
                raise EngineProtocolError(f"packet {kind} on a websocket before the upgrade")
            return
        if kind == MESSAGE:
            out.append(data)
        elif kind == PONG:
            self.pong_due = None
        elif kind == CLOSE:
            self.close("client closed")
        elif kind == NOOP:
            pass
        elif kind == PING:        # (v3 clients ping; v4 ones only answer)
            self._out.append((PONG, data or None))
        else:
            raise EngineProtocolError(f"unexpected packet type {kind}")

    # -- outbound ------------------------------------------------------------------------
    def send(self, message: Message) -> None:
        if self.state == "open":
            self._out.append((MESSAGE, message))

    def queued(self) -> int:
        """Packets waiting for a transport."""
        return len(self._out)

    def pending(self) -> bool:
        """Something for the client (or a poll to release) is waiting."""
        return bool(self._out) or self._release_poll or self.state == "closed"

    def take_polling(self, limit: int = 4096) -> str:
        """The body for a poll that may return now: queued packets (at most ``limit``), a
        ``noop`` to release it for an upgrade, or a ``close`` once the session ended."""
        parts: list[str] = []
        size = 0
        while self._out and len(parts) < limit:
            kind, data = self._out[0]
            encoded = _encode_polling(kind, data)
            if parts and size + len(encoded) + 1 > self.config.max_payload:
                break
            self._out.popleft()
            parts.append(encoded)
            size += len(encoded) + 1
        if not parts:
            if self.state == "closed":
                parts.append(str(CLOSE))
            elif self._release_poll:
                parts.append(str(NOOP))
        self._release_poll = False
        return RECORD_SEPARATOR.join(parts)

    def take_probe_answers(self) -> list[str]:
        """What the websocket being probed must be sent (``3probe``)."""
        out = list(self._probe_answers)
        self._probe_answers.clear()
        return out

    def take_ws(self, limit: int = 4096) -> list[Message]:
        """Websocket messages to send now (the transport must be ``websocket``)."""
        out: list[Message] = []
        while self._out and len(out) < limit:
            kind, data = self._out.popleft()
            if kind == MESSAGE and isinstance(data, bytes):
                out.append(data)     # v4: a binary frame is a message, no type byte
            else:
                out.append(str(kind) + (data if isinstance(data, str) else ""))
        return out

    # -- time ----------------------------------------------------------------------------
    def deadline(self) -> float:
        """When :meth:`tick` next has something to do."""
        return self.pong_due if self.pong_due is not None else self.next_ping

    def tick(self, now: float) -> None:
        """Ping when due; close when a pong is overdue."""
        if self.state != "open":
            return
        if self.pong_due is not None:
            if now >= self.pong_due:
                self.close("ping timeout")
            return
        if now >= self.next_ping:
            self._out.append((PING, None))
            self.pong_due = now + self.config.ping_timeout
            self.next_ping = now + self.config.ping_interval

    def close(self, reason: str) -> None:
        if self.state == "open":
            self.state = "closed"
            self.close_reason = reason
            self._out.clear()


def _encode_polling(kind: int, data: Message | None) -> str:
    if isinstance(data, bytes):
        encoded = eio_packet.Packet(MESSAGE, data).encode(b64=True)
    else:
        encoded = eio_packet.Packet(kind, data).encode()
    assert isinstance(encoded, str)
    return encoded
