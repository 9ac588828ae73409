"""Sockend's Socket.IO core, pure: the Engine.IO session as a state machine, and both
decoders against arbitrary input (they raise only their protocol errors)."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sockend.engineio import (EngineConfig, EngineProtocolError, EngineSession, MESSAGE, NOOP, PING,
                              RECORD_SEPARATOR)
from sockend.socketio import BadEmit, Connect, Emit, Leave, SocketIOConnection, SocketIOProtocolError

CONFIG = EngineConfig(ping_interval=25.0, ping_timeout=20.0, max_payload=10_000)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
# What Socket.IO puts in a message is JSON (control characters escaped): never the
# record separator that frames a polling payload.
messages_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x1e"),
                        max_size=40)


class EngineMachine(RuleBasedStateMachine):
    """A polling session, driven as a client would (and as one should not): what was
    sent comes out once, in order; pings come on time; a missing pong closes; a probe
    releases the poll and the upgrade moves writing to the websocket."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.s = EngineSession("sid", CONFIG, "polling", self.now)
        self.sent: list[str | bytes] = []        # messages given to send(), in order
        self.delivered: list[str | bytes] = []   # messages read back off a transport
        self.pinged_at: float | None = None

    @rule(message=st.one_of(messages_text, st.binary(max_size=20)))
    def server_sends(self, message):
        self.s.send(message)
        if self.s.state == "open":
            self.sent.append(message)

    @rule()
    def client_polls(self):
        if self.s.transport != "polling" or not self.s.pending():
            return
        body = self.s.take_polling()
        for part in body.split(RECORD_SEPARATOR) if body else []:
            kind = part[0]
            if part.startswith("b"):
                import base64
                self.delivered.append(base64.b64decode(part[1:]))
            elif kind == str(MESSAGE):
                self.delivered.append(part[1:])
            elif kind == str(PING):
                self.pinged_at = self.now

    @rule()
    def client_reads_websocket(self):
        if self.s.transport != "websocket":
            return
        for m in self.s.take_ws():
            if isinstance(m, bytes):
                self.delivered.append(m)
            elif m[0] == str(MESSAGE):
                self.delivered.append(m[1:])
            elif m[0] == str(PING):
                self.pinged_at = self.now

    @rule(data=messages_text)
    def client_posts(self, data):
        if self.s.transport == "polling" and self.s.state == "open":
            assert self.s.receive_polling(("4" + data).encode()) == [data]

    @rule()
    def client_pongs(self):
        if self.s.state == "open" and self.pinged_at is not None:
            if self.s.transport == "polling":
                self.s.receive_polling(b"3")
            else:
                self.s.receive_ws("3")
            self.pinged_at = None

    @precondition(lambda self: self.s.transport == "polling" and self.s.state == "open")
    @rule()
    def client_probes_then_upgrades(self):
        self.s.receive_ws("2probe")
        assert self.s.take_probe_answers() == ["3probe"]
        assert self.s.pending()
        body = self.s.take_polling()          # the poll is released (a noop, or packets)
        if body == str(NOOP):
            pass
        else:
            self._read_polling_body(body)
        self.s.receive_ws("5")
        assert self.s.transport == "websocket"

    def _read_polling_body(self, body):
        for part in body.split(RECORD_SEPARATOR):
            if part.startswith("b"):
                import base64
                self.delivered.append(base64.b64decode(part[1:]))
            elif part[0] == str(MESSAGE):
                self.delivered.append(part[1:])
            elif part[0] == str(PING):
                self.pinged_at = self.now

    @rule(dt=st.floats(min_value=0.0, max_value=30.0))
    def time_passes(self, dt):
        self.now += dt
        self.s.tick(self.now)

    @invariant()
    def delivered_is_a_prefix_of_sent(self):
        assert self.delivered == self.sent[:len(self.delivered)]

    @invariant()
    def closed_only_for_a_late_pong(self):
        if self.s.state == "closed":
            assert self.s.close_reason == "ping timeout"
            assert self.pinged_at is not None or self.s.pong_due is not None

    @invariant()
    def a_ping_is_never_missing_for_long(self):
        if self.s.state == "open" and self.s.pong_due is None:
            assert self.s.next_ping <= self.now + CONFIG.ping_interval


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=settings.default.max_examples // 2,
                                      stateful_step_count=40, deadline=None)


