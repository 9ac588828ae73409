"""Polling for a message due any moment (transport/spin.py): the pure policy as a
hypothesis state machine, its trio helpers, and RpcClient/RpcServer polling against a
server in another process (the only kind that can answer while we poll)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import transport._spin
from transport.errors import Closed, CodecError
from transport.mesh.component import FrameSigner
from transport.rpc import Deferred, RpcClient, RpcServer
from transport.streams import MAX_FRAME, frame_header, from_socket, socketpair
from transport._spin import MAX_SKIP, SPIN_BUDGET, YIELD_EVERY, SpinPolicy, poll_for, quiet


class SpinPolicyMachine(RuleBasedStateMachine):
    """The model: each empty-handed poll in a row doubles the chances given up after
    it (1, 2, 4 … max_skip); a hit ends the back-off at once."""

    def __init__(self):
        super().__init__()
        self.max_skip = 8
        self.p = SpinPolicy(max_skip=self.max_skip)
        self.misses_in_a_row = 0
        self.to_skip = 0
        self.polls = self.hits = 0

    def _chance(self) -> bool:
        allowed = self.p.allow()
        assert allowed == (self.to_skip == 0)
        if not allowed:
            self.to_skip -= 1
        return allowed

    @rule()
    def chance_not_taken(self):
        self._chance()  # e.g. the process was busy: allowed or not, no poll follows

    @rule(hit=st.booleans())
    def poll(self, hit):
        if not self._chance():
            return
        self.p.record(hit)
        self.polls += 1
        if hit:
            self.hits += 1
            self.misses_in_a_row = 0
        else:
            self.misses_in_a_row += 1
            self.to_skip = min(self.max_skip, 2 ** (self.misses_in_a_row - 1))

    @invariant()
    def agrees_with_the_model(self):
        assert self.p.skipping == self.to_skip <= self.max_skip
        assert (self.p.polls, self.p.hits) == (self.polls, self.hits)


TestSpinPolicy = SpinPolicyMachine.TestCase


def test_a_hit_ends_the_back_off_and_misses_cap_at_max_skip():
    p = SpinPolicy()
    for _ in range(40):
        while not p.allow():
            pass
        p.record(False)
    assert p.skipping == MAX_SKIP
    while not p.allow():
        pass
    p.record(True)
    assert p.allow() and p.allow()


def test_polled_runs_yield_at_most_every_yield_every():
    p = SpinPolicy()
    assert p.yield_due(10.0)
    assert not p.yield_due(10.0 + YIELD_EVERY / 2)
    assert p.yield_due(10.0 + YIELD_EVERY)
    assert not p.yield_due(10.0 + YIELD_EVERY * 1.5)


async def test_quiet_only_when_nothing_is_runnable_or_due_soon():
    # quiet() reads trio's runner directly: the public current_statistics() costs
    # 4-30 us a call (transport/spin.py).  If a trio upgrade moves what it reads, this
    # says so instead of quietly paying that, and checks the two agree.
    runner = transport._spin._RUN_CONTEXT.runner
    assert hasattr(runner, "runq") and hasattr(runner, "deadlines")

    def public(budget):
        stats = trio.lowlevel.current_statistics()
        return not stats.tasks_runnable and stats.seconds_to_next_deadline >= budget

    for budget in (SPIN_BUDGET, 0.5):
        assert quiet(budget) == public(budget) is True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            assert quiet(budget) == public(budget) is False
        with trio.move_on_after(0.2):
            assert quiet(budget) == public(budget) == (budget < 0.2)


def test_poll_for_returns_the_first_frames_or_nothing_after_its_budget():
    answers = iter([[], [], [b"a", b"b"]])
    assert poll_for(lambda: next(answers), 1.0) == [b"a", b"b"]
    calls = []
    assert poll_for(lambda: calls.append(1) or [], 0.0) == [] and calls == [1]


async def test_poll_frames_takes_what_is_there_and_leaves_trouble_to_recv_many():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    try:
        with trio.fail_after(5):
            assert fb.poll_frames() == []  # nothing yet, and no waiting for it
            a.sendall(frame_header(5) + b"ab")
            assert fb.poll_frames() == []  # half a frame stays buffered
            a.sendall(b"cde" + frame_header(1) + b"z")
            assert fb.poll_frames() == [b"abcde", b"z"]
            a.sendall(frame_header(MAX_FRAME + 1))
            assert fb.poll_frames() == []  # a bad length: recv_many raises it,
            assert fb.poll_frames() == []  # however often polled before
            with pytest.raises(CodecError):
                await fb.recv_many()
    finally:
        fa.close()
        fb.close()


async def test_poll_frames_leaves_the_end_of_the_stream_to_recv_many():
    a, b = socketpair()
    fa, fb = from_socket(a), from_socket(b)
    try:
        with trio.fail_after(5):
            a.sendall(frame_header(1) + b"x")
            fa.close()
            assert fb.poll_frames() == [b"x"]
            assert fb.poll_frames() == []
            with pytest.raises(Closed):
                await fb.recv_many()
    finally:
        fb.close()


# -- against a server in another process ------------------------------------------

SERVER = textwrap.dedent("""
    import sys, trio
    import transport._spin
    from transport.mesh.component import FrameSigner
    from transport.rpc import RpcServer

    transport._spin.SPIN_BUDGET = LOADED_BUDGET

    def echo(req):  # event "polled": how many requests the server polled for so far
        return server.polled if req.event == "polled" else req.payload

    guard = FrameSigner(sys.argv[1].encode(), b"rpc") if sys.argv[1:] else None
    server = RpcServer("tcp://127.0.0.1:0", echo, spin=True, guard=guard)

    async def main():
        async with trio.open_nursery() as nursery:
            print("READY", await nursery.start(server.run), flush=True)

    trio.run(main)
