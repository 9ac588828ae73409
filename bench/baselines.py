"""Python baselines for request-response: the limit, and the obvious nng way.

- :func:`trio_tcp_echo`: a trio TCP echo of the same 32-byte payload, client and
  server in this one process: the practical ceiling of Python + trio on this machine
  (no serialisation, no second process, no nng).  Many callers share one connection;
  their payloads are queued and written by one writer task, and the echoes, which
  come back in order, wake the callers first-in first-out.
- :func:`pynng_reqrep`: a pynng Req0 client using pynng's own ``asend``/``arecv`` (one
  context per concurrent caller) against a blocking Rep0 echo in a child process.
"""
from __future__ import annotations

from collections import deque
from functools import partial

import pynng
import trio

from .harness import PAYLOAD, RRFigures, Settings, child_process, measure_rr, python_child


class _PipelinedEchoClient:
    """Callers append to an outbox; one writer sends; echoes wake callers in order."""

    def __init__(self, stream: trio.SocketStream, size: int):
        self.stream = stream
        self.size = size
        self.outbox = bytearray()
        self.waiters: deque[trio.Event] = deque()
        self.wakeup = trio.Event()

    async def writer(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup = trio.Event()
            while self.outbox:
                data = bytes(self.outbox)
                self.outbox.clear()
                await self.stream.send_all(data)

    async def reader(self) -> None:
        pending = 0
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return
            pending += len(data)
            while pending >= self.size:
                pending -= self.size
                self.waiters.popleft().set()

    async def call(self) -> None:
        done = trio.Event()
        self.waiters.append(done)
        self.outbox += PAYLOAD
        self.wakeup.set()
        await done.wait()


async def _echo_handler(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


async def trio_tcp_echo(settings: Settings) -> RRFigures:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, _echo_handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = _PipelinedEchoClient(stream, len(PAYLOAD))
        nursery.start_soon(client.writer)
        nursery.start_soon(client.reader)
        try:
            figures = await measure_rr(lambda: client.call, settings)
        finally:
            nursery.cancel_scope.cancel()
    await stream.aclose()
    return figures


async def pynng_reqrep(settings: Settings) -> RRFigures:
    async with child_process(python_child("bench.servers", "pynng-rep",
                                          "tcp://127.0.0.1:0")) as server:
        with pynng.Req0(dial=server.ready) as sock:
            def make_call():
                ctx = sock.new_context()

                async def call():
                    await ctx.asend(PAYLOAD)
                    await ctx.arecv()
                return call

            return await measure_rr(make_call, settings)


async def trio_tcp_copy(settings, total: int) -> float:
    """MB/s of ``total`` bytes copied from a child process to this one over trio TCP
    on loopback, 64 KiB ``send_all`` writes read by ``receive_some()``: the streaming
    targets' baseline (the same bytes crossing a process boundary, nothing else).
    The best of 3 copies: a moment's noise then lowers no target's bar."""
    import time

    rates = []
    async with child_process(python_child("bench.servers", "tcp-copy", total)) as sender:
        for _ in range(1 if settings.quick else 3):
            received = 0
            async with await trio.open_tcp_stream("127.0.0.1", int(sender.ready)) as stream:
                t0 = time.perf_counter()
                await stream.send_all(b"g")
                with trio.fail_after(60):
                    while data := await stream.receive_some():
                        received += len(data)
                elapsed = time.perf_counter() - t0
            if received != total:
                raise RuntimeError(f"copied {received} bytes, expected {total}")
            rates.append(total / elapsed / 1e6)
    return max(rates)
