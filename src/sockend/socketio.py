"""Socket.IO v4 packets over one Engine.IO session: pure, no I/O.

A :class:`SocketIOConnection` turns Engine.IO messages into what a client did
(:class:`Connect` a namespace, :class:`Leave` it, :class:`Emit` an event, with or
without an ack id) and builds what the server says (``connected``, ``connect_error``,
``ack``, ``event``), as Engine.IO messages ready for
:meth:`~sockend.engineio.EngineSession.send`.

The packet codec is python-socketio's ``socketio.packet.Packet`` (placeholders and
attachments of binary events included); this class adds the assembly of a binary
packet from the attachments that follow it, the limits on them, and the per-namespace
bookkeeping the protocol asks for: events of a namespace the client has not joined are
a protocol error, as a second CONNECT of one it has.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from socketio import packet as sio_packet

from sockend.engineio import Message

CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)
MAX_ATTACHMENTS = 16
MAX_NAME_LENGTH = 256


class SocketIOProtocolError(ValueError):
    """The client broke the Socket.IO protocol: the whole connection ends."""


@dataclass(frozen=True)
class Connect:
    namespace: str          # socket.io form: "/" or "/rnd"
    auth: Any               # the client's auth payload (None when it sent none)


@dataclass(frozen=True)
class Leave:
    namespace: str


@dataclass(frozen=True)
class Emit:
    namespace: str
    name: str
    args: tuple[Any, ...]
    ack_id: int | None      # the client waits for an ack of this id


@dataclass(frozen=True)
class BadEmit:
    """An event packet of a joined namespace whose payload is not an event (the
    namespace stays, the packet is answered when it had an ack id)."""
    namespace: str
    ack_id: int | None
    reason: str


ClientAction = Union[Connect, Leave, Emit, BadEmit]


class SocketIOConnection:
    def __init__(self, max_attachment_bytes: int = 1_000_000) -> None:
        self.namespaces: set[str] = set()          # joined (connected) namespaces
        self.max_attachment_bytes = max_attachment_bytes
        self._partial: sio_packet.Packet | None = None   # a binary packet awaiting attachments
        self._partial_bytes = 0

    # -- inbound -------------------------------------------------------------------------
    def receive(self, message: Message) -> ClientAction | None:
        """One Engine.IO message: the client's action, or None (an attachment that did
        not complete its packet yet, an ack we never asked for).  Raises
        SocketIOProtocolError."""
        if isinstance(message, bytes):
            return self._attachment(message)
        if self._partial is not None:
            raise SocketIOProtocolError("a text packet while binary attachments were due")
        fast = decode_plain_event(message)
        if fast is not None:
            namespace, ack_id, data = fast
            if namespace not in self.namespaces:
                raise SocketIOProtocolError(f"packet for namespace {namespace}, which is not connected")
            return _event_action(namespace, ack_id, data)
        try:
            pkt = sio_packet.Packet(encoded_packet=message)
        except (ValueError, TypeError, IndexError, RecursionError) as exc:
            raise SocketIOProtocolError(f"not a Socket.IO packet: {exc}"[:200]) from None
        if pkt.attachment_count > MAX_ATTACHMENTS:
            raise SocketIOProtocolError(f"more than {MAX_ATTACHMENTS} binary attachments")
        namespace = pkt.namespace or "/"
        kind = pkt.packet_type
        if kind == CONNECT:
            if namespace in self.namespaces:
                raise SocketIOProtocolError(f"namespace {namespace} connected twice")
            auth = pkt.data
            if auth is not None and not isinstance(auth, dict):
                raise SocketIOProtocolError("a CONNECT payload is an object")
            return Connect(namespace, auth)
        if namespace not in self.namespaces:
            if kind == DISCONNECT:
                return None        # (leaving twice, or leaving a refused namespace)
            raise SocketIOProtocolError(f"packet for namespace {namespace}, which is not connected")
        if kind == DISCONNECT:
            self.namespaces.discard(namespace)
            return Leave(namespace)
        if kind in (EVENT, BINARY_EVENT):
            if kind == BINARY_EVENT and pkt.attachment_count:
                self._partial, self._partial_bytes = pkt, 0
                return None
            return _emit(pkt, namespace)
        if kind in (ACK, BINARY_ACK):
            if kind == BINARY_ACK and pkt.attachment_count:
                self._partial, self._partial_bytes = pkt, 0
            return None            # the server asks no acks of clients
        raise SocketIOProtocolError(f"unexpected packet type {kind} from a client")

    def _attachment(self, data: bytes) -> ClientAction | None:
        pkt = self._partial
        if pkt is None:
            raise SocketIOProtocolError("a binary message that no packet announced")
        self._partial_bytes += len(data)
        if self._partial_bytes > self.max_attachment_bytes:
            raise SocketIOProtocolError(f"binary attachments over {self.max_attachment_bytes} bytes")
        try:
            complete = pkt.add_attachment(data)
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            raise SocketIOProtocolError(f"bad attachment: {exc}") from None
        if not complete:
            return None
        self._partial = None
        if pkt.packet_type == BINARY_ACK:
            return None
        return _emit(pkt, pkt.namespace or "/")

    # -- outbound ------------------------------------------------------------------------
    def connected(self, namespace: str, socket_id: str) -> list[Message]:
        self.namespaces.add(namespace)
        return _encode(CONNECT, namespace, {"sid": socket_id})

    def connect_error(self, namespace: str, message: str, data: Any = None) -> list[Message]:
        body: dict[str, Any] = {"message": message}
        if data is not None:
            body["data"] = data
        return _encode(CONNECT_ERROR, namespace, body)

    def left(self, namespace: str) -> list[Message]:
        """The server ends one namespace (the connection stays)."""
        self.namespaces.discard(namespace)
        return _encode(DISCONNECT, namespace, None)


def ack(namespace: str, ack_id: int, args: list[Any]) -> list[Message]:
    """An ack.  Raises TypeError/ValueError when ``args`` cannot be JSON (NaN included)."""
    try:
        body = _dumps(args)
    except TypeError:    # bytes inside (or what no codec can carry): the library's binary path
        return _encode(ACK, namespace, args, ack_id)
    return [f"3{ack_id}{body}" if namespace == "/" else f"3{namespace},{ack_id}{body}"]


# -- the hot path: a plain EVENT in, an ACK out ---------------------------------------------
# Every request a browser sends is an EVENT without attachments, answered by an ACK.  For
# those two the library's general codec (binary detection, a decoder per call) is a
# measurable share of a request's cost, so they have a direct form here; anything else
# (and anything this form is unsure of) goes through the library, and a property test
# (fuzz/test_socketio_fuzz.py) holds the two to the same result.
_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_loads = json.JSONDecoder().decode
_DIGITS = frozenset("0123456789")


def decode_plain_event(message: str) -> tuple[str, int | None, Any] | None:
    """``2[/nsp,][id]<json>`` as (namespace, ack id, data), or None: not that shape, or
    not sure (the library decides)."""
    if len(message) < 2 or message[0] != "2":
        return None
    namespace, i = "/", 1
    if message[1] == "/":
        comma = message.find(",", 1)
        if comma < 0:
            return None
        namespace, i = message[1:comma], comma + 1
        if "?" in namespace:
            return None
    j = i
    while j < len(message) and message[j] in _DIGITS:
        j += 1
    if j - i > 15 or j == len(message) or message[j] not in "[{":
        return None
    try:
        data = _loads(message[j:])
    except (ValueError, RecursionError):
        return None
    return namespace, int(message[i:j]) if j > i else None, data


def event(namespace: str, name: str, data: Any) -> list[Message]:
    """An event as Engine.IO messages (several when ``data`` holds bytes: the packet,
    then one binary message per attachment).  Raises TypeError/ValueError when ``data``
    cannot be JSON even with its bytes taken out."""
    return _encode(EVENT, namespace, [name, data])


def _emit(pkt: sio_packet.Packet, namespace: str) -> ClientAction:
    return _event_action(namespace, pkt.id, pkt.data)


def _event_action(namespace: str, ack_id: int | None, data: Any) -> ClientAction:
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        return BadEmit(namespace, ack_id, "an event is a list: [name, ...args]")
    if not 0 < len(data[0]) <= MAX_NAME_LENGTH:
        return BadEmit(namespace, ack_id, f"an event name is 1-{MAX_NAME_LENGTH} characters")
    return Emit(namespace, data[0], tuple(data[1:]), ack_id)


def _encode(kind: int, namespace: str, data: Any, ack_id: int | None = None) -> list[Message]:
    encoded = sio_packet.Packet(kind, data=data, namespace=namespace, id=ack_id).encode()
    if isinstance(encoded, list):     # a binary packet: the text, then its attachments
        return [encoded[0], *(bytes(a) for a in encoded[1:])]
    return [encoded]