""")


# Polls that pay need a peer that is running when its message is due.  With the CPUs
# busy with other work (other tests, CI neighbours) a peer waits for its turn for
# milliseconds, the default budget's polls all miss and the policy (rightly) stops
# polling; so the tests that need polls to pay give them this budget.
LOADED_BUDGET = 0.02
SERVER = SERVER.replace("LOADED_BUDGET", repr(LOADED_BUDGET))


@pytest.fixture
def loaded_budget(monkeypatch):
    monkeypatch.setattr(transport._spin, "SPIN_BUDGET", LOADED_BUDGET)


@pytest.fixture(params=[None])
def remote_server(request):
    """A spinning echo RpcServer in a child process (its frames signed with the
    secret ``request.param``, if any): (address, proc)."""
    secret = [request.param] if request.param else []
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *secret], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["READY"], line
        yield line[1], proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("remote_server", [None, "s3cret"], indirect=True)
async def test_sequential_calls_to_a_fast_peer_are_polled_on_both_sides(remote_server,
                                                                      loaded_budget):
    # With a secret too: signed lone frames go out at once like plain ones.
    address, proc = remote_server
    secret = proc.args[3:]
    guard = FrameSigner(secret[0].encode(), b"rpc") if secret else None
    with trio.fail_after(30):
        async with RpcClient(address, timeout=10, guard=guard) as client:
            await client.wait_connected()
            # Real time and a real peer: on a loaded machine messages may come late,
            # so call until polling has paid a few times on both sides.
            polled = 0
            for n in range(20_000):
                assert await client.call("t", "echo", n) == n
                if n % 100 == 99:
                    polled = await client.call("t", "polled")
                    if polled and client.spin.hits >= 20:
                        break
            assert client.spin.hits >= 20, f"{client.spin.polls} polls in {n} calls"
            assert polled > 0, f"the server polled for none of {n} requests"
            assert client.pending == 0


async def test_callers_about_to_run_are_not_kept_waiting_by_a_poll(remote_server):
    # Answers wake many callers at once, and trio runs them as one batch that
    # spin.quiet() cannot see; the first to call again must not poll while the rest
    # of the batch waits to send theirs (that turns a batch into a round trip each).
    address, _ = remote_server
    with trio.fail_after(30):
        async with RpcClient(address, timeout=10) as client:
            await client.wait_connected()

            async def caller(base):
                for i in range(base, base + 100):
                    assert await client.call("t", "echo", i) == i

            async with trio.open_nursery() as nursery:
                for k in range(16):
                    nursery.start_soon(caller, k * 1000)
            assert client.spin.polls <= 16, client.spin.polls  # when truly alone only


async def test_a_run_of_polled_calls_still_lets_other_tasks_io_in(remote_server):
    address, _ = remote_server
    a, b = trio.socket.socketpair()
    woke = trio.Event()

    async def reader(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        await trio.lowlevel.wait_readable(a)
        woke.set()

    with a, b, trio.fail_after(30):
        async with RpcClient(address, timeout=10) as client, trio.open_nursery() as nursery:
            await client.wait_connected()
            for i in range(200):  # polling pays by now (a loaded machine: parks anyway)
                await client.call("t", "echo", i)
            await nursery.start(reader)
            await b.send(b"x")  # readable now; the reader wakes at the next I/O poll,
            calls = 0           # which a caller answered by polling every time skips
            while not woke.is_set() and calls < 20_000:
                await client.call("t", "echo", calls)
                calls += 1
            assert woke.is_set(), f"{client.spin.hits} of {calls} calls polled"


async def test_a_peer_in_this_process_costs_a_few_polls_then_none(nursery):
    # It cannot answer while we poll: every poll misses, and the back-off doubles.
    server = RpcServer("tcp://127.0.0.1:0", lambda req: req.payload, spin=True)
    await nursery.start(server.run)
    with trio.fail_after(30):
        async with RpcClient(server.address, timeout=10) as client:
            for i in range(300):
                assert await client.call("t", "echo", i) == i
            # misses at calls 1, 3, 6, 11, 20, 37, 70, 135, 264 (client.spin may also
            # have been refused by a runnable writer or sweeper now and then)
            assert client.spin.hits == 0
            assert 1 <= client.spin.polls <= 9


async def test_a_cancelled_caller_sends_nothing(nursery):
    served = []
    server = RpcServer("tcp://127.0.0.1:0", lambda req: served.append(req.payload))
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address, timeout=5) as client:
            with trio.CancelScope() as scope:
                scope.cancel()
                await client.call("t", "echo", "never")
            assert await client.call("t", "echo", "after") is None
    assert served == ["after"]


async def test_spin_off_never_polls(remote_server):
    address, _ = remote_server
    with trio.fail_after(30):
        async with RpcClient(address, timeout=10, spin=False) as client:
            await client.wait_connected()
            for i in range(50):
                assert await client.call("t", "echo", i) == i
            assert client.spin is None


CALLER = textwrap.dedent("""
    import sys
    from transport.sync_client import SyncRpcClient

    with SyncRpcClient(sys.argv[1], timeout=5) as client:
        while True:
            client.call("t", "echo", 1)
