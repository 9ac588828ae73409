"""Chunked requests: a stream of chunks sent *with* a request, and its flow control.

A request whose body carries a fourth element ``true`` (``REQUEST sid [target, event,
payload, true]``, or ``INVOKE sid [event, payload, true]`` from a node to a slave) is
followed on the same sid by ``CHUNK item``... and ``CHOKE`` from the sender.  The sender
may run :data:`WINDOW` chunks ahead of what the receiver's handler has taken; the
receiver grants more with ``CREDIT n`` as chunks are taken, in batches of
:data:`CREDIT_BATCH` (the same window as streamed replies, docs/protocol.md).

:class:`InputStream` is the receiving end (``async for chunk in stream``);
:class:`SendWindow` is the sender's count of the chunks it may still send.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import trio

from transport.errors import BadMessage, RemoteError

WINDOW = 64        # chunks a sender may run ahead of the receiver's handler
CREDIT_BATCH = 16  # the receiver grants credit in steps of this many taken chunks

_park = trio.lowlevel.wait_task_rescheduled
_reschedule = trio.lowlevel.reschedule


class InputStream:
    """The chunks of one request as they arrive.  ``feed``/``end``/``fail`` come from
    the connection's reader; the handler iterates.  ``grant(n)`` is called to send
    ``CREDIT n`` back to the sender as chunks are taken."""

    __slots__ = ("_items", "_ended", "_error", "_waiter", "_grant", "_taken", "_allowed")

    def __init__(self, grant: Callable[[int], None]) -> None:
        self._items: deque[Any] = deque()
        self._ended = False
        self._error: RemoteError | None = None
        self._waiter: trio.lowlevel.Task | None = None
        self._grant = grant
        self._taken = 0           # taken and not yet granted back
        self._allowed = WINDOW    # chunks the sender may still send

    @property
    def finished(self) -> bool:
        return self._ended or self._error is not None

    def feed(self, item: Any) -> None:
        if self.finished:
            return
        if self._allowed <= 0:  # the sender ignored the window: memory is not unbounded
            self.fail(BadMessage(f"more than {WINDOW} chunks beyond the credit granted"))
            return
        self._allowed -= 1
        self._items.append(item)
        self._wake()

    def end(self) -> None:
        self._ended = True
        self._wake()

    def fail(self, error: RemoteError) -> None:
        if not self.finished:
            self._error = error
            self._items.clear()
            self._wake()

    def _wake(self) -> None:
        task, self._waiter = self._waiter, None
        if task is not None:
            _reschedule(task)

    def __aiter__(self) -> InputStream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            self._waiter = trio.lowlevel.current_task()
            await _park(self._abort)
        item = self._items.popleft()
        self._taken += 1
        if self._taken >= CREDIT_BATCH and not self.finished:
            self._allowed += self._taken
            self._grant(self._taken)
            self._taken = 0
        return item

    def _abort(self, _raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


class SendWindow:
    """How many chunks a sender may still send; ``await wait()`` for room, ``credit(n)``
    when the receiver grants more (a chunked request's sender: an RpcClient, or the
    node forwarding a request's chunks to its slave)."""

    __slots__ = ("left", "_room")

    def __init__(self, size: int = WINDOW) -> None:
        self.left = size
        self._room = trio.Event()

    def credit(self, n: Any) -> None:
        if type(n) is int and n > 0:
            self.left += n
            self._room.set()

    async def wait(self) -> None:
        while self.left <= 0:
            self._room = trio.Event()
            await self._room.wait()
