"""Fuzz the flow control of chunked requests (transport/inbound.py): a sender that keeps
to its SendWindow never overruns the receiver's InputStream, every chunk arrives once
and in order, and nothing is buffered beyond the window, whatever the interleaving of
sending, taking and granting."""
from __future__ import annotations

import trio
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from transport.inbound import WINDOW, InputStream, SendWindow


class ChunkedRequestMachine(RuleBasedStateMachine):
    """The sender (SendWindow) and the receiver (InputStream) joined by a link that
    carries CHUNKs one way and CREDITs the other, each possibly delayed."""

    def __init__(self):
        super().__init__()
        self.window = SendWindow()
        self.credits_in_flight: list[int] = []    # CREDITs sent, not yet delivered
        self.chunks_in_flight: list[int] = []     # CHUNKs sent, not yet delivered
        self.stream = InputStream(self.credits_in_flight.append)
        self.sent = 0
        self.taken: list[int] = []

    @precondition(lambda self: self.window.left > 0)
    @rule()
    def send_a_chunk(self):
        self.window.left -= 1
        self.chunks_in_flight.append(self.sent)
        self.sent += 1

    @precondition(lambda self: self.chunks_in_flight)
    @rule(n=st.integers(1, 10))
    def deliver_chunks(self, n):
        for item in self.chunks_in_flight[:n]:
            self.stream.feed(item)
        del self.chunks_in_flight[:n]

    @precondition(lambda self: self.stream._items)
    @rule(n=st.integers(1, 40))
    def handler_takes(self, n):
        async def take():
            for _ in range(min(n, len(self.stream._items))):
                self.taken.append(await self.stream.__anext__())
        trio.run(take)

    @precondition(lambda self: self.credits_in_flight)
    @rule()
    def deliver_credit(self):
        self.window.credit(self.credits_in_flight.pop(0))

    @invariant()
    def a_conforming_sender_is_never_refused(self):
        assert self.stream._error is None

    @invariant()
    def chunks_arrive_once_in_order_and_within_the_window(self):
        assert self.taken == list(range(len(self.taken)))
        assert len(self.stream._items) <= WINDOW
        in_transit = len(self.chunks_in_flight) + len(self.stream._items)
        assert self.window.left + in_transit + sum(self.credits_in_flight) \
            + self.stream._taken == WINDOW


TestChunkedRequestMachine = ChunkedRequestMachine.TestCase
# A state machine run is 60 steps: half the profile's examples (fuzz/conftest.py).
TestChunkedRequestMachine.settings = settings(max_examples=settings.default.max_examples // 2,
                                              stateful_step_count=60, deadline=None)