""")


async def test_a_server_polling_a_busy_client_still_stops_when_cancelled(loaded_budget):
    server = RpcServer("tcp://127.0.0.1:0", lambda req: req.payload, spin=True)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            caller = subprocess.Popen([sys.executable, "-c", CALLER, server.address],
                                      stderr=subprocess.DEVNULL)
            try:
                while server.polled < 500:  # in a run of polled requests now
                    await trio.sleep(0.1)  # (nobody polls with a deadline due within the budget)
                # No deadline is near (the only one is a minute away), so only the
                # server's own periodic yield lets this cancel reach it.
                t0 = trio.current_time()
                nursery.cancel_scope.cancel()
            finally:
                caller.kill()
                caller.wait(10)
    assert trio.current_time() - t0 < 1.0


async def test_a_lone_deferred_answer_is_polled_for_and_sent_from_the_reader(nursery):
    polls = []

    def handler(req):
        deferred = Deferred(poll=lambda: polls.append(1) or (len(polls) == 3 and
                                                             deferred.resolve(req.payload)))
        return deferred  # settled only by polling: nothing else ever resolves it

    server = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address, timeout=5) as client:
            assert await client.call("t", "echo", "polled") == "polled"
    assert len(polls) == 3 and server.answers_polled == 1


async def test_a_deferreds_failing_poll_costs_only_the_poll(nursery):
    waiting, polls = [], []

    def broken_poll():
        polls.append(1)
        raise RuntimeError("the owner's bug")

    def handler(req):
        deferred = Deferred(poll=broken_poll)
        waiting.append((deferred, req.payload))
        return deferred

    async def settle_every_10_ms():  # asleep when a request comes: the server is quiet
        while True:
            await trio.sleep(0.01)
            while waiting:
                deferred, value = waiting.pop()
                deferred.resolve(value)

    nursery.start_soon(settle_every_10_ms)
    server = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(10):
        async with RpcClient(server.address, timeout=5) as client:
            for i in range(5):
                assert await client.call("t", "echo", i) == i  # the connection lives on
    assert polls  # it was polled (and failed), and the answers came the usual way
