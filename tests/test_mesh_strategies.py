"""Balancing strategies (transport/mesh/strategies.py): pure, checked with hypothesis;
then a Requester choosing by them among real Responders on loopback, and requests
directed to a subset or to one Responder (issue #15)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import trio
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from transport import Requester, Responder
from transport.mesh.strategies import (LeastPending, LowestLatency, Random, RoundRobin,
                                       STRATEGIES, strategy)

IDS = st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8, unique=True).map(sorted)


@given(IDS, st.sampled_from(sorted(STRATEGIES)), st.integers(0, 50))
def test_every_strategy_chooses_one_of_the_eligible(ids, name, rounds):
    s = strategy(name)
    for _ in range(rounds):
        rid = s.choose(ids)
        assert rid in ids
        s.sent(rid)
        s.answered(rid, 0.001, True)


@given(IDS)
def test_round_robin_visits_each_in_turn(ids):
    s = RoundRobin()
    assert [s.choose(ids) for _ in range(2 * len(ids))] == ids * 2


class LeastPendingMachine(RuleBasedStateMachine):
    """Whatever is in flight, least-pending chooses a Responder with the fewest."""

    def __init__(self):
        super().__init__()
        self.s = LeastPending()
        self.in_flight: Counter[str] = Counter()
        self.ids = ["a", "b", "c"]

    @rule()
    def send(self):
        rid = self.s.choose(self.ids)
        assert self.in_flight[rid] == min(self.in_flight[i] for i in self.ids)
        self.s.sent(rid)
        self.in_flight[rid] += 1

    @precondition(lambda self: sum(self.in_flight.values()) > 0)
    @rule(data=st.data())
    def answer(self, data):
        rid = data.draw(st.sampled_from(sorted(r for r, n in self.in_flight.items() if n)))
        self.s.answered(rid, 0.01, data.draw(st.booleans()))
        self.in_flight[rid] -= 1

    @invariant()
    def books_agree(self):
        assert {r: n for r, n in self.in_flight.items() if n} == self.s.pending


TestLeastPending = LeastPendingMachine.TestCase
TestLeastPending.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


@given(st.floats(0.0001, 0.01), st.floats(2, 50))
def test_lowest_latency_prefers_the_fast_one_yet_tries_the_slow_one_again(fast, factor):
    s = LowestLatency(rng=random.Random(7), explore=0.05)
    ids = ["fast", "slow"]
    assert s.choose(ids) == "fast"            # never measured: measured first
    s.answered("fast", fast, True)
    assert s.choose(ids) == "slow"
    s.answered("slow", fast * factor, True)
    picks = Counter()
    for _ in range(2000):
        rid = s.choose(ids)
        picks[rid] += 1
        s.answered(rid, fast if rid == "fast" else fast * factor, True)
    assert picks["fast"] > picks["slow"] > 0    # exploration keeps measuring the slow one
    for _ in range(400):                        # the slow one recovered: it gets traffic back
        s.answered("slow", fast / 10, True)
    assert s.choose(ids) == "slow" or s.average["slow"] < s.average["fast"]


def test_a_strategy_is_named_or_given():
    assert isinstance(strategy("random"), Random)
    given_one = LeastPending()
    assert strategy(given_one) is given_one
    with pytest.raises(ValueError, match="least-pending"):
        strategy("fastest")


# -- with real components ---------------------------------------------------------------

def served_by(disco, name, *, delay=0.0, subset=""):
    rep = Responder(name, responds_to=["work"], discovery=disco, subset=subset)

    @rep.on("work")
    async def work(req):
        await trio.sleep(delay)
        return name
    return rep


async def wait_links(rq, n):
    with trio.fail_after(10):
        while sum(1 for link in rq.links.values() if link.client.connected) < n:
            await trio.sleep(0.01)


@pytest.mark.e2e
@pytest.mark.parametrize("balance", ["least-pending", "lowest-latency"])
async def test_a_slow_responder_gets_less_work(disco, balance):
    async with served_by(disco, "fast", delay=0.0), served_by(disco, "slow", delay=0.05), \
            Requester("rq", requests=["work"], discovery=disco, balance=balance) as rq:
        await wait_links(rq, 2)
        answers: list[str] = []

        async def caller():
            for _ in range(15):
                answers.append(await rq.send({"type": "work"}))
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(caller)
    counts = Counter(answers)
    assert len(answers) == 120 and counts["fast"] > 2 * counts["slow"], counts


@pytest.mark.e2e
async def test_requests_directed_to_a_subset_or_one_responder(disco):
    async with served_by(disco, "eu-1", subset="eu"), served_by(disco, "us-1", subset="us"), \
            served_by(disco, "us-2", subset="us"), \
            Requester("rq", requests=["work"], discovery=disco, timeout=5) as rq:
        await wait_links(rq, 3)
        with trio.fail_after(20):
            assert {await rq.send({"type": "work"}, subset="eu") for _ in range(6)} == {"eu-1"}
            assert {await rq.send({"type": "work", "__subset": "us"}) for _ in range(6)} == {
                "us-1", "us-2"}
            us2 = next(link.beacon.id for link in rq.links.values() if link.beacon.name == "us-2")
            assert {await rq.send({"type": "work"}, to=us2) for _ in range(4)} == {"us-2"}

            # a subset nobody serves waits like any request, until one appears
            async with trio.open_nursery() as nursery:
                got = []

                async def ask_asia():
                    got.append(await rq.send({"type": "work"}, subset="asia"))
                nursery.start_soon(ask_asia)
                while rq.outstanding != 1:          # it is queued (nobody can answer it)
                    await trio.sleep(0.01)
                assert got == []
                async with served_by(disco, "asia-1", subset="asia"):
                    while not got:
                        await trio.sleep(0.01)
            assert got == ["asia-1"]


@pytest.mark.e2e
async def test_send_many_honours_a_requests_subset(disco):
    async with served_by(disco, "eu-1", subset="eu"), served_by(disco, "us-1", subset="us"), \
            Requester("rq", requests=["work"], discovery=disco, timeout=5) as rq:
        await wait_links(rq, 2)
        requests = [{"type": "work", "__subset": "eu"} for _ in range(5)] + \
                   [{"type": "work"} for _ in range(5)]
        with trio.fail_after(20):
            answers = [a async for a in rq.send_many(requests, window=4)]
    assert answers[:5] == ["eu-1"] * 5 and set(answers[5:]) <= {"eu-1", "us-1"}
