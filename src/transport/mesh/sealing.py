"""Sealed frames: what a mesh with a ``secret`` puts on its data links.

A :class:`FrameSigner` is the :class:`~transport.rpc.handlers.FrameGuard` of a mesh
component: ``seal`` encrypts and authenticates an outgoing frame, ``open`` checks,
refuses replays and decrypts an incoming one (raising ``CodecError``).  So a process
without the secret reads nothing on the wire and nothing it sends is accepted, and a
frame captured on the wire does nothing when sent again.

A sealed frame::

    version (1 byte, 0xE2) | sender (16 bytes) | counter (8, big-endian) |
    time (8: the sender's wall clock, µs since the epoch) | AES-256-GCM(frame) + tag (16)

- Keys.  From the secret, HKDF-SHA256 derives one key per *purpose* (what the frames
  are and for whom: ``b"request:" + responder id``, ``b"answer:" + responder id``,
  ``b"event:" + publisher id``), and from that an HMAC-SHA256 one per sender
  (a random 16-byte id per FrameSigner).  A frame sealed for one purpose does not
  open under another: a request captured for one Responder is refused by another,
  and by the same Responder's next run (a new id), an answer cannot pass for a
  request, and one Publisher's events cannot pass for another's.
- Nonce: the counter (it grows by one per frame and each sender has its own key, so
  no nonce repeats under a key).  The header is the AEAD's associated data: altering
  any of it fails the tag.
- Replays: the receiver accepts each (sender, counter) once, and only within
  ``max_skew`` seconds of its own clock (transport/mesh/replay.py).  Frames on one
  link arrive in order; the window still tolerates 1,024 counters of disorder.

Cost (this 2-core VM, a 60-byte frame): seal 1.1-1.7 µs, open 1.6-2.1 µs, 49 bytes
added; the HMAC-only signer it replaced cost 2.0-3.2 µs and 1.9-3.6 µs.  AES-GCM rather than
ChaCha20-Poly1305: with AES instructions (any server CPU) it is as fast for small frames
and twice as fast from 1 KB up (16 KB: 2.5-3 µs against 6-7 µs).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transport.errors import CodecError
from transport.mesh.replay import DEFAULT_MAX_SKEW, REPLAYED, STALE, ReplayWindow

VERSION = 0xE2
_HEAD = struct.Struct(">B16sQQ")
HEAD = _HEAD.size          # 33
TAG = 16                   # GCM's tag
OVERHEAD = HEAD + TAG      # bytes a sealed frame adds: 49
_NONCE = struct.Struct(">4xQ")
MAX_SENDER_KEYS = 4096     # per-sender keys kept by a receiver (derived again if evicted)


def purpose_key(secret: bytes, purpose: bytes) -> bytes:
    """The 32-byte key of one purpose, derived from the mesh's secret."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"engine-trio mesh frames v2|" + purpose).derive(secret)


def _sender_key(key: bytes, sender: bytes) -> AESGCM:
    return AESGCM(hmac.digest(key, sender, hashlib.sha256))


class FrameSigner:
    """Seals frames for ``purpose`` and opens frames sealed for ``opens`` (by default
    the same purpose: both ends of a link may then use the same guard).  ``opens=b""``
    opens nothing (a Publisher's guard).  ``clock`` is the wall clock (``time.time``).

    ``stats`` counts what ``open`` refused: ``forged`` (not sealed with this secret
    for this purpose, or altered), ``replayed`` (a counter already accepted, or one of
    our own frames sent back), ``stale`` (a time outside ``max_skew``)."""

    def __init__(self, secret: bytes, purpose: bytes, *, opens: bytes | None = None,
                 max_skew: float = DEFAULT_MAX_SKEW,
                 clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("a FrameSigner needs a non-empty secret")
        self._sender = os.urandom(16)
        self._counter = 0
        self._seal_aead = _sender_key(purpose_key(secret, purpose), self._sender)
        opens = purpose if opens is None else opens
        self._open_key = purpose_key(secret, opens) if opens else b""
        self._open_aeads: dict[bytes, AESGCM] = {}
        self._replay: ReplayWindow[bytes] = ReplayWindow(max_skew=max_skew)
        self._clock = clock
        self.stats = {"forged": 0, "replayed": 0, "stale": 0}

    @property
    def rejected(self) -> int:
        """Every frame ``open`` refused."""
        return sum(self.stats.values())

    def seal(self, frame: bytes) -> bytes:
        self._counter = counter = self._counter + 1
        head = _HEAD.pack(VERSION, self._sender, counter, int(self._clock() * 1e6))
        return head + self._seal_aead.encrypt(_NONCE.pack(counter), frame, head)

    def open(self, frame: bytes) -> bytes:
        if len(frame) < OVERHEAD or frame[0] != VERSION or not self._open_key:
            return self._refuse("forged", "frame not sealed with this mesh's secret")
        _, sender, counter, micros = _HEAD.unpack_from(frame)
        if sender == self._sender:
            return self._refuse("replayed", "a frame of our own sent back")
        at, now = micros / 1e6, self._clock()
        verdict = self._replay.check(sender, counter, at, now)
        if verdict is not None:
            if verdict == STALE:
                return self._refuse("stale", f"frame sent {now - at:+.1f} s from now, outside "
                                    f"the mesh's clock window of {self._replay.max_skew:g} s")
            return self._refuse("replayed", "frame replayed (its counter was accepted before)")
        aead = self._open_aeads.get(sender)
        known = aead is not None
        if aead is None:
            aead = _sender_key(self._open_key, sender)
        try:
            body = aead.decrypt(_NONCE.pack(counter), frame[HEAD:], frame[:HEAD])
        except InvalidTag:
            return self._refuse("forged", "frame not sealed with this mesh's secret")
        if not known:  # cached only once it proved itself: forgeries cost no memory
            if len(self._open_aeads) >= MAX_SENDER_KEYS:
                del self._open_aeads[next(iter(self._open_aeads))]
            self._open_aeads[sender] = aead
        self._replay.commit(sender, counter, at, now)
        return body

    def _refuse(self, why: str, message: str) -> bytes:
        self.stats[why] += 1
        raise CodecError(message)


__all__ = ["FrameSigner", "OVERHEAD", "REPLAYED", "purpose_key"]
