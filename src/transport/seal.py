"""Sealed frames on a link that lets unsealed ones in too: a keyed MAC with replay
protection, the client's :class:`SealedClient` and the server's :class:`SealGate`.

Made for the engine's control endpoint (docs/security.md): a client holding the node's
token seals every frame it sends; one without it sends plain frames, and the node
decides per request what such a caller may do (read-only verbs on loopback).  That is
why this is not a :class:`~transport.rpc.handlers.FrameGuard` that refuses whatever is
not sealed (the mesh's): the server must tell three cases apart and answer each —

- *plain* (no seal): let in, marked unsealed (``Request.sealed`` is False);
- *sealed and verified*: let in, marked sealed, and the connection's answers are sealed;
- *sealed, but not acceptably* (another key, a replay, a time outside the clock
  window, a tag that does not verify): refused with a readable reason
  (:class:`~transport.rpc.handlers.Refused`), answered with an unsealed ``ERROR`` per
  request, so the caller learns why instead of waiting out its timeout.  A MAC hides
  nothing, so the refused frame's requests can still be read to be answered.

A sealed frame::

    0xC1 | key id (4) | sender (16) | counter (8) | time (8) | frame | tag (16)

- ``0xC1`` is the one byte msgpack never uses, and a plain frame is a msgpack array: a
  sealed frame is never taken for a plain one, nor the reverse;
- the *key id* names the key (a hash of it), so "sealed with another token" is told
  from "tampered with";
- *sender* is random per :class:`Sender`, its *counter* rises by one per frame, and
  *time* is its wall clock (µs since the epoch, big-endian like the counter);
- the *tag* is the Poly1305 tag of ChaCha20-Poly1305 (RFC 8439) over everything before
  it, as associated data with nothing encrypted, under a key of the sender's own:
  HMAC-SHA256 of its sender id under the key of its direction (to the server, to the
  client: a frame cannot be reflected), with the counter as the nonce.  A sender never
  repeats a counter and no two senders share a key, so no nonce is ever used twice
  under one key, which is what the construction needs.  It costs 1-3 µs on a small frame
  and 11 µs to seal, 16 to open a 64 KiB one (measured here), where the keyed BLAKE2b of
  seal v1 cost 90-96 µs: the most expensive step of a streamed reply (issue 18).  A frame sealed by v1 (an older
  engine, or client) is refused with a reason that says so.

Replay: the receiver keeps a :class:`transport.mesh.replay.ReplayWindow` (the mesh's,
pure): it takes each (sender, counter) once, and only within ``MAX_SKEW`` seconds of
its own clock, so a frame copied off the wire is refused on any connection, at any
later time; the price is that the clocks of a client and a node must agree within
``MAX_SKEW`` (NTP).  Its memory is bounded, and only holders of a key add to it (the
tag is checked before anything is recorded).

Confidentiality is not this module's business: the control endpoint's payloads travel
in clear; across an untrusted network put it behind a tunnel (docs/security.md).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from transport.codec import Kind, decode_lists
from transport.errors import CodecError, Unauthorized
from transport.mesh.replay import STALE, ReplayWindow
from transport.rpc.handlers import FrameGuard, Refused

MARK = 0xC1
_MARK = bytes([MARK])
HEADER = struct.Struct(">B4s16sQQ")   # mark, key id, sender, counter, time (µs): 37 bytes
_pack_header = HEADER.pack
TAG = 16
OVERHEAD = HEADER.size + TAG
MAX_SKEW = 30.0        # s: how far a frame's time may be from the receiver's clock
SECURITY_DOC = "docs/security.md"
SENDER_KEYS = 4096     # senders' keys a receiver keeps derived (the oldest go first)
_LABEL = b"engine-trio sealed frames v2:"
_V1_LABEL = b"engine-trio sealed frames v1:"

Clock = Callable[[], float]


@dataclass(frozen=True)
class SealKey:
    """One secret as the seal uses it: an id, and a key for each direction, derived
    (HMAC-SHA256) per ``purpose``, so the same secret used for two things gives two
    unrelated keys.  ``v1_id``: the id seal v1 gave the same secret, to tell a frame
    from an older engine from one sealed with another token."""

    id: bytes
    to_server: bytes = field(repr=False)
    to_client: bytes = field(repr=False)
    v1_id: bytes = b""

    @classmethod
    def from_secret(cls, secret: bytes, purpose: bytes = b"control") -> SealKey:
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("a seal key needs a non-empty bytes secret")
        base = hmac.digest(secret, _LABEL + purpose, "sha256")
        v1 = hmac.digest(secret, _V1_LABEL + purpose, "sha256")
        return cls(id=_key_id(base), to_server=hmac.digest(base, b"to server", "sha256"),
                   to_client=hmac.digest(base, b"to client", "sha256"), v1_id=_key_id(v1))


def _key_id(base: bytes) -> bytes:
    return hashlib.sha256(b"key id:" + base).digest()[:4]


def sender_mac(key: bytes, sender: bytes) -> ChaCha20Poly1305:
    """The MAC of one sender's frames: its own key, derived from its direction's."""
    return ChaCha20Poly1305(hmac.digest(key, b"sender:" + sender, "sha256"))


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


class Sender:
    """The sending half: a random sender id, a counter, and the seal of each frame."""

    __slots__ = ("key_id", "key", "clock", "id", "_mac", "_counter")

    def __init__(self, key_id: bytes, key: bytes, clock: Clock = time.time) -> None:
        self.key_id = key_id
        self.key = key
        self.clock = clock
        self.id = os.urandom(16)
        self._mac = sender_mac(key, self.id)
        self._counter = 0

    def seal(self, frame: bytes) -> bytes:
        self._counter = counter = self._counter + 1
        head = _pack_header(MARK, self.key_id, self.id, counter, int(self.clock() * 1e6)) + frame
        return head + self._mac.encrypt(_nonce(counter), b"", head)


class _Opener:
    """The receiving half: checks a sealed frame's key, tag and freshness."""

    def __init__(self, keys: dict[bytes, bytes], clock: Clock, max_skew: float,
                 v1_ids: Iterable[bytes] = ()) -> None:
        self.keys = keys          # key id -> the key of the direction received
        self.v1_ids = frozenset(v1_ids)
        self.clock = clock
        self.window: ReplayWindow[bytes] = ReplayWindow(max_skew=max_skew)
        # (key id + sender) -> that sender's MAC: derived once per sender, not per
        # frame; bounded (anyone may name new senders: the tag is checked after).
        self._macs: dict[bytes, ChaCha20Poly1305] = {}

    def _mac(self, key: bytes, key_id: bytes, sender: bytes) -> ChaCha20Poly1305:
        macs = self._macs
        mac = macs.get(key_id + sender)
        if mac is None:
            if len(macs) >= SENDER_KEYS:
                del macs[next(iter(macs))]
            mac = macs[key_id + sender] = sender_mac(key, sender)
        return mac

    def open(self, frame: bytes, refuse: Callable[[bytes, str], Exception]) -> tuple[bytes, bytes]:
        """(the frame inside, its key id); raises ``refuse(inner, why)`` for a frame that
        can be read but not trusted, CodecError for one too short to be sealed."""
        if len(frame) < OVERHEAD:
            raise CodecError(f"a sealed frame of {len(frame)} bytes (at least {OVERHEAD})")
        _, key_id, sender, counter, micros = HEADER.unpack_from(frame)
        inner = frame[HEADER.size:-TAG]
        key = self.keys.get(key_id)
        if key is None:
            if key_id in self.v1_ids:
                raise refuse(inner, "it was sealed by an older engine (seal v1): update "
                                    "the side that sent it")
            raise refuse(inner, "it was sealed with another token than the one this endpoint holds")
        view = memoryview(frame)
        try:
            self._mac(key, key_id, sender).decrypt(_nonce(counter), view[-TAG:], view[:-TAG])
        except InvalidTag:
            raise refuse(inner, "its seal does not verify (altered on the way?)") from None
        at, now = micros / 1e6, self.clock()
        verdict = self.window.accept(key_id + sender, counter, at, now)
        if verdict == STALE:
            raise refuse(inner, f"it was sealed {now - at:+.1f} s away from this clock, "
                                f"outside the {self.window.max_skew:g} s allowed (a replay, "
                                "or clocks that disagree)")
        if verdict is not None:
            raise refuse(inner, "it was already received once: a replay")
        return inner, key_id


