"""Addresses and the two kinds of link an rpc connection can travel over.

The engine's own endpoints (the control endpoint, ``native-server``, mesh Responders)
speak frames of envelopes (:mod:`transport.codec`) over either:

- ``tcp://host:port`` or ``ipc:///path`` (alias ``unix:///path``): length-prefixed
  frames straight over trio sockets (:mod:`transport.streams`).  The default: reliable
  with TCP's own backpressure, and no nng threads between the kernel and us, which on
  this 2-core machine is worth 2x in sequential round trips/s, more under load.
- ``tls+tcp://host:port``: the same frames inside TLS (``trio.SSLStream``; the server
  and the client each need an ``ssl_context``: :mod:`transport.tls`).  Slower than
  plain TCP (no direct socket fast paths), for links that leave the host.
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
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import trio

from transport.bind_hosts import bind_host
from transport.errors import TransportError
from transport.streams import FramedStream
from transport.tls import HANDSHAKE_TIMEOUT, TlsHandshakeError, describe

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

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed): what a poll sleeps on."""
        ...


if TYPE_CHECKING:  # both kinds keep the faces the links' users are typed against
    _nng_link: type[Link] = TrioSocket
    _stream_link: type[StreamLink] = FramedStream


NNG_PREFIX = "nng+"
_TCP = "tcp://"
_TLS = "tls+tcp://"
_UNIX = ("ipc://", "unix://")
# A listen host that means every interface (docs/drivers.md: "an empty host means every
# interface"), and what a client on this host dials to reach such a listener.
_WILDCARD_HOSTS = ("", "*")
ANY_HOST = "0.0.0.0"
LOCAL_HOST = "127.0.0.1"


def is_stream(address: str) -> bool:
    return address.startswith((_TCP, _TLS, *_UNIX))


def nng_url(address: str) -> str:
    """The nng URL behind an ``nng+`` address."""
    if not address.startswith(NNG_PREFIX):
        raise TransportError(f"{address!r}: expected tcp://, tls+tcp://, ipc:// or nng+tcp://, "
                             "nng+ipc://")
    return address[len(NNG_PREFIX):]


def _split_host_port(address: str, prefix: str) -> tuple[str, int]:
    """Where to *dial*: an empty host is this host (127.0.0.1)."""
    host, port = _host_port(address, prefix)
    return host or LOCAL_HOST, port


def listen_host_port(address: str, prefix: str = _TCP) -> tuple[str, int]:
    """Where to *listen*: an empty host (or ``*``) is every interface, 0.0.0.0; an
    interface's name (``tcp://lo:9100``) is its address (:mod:`transport.bind_hosts`)."""
    host, port = _host_port(address, prefix)
    return (ANY_HOST if host in _WILDCARD_HOSTS else bind_host(host)), port


def _host_port(address: str, prefix: str) -> tuple[str, int]:
    rest = address[len(prefix):]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"{address!r}: expected {prefix}HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Listening:
    """Listeners opened for a stream address.  ``address``: the address to dial them at
    (port 0 resolved; an empty host, which listens on every interface, reads as
    127.0.0.1 so the address works from this host).  ``bound``: what the socket is
    bound to (``tcp://0.0.0.0:PORT`` for an empty host).  An explicit ``0.0.0.0`` is
    reported as it is in both: the mesh rewrites that one to the address a beacon came
    from (docs/mesh.md), which it could not do with 127.0.0.1."""

    listeners: list[trio.SocketListener]
    address: str
    bound: str


async def listen_stream(address: str) -> Listening:
    """Open listeners for a stream address (``tls+tcp://`` listens like ``tcp://``: the
    server wraps each connection, :func:`accept_tls`)."""
    try:
        if address.startswith((_TCP, _TLS)):
            prefix = _TCP if address.startswith(_TCP) else _TLS
            requested = _host_port(address, prefix)[0]
            host, port = listen_host_port(address, prefix)
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound_port = listeners[0].socket.getsockname()[1]
            dial = LOCAL_HOST if requested in _WILDCARD_HOSTS else host
            return Listening(listeners, f"{prefix}{dial}:{bound_port}",
                             f"{prefix}{host}:{bound_port}")
        path = _unix_path(address)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket file from a dead process
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        return Listening([trio.SocketListener(sock)], address, address)
    except OSError as exc:
        raise TransportError(f"cannot listen on {address}: {exc}") from None


async def connect_stream(address: str, ssl_context: ssl.SSLContext | None = None
                         ) -> FramedStream:
    """Connect to a stream address; raises OSError when nobody listens, and
    :class:`~transport.tls.TlsHandshakeError` when a ``tls+tcp://`` handshake fails
    (``ssl_context`` is required for those, ignored otherwise: the caller checks,
    :func:`transport.tls.check_context`)."""
    if address.startswith(_TCP):
        host, port = _split_host_port(address, _TCP)
        stream = await trio.open_tcp_stream(host, port)  # trio turns Nagle off itself
    elif address.startswith(_TLS):
        if ssl_context is None:
            raise TransportError(f"{address}: a tls+tcp:// address needs an ssl_context")
        host, port = _split_host_port(address, _TLS)
        tcp = await trio.open_tcp_stream(host, port)
        tls = trio.SSLStream(tcp, ssl_context, server_hostname=host)
        await _handshake(tls, f"TLS handshake with {address}")
        return FramedStream(tls)
    else:
        stream = await trio.open_unix_socket(_unix_path(address))
    return FramedStream(stream)


async def accept_tls(raw: trio.SocketStream, ssl_context: ssl.SSLContext,
                     peer: str) -> trio.SSLStream[trio.SocketStream]:
    """The server's side of a ``tls+tcp://`` connection, handshake done; raises
    :class:`~transport.tls.TlsHandshakeError` (the caller closes ``raw``)."""
    tls = trio.SSLStream(raw, ssl_context, server_side=True)
    await _handshake(tls, f"TLS handshake from {peer}")
    return tls


async def _handshake(tls: trio.SSLStream[trio.SocketStream], what: str) -> None:
    """Bounded by HANDSHAKE_TIMEOUT; on failure the TCP connection is closed."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
        return
    except trio.TooSlowError:
        error = TlsHandshakeError(f"{what}: no answer within {HANDSHAKE_TIMEOUT:g} s")
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        error = TlsHandshakeError(f"{what} failed: {describe(exc)}")
    await trio.aclose_forcefully(tls.transport_stream)
    raise error


def _unix_path(address: str) -> str:
    for prefix in _UNIX:
        if address.startswith(prefix):
            return address[len(prefix):]
    raise TransportError(f"{address!r}: not a unix socket address")
