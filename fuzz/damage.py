"""What the fuzzers of sealed or signed bytes do to them: flip a byte, cut the end off,
or add bytes after it.  One draw of each, shared by the datagram, mesh-frame and
control-seal fuzzers, so each of them tries the same damage."""
from __future__ import annotations

from hypothesis import strategies as st

BYTE_DAMAGE = ("flip", "cut", "extend")


def damaged(data: st.DataObject, wire: bytes, how: str) -> bytes:
    """``wire`` with one of :data:`BYTE_DAMAGE` done to it (``wire`` is not empty)."""
    if how == "flip":
        i = data.draw(st.integers(0, len(wire) - 1))
        return wire[:i] + bytes([wire[i] ^ data.draw(st.integers(1, 255))]) + wire[i + 1:]
    if how == "cut":
        return wire[:data.draw(st.integers(0, len(wire) - 1))]
    if how == "extend":
        return wire + data.draw(st.binary(min_size=1, max_size=8))
    raise ValueError(f"no byte damage {how!r}")