def _only_errors(frame: bytes) -> bool:
    envelopes = decode_lists(frame)
    return bool(envelopes) and all(kind == Kind.ERROR for kind, _, _ in envelopes)


class SealedClient:
    """A client's :class:`~transport.rpc.handlers.FrameGuard` for a server behind a
    :class:`SealGate` with the same key: seals what it sends, opens what it gets.

    An unsealed frame from the server is taken only if it holds nothing but ``ERROR``
    envelopes: how a server that could not verify this client's frames (another key,
    a replay) says why.  Someone on the path could forge such a frame, but only to fail
    calls, which cutting the connection does as well; never to answer one."""

    def __init__(self, key: SealKey, *, clock: Clock = time.time,
                 max_skew: float = MAX_SKEW) -> None:
        self.key_id = key.id
        self._sender = Sender(key.id, key.to_server, clock)
        self._opener = _Opener({key.id: key.to_client}, clock, max_skew, [key.v1_id])

    def seal(self, frame: bytes) -> bytes:
        return self._sender.seal(frame)

    def open(self, frame: bytes) -> bytes:
        if frame[:1] != _MARK:
            if _only_errors(frame):
                return frame
            raise CodecError("an unsealed answer from a server whose answers must be sealed")
        inner, _ = self._opener.open(frame, _refused_answer)
        return inner


