"""``nng-server`` (alias ``zeromq-server``): request-response for any nng binding.

A client dials ``endpoint`` with an nng **Req0** socket and sends one msgpack value
(the payload); it gets back one msgpack map: ``{"result": value}`` or
``{"error": {"code", "type", "message", "retryable"}}`` (see docs/drivers.md for the
bytes).  A streamed reply arrives whole, as the list of its chunks.

Concurrency: a cooked Rep0 socket serves one request at a time, so this driver opens
the socket in nng's *raw* mode, where every request carries its routing header (the
pipe and request id) and replies may go back in any order.  Each request runs as
its own task; the header is copied onto the reply so nng routes it to its caller.
When the pool is full the answer is the ``queue-full`` error at once.

``max-message`` (bytes, default 16 MiB: :data:`transport.codec.DEFAULT_MAX_MESSAGE`)
is nng's receive limit on the socket: a bigger message is refused by nng itself, which
closes that client's pipe (nothing of it is buffered; nng gives no way to answer it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pynng
import trio
from pynng import ffi, lib
from transport.bind_hosts import bind_endpoint
from transport.codec import DEFAULT_MAX_MESSAGE, pack, unpack
from transport.errors import BadMessage, CodecError, RemoteError, TransportError, error_to_body
from transport.rpc.connection import MIN_MESSAGE
from transport.sockets import TrioSocket, bound_address

from engine.errors import DriverError
from engine.drivers.base import NO_ROOM, Driver, DriverHost, run_job
from engine.drivers.options import (DriverSpec, OptionContext, check_keys, check_url, opt_number,
                                    opt_str)
from engine.drivers.registry import register

NNG_SCHEMES = ("tcp://", "ipc://", "inproc://", "ws://", "tls+tcp://")


@dataclass(frozen=True)
class EndpointOptions:
    endpoint: str
    max_message: int = DEFAULT_MAX_MESSAGE


def parse_max_message(raw: Any, ctx: OptionContext) -> int:
    """``max-message``: the largest message the driver reads, in bytes."""
    value: int = opt_number(raw, ctx, "max-message", default=DEFAULT_MAX_MESSAGE,
                            minimum=MIN_MESSAGE, integer=True)
    return value


def parse_nng_endpoint(raw: Any, ctx: OptionContext) -> str:
    endpoint: str = opt_str(raw, ctx, "endpoint")
    if not endpoint.startswith(NNG_SCHEMES):
        raise ctx.error("endpoint", "an nng address like tcp://127.0.0.1:9100 or ipc:///tmp/app.sock", endpoint)
    return check_url(endpoint, ctx, "endpoint")


def listen(sock: pynng.Socket, endpoint: str) -> str:
    """Bind ``sock`` or raise DriverError (port taken, bad address, no such interface);
    the bound address.  An interface name for host (``tcp://eth0:9100``, ZeroMQ's form)
    is bound at the interface's address."""
    try:
        sock.listen(bind_endpoint(endpoint))
    except (pynng.NNGException, TransportError) as exc:
        sock.close()
        raise DriverError(f"cannot listen on {endpoint}: {exc}") from None
    return bound_address(sock)


def reply_body(value: Any = None, error: BaseException | None = None) -> bytes:
    """The msgpack map a foreign client gets back."""
    if error is not None:
        return pack({"error": error_to_body(error)})
    try:
        return pack({"result": value})
    except CodecError as exc:
        return pack({"error": error_to_body(BadMessage(f"result could not be encoded: {exc}"))})


@register("nng-server", "zeromq-server")
class NngServer(Driver[EndpointOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.address: str | None = None
        self.in_flight = 0

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> EndpointOptions:
        check_keys(raw, ctx, ["endpoint", "max-message"])
        return EndpointOptions(endpoint=parse_nng_endpoint(raw, ctx),
                               max_message=parse_max_message(raw, ctx))

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        raw = pynng.Socket(opener=lib.nng_rep0_open_raw, recv_max_size=self.options.max_message)
        self.address = listen(raw, self.options.endpoint)
        sock = TrioSocket(raw)
        try:
            async with trio.open_nursery() as requests:
                task_status.started(self.address)
                while True:
                    msg = await sock.recv_msg()
                    header = _header(msg)
                    requests.start_soon(self._serve, app, sock, header, msg.bytes)
        finally:
            sock.close()

    async def _serve(self, app: DriverHost, sock: TrioSocket, header: bytes, body: bytes) -> None:
        self.stats.ticks += 1
        self.in_flight += 1
        try:
            reply = await self._answer(app, body)
            out = pynng.Message(reply)
            lib.nng_msg_header_append(out._nng_msg, header, len(header))
            try:
                await sock.send_msg(out)
            except Exception:
                pass  # socket closing (driver stopping) or the caller left: nobody to tell
        finally:
            self.in_flight -= 1

    async def _answer(self, app: DriverHost, body: bytes) -> bytes:
        try:
            payload = unpack(body)
        except CodecError as exc:
            err = BadMessage(f"request is not msgpack: {exc}")
            self.stats.failed(err)
            return reply_body(error=err)
        try:
            job = app.submit(self.spec.emit, payload)
        except NO_ROOM as exc:
            self.stats.skipped += 1
            return reply_body(error=exc)
        self.stats.submitted += 1
        try:
            return reply_body(await run_job(job, self.stats))
        except RemoteError as exc:
            return reply_body(error=exc)

    def details(self) -> dict[str, Any]:
        return {"endpoint": self.address or self.options.endpoint, "serving": self.in_flight,
                "max_message": self.options.max_message}


def _header(msg: pynng.Message) -> bytes:
    """The raw-mode routing header (backtrace: pipe id, request id) of a request."""
    size = lib.nng_msg_header_len(msg._nng_msg)
    return bytes(ffi.buffer(lib.nng_msg_header(msg._nng_msg), size))