@given(st.binary(max_size=300))
def test_polling_bodies_raise_only_engine_errors(body):
    s = EngineSession("x", CONFIG, "polling", 0.0)
    try:
        out = s.receive_polling(body)
    except EngineProtocolError:
        return
    assert all(isinstance(m, (str, bytes)) for m in out)


@given(st.one_of(texts, st.binary(max_size=50)))
def test_websocket_messages_raise_only_engine_errors(message):
    s = EngineSession("x", CONFIG, "websocket", 0.0)
    try:
        s.receive_ws(message)
    except EngineProtocolError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | texts
                           | st.floats(allow_nan=False, allow_infinity=False),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
packets = st.one_of(
    texts,
    st.tuples(st.sampled_from("0123456"), st.sampled_from(["", "/rnd,", "/x?y,", "/"]),
              st.sampled_from(["", "1", "12", "999999999999"]), json_values.map(json.dumps))
    .map(lambda t: "".join(t)),
    st.binary(max_size=20))


@given(st.lists(packets, max_size=6))
def test_socketio_packets_raise_only_protocol_errors(messages):
    conn = SocketIOConnection(max_attachment_bytes=100)
    for message in messages:
        try:
            action = conn.receive(message)
        except SocketIOProtocolError:
            return
        if isinstance(action, Connect):
            conn.connected(action.namespace, "sid")
        assert action is None or isinstance(action, (Connect, Leave, Emit, BadEmit))
        if isinstance(action, Emit):
            assert isinstance(action.name, str) and action.name


def test_a_binary_event_is_assembled_from_its_attachments():
    conn = SocketIOConnection()
    conn.connected("/", "s")
    assert conn.receive('52-3["up",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]') is None
    assert conn.receive(b"\x01") is None
    assert conn.receive(b"\x02\x03") == Emit("/", "up", (b"\x01", b"\x02\x03"), 3)


def test_events_of_a_namespace_not_joined_end_the_connection():
    conn = SocketIOConnection()
    try:
        conn.receive('2/rnd,["x"]')
    except SocketIOProtocolError as exc:
        assert "not connected" in str(exc)
    else:
        raise AssertionError("accepted an event of a namespace it never joined")


plain_events = st.tuples(st.sampled_from(["", "/rnd,", "/a.b,", "/x?y=1,", "/,"]),
                         st.sampled_from(["", "0", "7", "123456789012345", "1234567890123456"]),
                         json_values.map(json.dumps),
                         st.sampled_from(["", " ", "x", "]"])).map(lambda t: "2" + "".join(t))


@given(st.one_of(plain_events, texts.map(lambda t: "2" + t)))
def test_the_direct_event_decoder_agrees_with_the_library(message):
    from socketio import packet as sio_packet

    from sockend.socketio import decode_plain_event
    fast = decode_plain_event(message)
    if fast is None:
        return     # the library decides those
    pkt = sio_packet.Packet(encoded_packet=message)
    assert pkt.packet_type == 2 and pkt.attachment_count == 0
    assert fast == (pkt.namespace or "/", pkt.id, pkt.data)


@given(st.sampled_from(["/", "/rnd"]), st.integers(0, 10**12), st.lists(json_values, max_size=3))
def test_the_direct_ack_encoder_agrees_with_the_library(namespace, ack_id, args):
    from socketio import packet as sio_packet

    from sockend.socketio import ack
    [text] = ack(namespace, ack_id, args)
    mine = sio_packet.Packet(encoded_packet=text)
    lib = sio_packet.Packet(encoded_packet=sio_packet.Packet(3, data=args, namespace=namespace,
                                                             id=ack_id).encode())
    assert (mine.packet_type, mine.namespace, mine.id, mine.data) == \
        (lib.packet_type, lib.namespace, lib.id, lib.data) == (3, None if namespace == "/" else namespace,
                                                             ack_id, args)