def _refused_answer(inner: bytes, why: str) -> Exception:
    return CodecError(f"an answer refused: {why}")


class SealGate:
    """A server's :class:`~transport.rpc.handlers.FrameGate`: lets plain frames in
    (marked unsealed), verifies sealed ones against ``keys`` (several: e.g. a node's
    token and its cluster's secret), and refuses the rest with a readable reason.  A
    sealed frame comes with the guard that seals the answers on its connection (with
    the key it was sealed with)."""

    def __init__(self, keys: Iterable[SealKey], *, clock: Clock = time.time,
                 max_skew: float = MAX_SKEW, what: str = "this server") -> None:
        keys = list(keys)
        if not keys:
            raise ValueError("a SealGate needs at least one key")
        self.what = what
        self._opener = _Opener({k.id: k.to_server for k in keys}, clock, max_skew,
                               [k.v1_id for k in keys])
        self._answers = {k.id: _AnswerGuard(self, Sender(k.id, k.to_client, clock))
                         for k in keys}
        self.refused = 0

    def open(self, frame: bytes) -> tuple[bytes, FrameGuard | None]:
        if frame[:1] != _MARK:
            return frame, None
        inner, key_id = self._opener.open(frame, self._refuse)
        return inner, self._answers[key_id]

    def _refuse(self, inner: bytes, why: str) -> Exception:
        self.refused += 1
        return Refused(inner, Unauthorized(
            f"{self.what} refused the request: {why}. Use its token (see {SECURITY_DOC})"))


class _AnswerGuard:
    """The guard of one connection to a :class:`SealGate` once its client sealed with
    a key: seals the answers under that key (one sender per key, shared by its
    connections: each sees its counter rise), opens as the gate does."""

    __slots__ = ("gate", "sender")

    def __init__(self, gate: SealGate, sender: Sender) -> None:
        self.gate = gate
        self.sender = sender

    def seal(self, frame: bytes) -> bytes:
        return self.sender.seal(frame)

    def open(self, frame: bytes) -> bytes:
        inner, guard = self.gate.open(frame)
        if guard is None:
            raise CodecError("an unsealed frame on a sealed connection")
        return inner
