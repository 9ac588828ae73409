"""Addresses and the two kinds of link an rpc connection can travel over.

The engine's own endpoints (the control endpoint, ``native-server``, mesh Responders)
speak frames of envelopes (:mod:`transport.codec`) over either:

- ``tcp://host:port`` or ``ipc:///path`` (alias ``unix:///path``): length-prefixed
  frames straight over trio sockets (:mod:`transport.streams`).  The default: reliable
  with TCP's own backpressure, and no nng threads between the kernel and us, which on
  this 2-core machine is worth 2x in sequential round trips/s, more under load.
- ``nng+tcp://host:port`` or ``nng+ipc:///path``: nng Pair1 (polyamorous on the server),
  so a client in any language with an nng binding can talk to it.  nng documents that
  mode as best-effort: a client that cannot keep up may miss replies, so callers rely
  on their timeouts there.

Both are a :class:`Link` (``send``/``recv``/``close`` of whole frames), which is what
:class:`transport.channel.EnvelopeChannel` and the rpc client and server are written
against; a framed stream is moreover a :class:`StreamLink`, whose extra methods (write
now if the socket takes it, read every frame a wake-up brought, poll without waiting)
are the fast paths of the default links.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

import trio

from transport.errors import TransportError
from transport.streams import FramedStream

if TYPE_CHECKING:
    from transport.sockets import TrioSocket

class Link(Protocol):
    """One connected link carrying frames (byte strings, each delivered whole): a
    :class:`transport.sockets.TrioSocket` (nng) or a :class:`FramedStream`.  Each
    raises :class:`transport.errors.Closed` once the link is gone."""

    async def send(self, data: bytes) -> None:
        """Send one frame (waits for room)."""

    async def recv(self) -> bytes:
        """The next frame."""
        ...

    def close(self) -> None:
        """Close now (synchronous: callers close from ``finally`` and callbacks)."""


class StreamLink(Link, Protocol):
    """A link over a byte stream (:class:`FramedStream`): what it adds are the fast paths
    an nng socket has no equivalent of."""

    def try_send_nowait(self, data: bytes) -> bool | int:
        """Write a frame now if the socket takes it without blocking: True if all of it
        went, ``transport._outbox.SENT_PARTLY`` if only its start did (:meth:`flush`
        finishes it), False if nothing was written."""
        ...

    async def flush(self) -> None:
        """Finish writing what :meth:`try_send_nowait` left half sent."""

    async def recv_many(self) -> list[bytes]:
        """Every complete frame already read (at least one), reading once if none is."""
        ...

    def poll_frames(self) -> list[bytes]:
        """Complete frames available without waiting (often none)."""
        ...


if TYPE_CHECKING:  # both kinds keep the faces the links' users are typed against
    _nng_link: type[Link] = TrioSocket
    _stream_link: type[StreamLink] = FramedStream


NNG_PREFIX = "nng+"
_TCP = "tcp://"
_UNIX = ("ipc://", "unix://")


def is_stream(address: str) -> bool:
    return address.startswith((_TCP, *_UNIX))


def nng_url(address: str) -> str:
    """The nng URL behind an ``nng+`` address."""
    if not address.startswith(NNG_PREFIX):
        raise TransportError(f"{address!r}: expected tcp://, ipc:// or nng+tcp://, nng+ipc://")
    return address[len(NNG_PREFIX):]


def _split_host_port(address: str, prefix: str) -> tuple[str, int]:
    rest = address[len(prefix):]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"{address!r}: expected {prefix}HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def listen_stream(address: str) -> tuple[list[trio.SocketListener], str]:
    """Open listeners for a stream address; returns them with the concrete address
    (port 0 resolved)."""
    try:
        if address.startswith(_TCP):
            host, port = _split_host_port(address, _TCP)
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound_port = listeners[0].socket.getsockname()[1]
            return listeners, f"{_TCP}{host}:{bound_port}"
        path = _unix_path(address)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket file from a dead process
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        return [trio.SocketListener(sock)], address
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: {exc}") from None


async def connect_stream(address: str) -> FramedStream:
    """Connect to a stream address; raises OSError when nobody listens."""
    if address.startswith(_TCP):
        host, port = _split_host_port(address, _TCP)
        stream = await trio.open_tcp_stream(host, port)  # trio turns Nagle off itself
    else:
        stream = await trio.open_unix_socket(_unix_path(address))
    return FramedStream(stream)


def _unix_path(address: str) -> str:
    for prefix in _UNIX:
        if address.startswith(prefix):
            return address[len(prefix):]
    raise TransportError(f"{address!r}: not a unix socket address")
