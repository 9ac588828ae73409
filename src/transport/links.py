"""Addresses and the two kinds of link an rpc connection can travel over.

- ``tcp://host:port`` and ``ipc:///path``: nng Pair1 (polyamorous on the server), so a
  client in any language with an nng binding can talk to us.
- ``stream+tcp://host:port`` and ``stream+unix:///path``: length-prefixed frames straight
  over trio sockets (:mod:`transport.streams`).  No nng threads between the kernel and
  us, which on this 2-core machine is worth 2-4x in round trips/s, more under load
  (each nng message crosses several of nng's internal threads).

Both carry the same frames of envelopes; only the address says which.
"""
from __future__ import annotations

import os

import trio

from .errors import TransportError
from .streams import FramedStream

STREAM_TCP = "stream+tcp://"
STREAM_UNIX = "stream+unix://"


def is_stream(address: str) -> bool:
    return address.startswith((STREAM_TCP, STREAM_UNIX))


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
        if address.startswith(STREAM_TCP):
            host, port = _split_host_port(address, STREAM_TCP)
            listeners = await trio.open_tcp_listeners(port, host=host)
            bound_port = listeners[0].socket.getsockname()[1]
            return listeners, f"{STREAM_TCP}{host}:{bound_port}"
        path = address[len(STREAM_UNIX):]
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
    if address.startswith(STREAM_TCP):
        host, port = _split_host_port(address, STREAM_TCP)
        stream = await trio.open_tcp_stream(host, port)  # trio turns Nagle off itself
    else:
        stream = await trio.open_unix_socket(address[len(STREAM_UNIX):])
    return FramedStream(stream)
