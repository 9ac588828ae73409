"""trio over pynng without a thread hop per message.

pynng's own ``asend``/``arecv`` run every call through a worker thread (about 2,300
round trips/s here).  nng also exposes pollable file descriptors that become
readable when a message can be received or sent; waiting on those with
``trio.lowlevel.wait_readable`` and then calling the non-blocking ``recv``/``send``
is ~1.7x faster and needs no threads.  :class:`TrioSocket` is that adapter.

One task at a time may wait to receive (and one to send) on a socket: a second
concurrent waiter is a bug and trio raises ``BusyResourceError`` for it.
"""
from __future__ import annotations

from typing import Callable

import pynng
import trio

from transport.errors import Closed

# Per-socket queue depths (messages).  nng's default of 0/1 makes every send a
# rendezvous; a little buffering lets bursts flow without blocking the sender.
DEFAULT_BUFFER = 1024


class TrioSocket:
    """A pynng socket driven by trio via its pollable descriptors."""

    def __init__(self, sock: pynng.Socket, *, buffer: int = DEFAULT_BUFFER):
        self.sock = sock
        try:
            sock.send_buffer_size = buffer
        except pynng.NNGException:
            pass  # receive-only protocols (Sub0, Pull0) have no send buffer
        try:
            sock.recv_buffer_size = buffer
        except pynng.NNGException:
            pass  # send-only protocols (Pub0, Push0)
        self._recv_fd: int | None = None
        self._send_fd: int | None = None
        self._closed = False

    # -- descriptors are created lazily by nng; cache them ----------------------
    @property
    def recv_fd(self) -> int:
        if self._recv_fd is None:
            self._recv_fd = self.sock.recv_fd
        return self._recv_fd

    @property
    def send_fd(self) -> int:
        if self._send_fd is None:
            self._send_fd = self.sock.send_fd
        return self._send_fd

    # -- I/O --------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        await self._send(self.sock.send, data)

    async def send_msg(self, msg: pynng.Message) -> None:
        """Send a message addressed to ``msg.pipe`` (polyamorous Pair1, Rep0...)."""
        await self._send(self.sock.send_msg, msg)

    async def _send(self, send: Callable, data) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                send(data, block=False)
            except pynng.TryAgain:
                if self._closed:
                    raise Closed("socket closed") from None
                # send_fd is readable once *some* send can proceed; for a single
                # full pipe of a polyamorous socket it may be readable while that
                # pipe is still full, so back off briefly instead of spinning.
                await self._wait(self.send_fd)
                try:
                    send(data, block=False)
                    break
                except pynng.TryAgain:
                    await trio.sleep(0.001)
                    continue
            except pynng.Closed:
                raise Closed("socket closed") from None
            break
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def recv(self) -> bytes:
        return await self._recv(self.sock.recv)

    async def recv_msg(self) -> pynng.Message:
        """Receive with the sender's pipe attached (to answer it with ``send_msg``)."""
        return await self._recv(self.sock.recv_msg)

    async def _recv(self, recv: Callable):
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                data = recv(block=False)
            except pynng.TryAgain:
                if self._closed:
                    raise Closed("socket closed") from None
                await self._wait(self.recv_fd)
                continue
            except pynng.Closed:
                raise Closed("socket closed") from None
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def _wait(self, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError:
            raise Closed("socket closed") from None

    def try_recv(self) -> bytes | None:
        """Non-blocking receive: a message if one is queued, else None."""
        try:
            return self.sock.recv(block=False)
        except pynng.TryAgain:
            return None
        except pynng.Closed:
            raise Closed("socket closed") from None

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake any task parked on our descriptors before nng closes them.
        for fd in (self._recv_fd, self._send_fd):
            if fd is not None:
                try:
                    trio.lowlevel.notify_closing(fd)
                except RuntimeError:
                    pass  # closed outside trio: nobody can be parked on it
        self.sock.close()

    async def __aenter__(self) -> "TrioSocket":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def on_pipe_event(self, removed: Callable[[pynng.Pipe], None] | None = None,
                      added: Callable[[pynng.Pipe], None] | None = None) -> None:
        """Run callbacks *in the trio thread* when a peer connects or goes away.

        nng calls pipe callbacks on its own threads; we hop them onto trio's
        run loop so callers can touch trio state safely.  Must be called from
        inside trio.
        """
        token = trio.lowlevel.current_trio_token()

        def hop(cb):
            def handler(pipe):
                try:
                    token.run_sync_soon(cb, pipe)
                except trio.RunFinishedError:
                    pass
            return handler

        if removed is not None:
            self.sock.add_post_pipe_remove_cb(hop(removed))
        if added is not None:
            self.sock.add_post_pipe_connect_cb(hop(added))


def loopback_tcp(port: int = 0) -> str:
    """A tcp address on loopback; port 0 lets nng pick (read it back with :func:`bound_address`)."""
    return f"tcp://127.0.0.1:{port}"


def bound_address(sock: pynng.Socket, *, dialable: bool = True) -> str:
    """The concrete address of a socket's first listener (resolves port 0).

    nng listens on every interface for an empty host (``tcp://:PORT``) and reports it
    that way, which nng itself cannot dial ("Address invalid"): with ``dialable`` such
    an address reads ``tcp://127.0.0.1:PORT`` (reachable from this host), without it
    ``tcp://0.0.0.0:PORT`` (what it is bound to).  An explicit ``0.0.0.0`` stays as it
    is: the mesh rewrites that one to the address a beacon came from (docs/mesh.md)."""
    listener = sock.listeners[0]
    url = listener.url
    if not url.startswith("tcp://"):
        return url
    host, _, port = url[len("tcp://"):].rpartition(":")
    if port == "0" or not port.isdigit():
        port = str(listener.local_address.port)
    if host in ("", "*"):
        host = "127.0.0.1" if dialable else "0.0.0.0"
    return f"tcp://{host}:{port}"
