"""Polling for a message due any moment (transport/_spin.py, transport/_trio_internals.py).

The default suite asserts only what does not depend on how busy the machine is: the
pure policy (a hypothesis state machine), the trio helpers against fakes and a
socketpair, and, end to end, what the caller sees (every call answered, a cancellation
that reaches a polling loop, a Deferred's failing poll counted).  How often polling pays
against a peer in another process depends on the CPUs being free when the answer is
due, so those figures are measured by ``python -m bench.polling`` instead."""
from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import transport._spin
from support import wait_until
from transport import _trio_internals
from transport.errors import Closed, CodecError
from transport.mesh.sealing import FrameSigner
from transport.rpc import Deferred, RpcClient, RpcServer
from transport.streams import MAX_FRAME, frame_header, from_socket, socketpair
from transport._spin import (MAX_SKIP, SPIN_BUDGET, YIELD_EVERY, SpinPolicy, poll_for, poll_next,
                             quiet, spin_until)


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


def test_a_peer_that_never_answers_in_time_gets_a_poll_per_doubling_run_of_chances():
    # A peer in this same process cannot answer while we poll: every poll misses.
    # 300 chances: polls at chances 1, 3, 6, 11, 20, 37, 70, 135, 264.
    p = SpinPolicy()
    polled_at = []
    for chance in range(1, 301):
        if p.allow():
            p.record(False)
            polled_at.append(chance)
    assert polled_at == [1, 3, 6, 11, 20, 37, 70, 135, 264]


def test_polled_runs_yield_at_most_every_yield_every():
    p = SpinPolicy()
    assert p.yield_due(10.0)
    assert not p.yield_due(10.0 + YIELD_EVERY / 2)
    assert p.yield_due(10.0 + YIELD_EVERY)
    assert not p.yield_due(10.0 + YIELD_EVERY * 1.5)


# -- quiet(): trio's run state, read in one place --------------------------------------

async def test_quiet_reads_trios_run_state_directly(mock_clock):
    # quiet() reads trio's runner: the public current_statistics() costs 4-30 us a
    # call (transport/_trio_internals.py).  If a trio upgrade moves what it reads, this
    # says so (instead of the process quietly paying that), and checks the two agree.
    # (MockClock: time stands still, so "a deadline 0.2 s away" stays exactly that.)
    assert _trio_internals.FAST, "trio moved its run queue or deadlines: see _trio_internals"
    assert quiet is _trio_internals.quiet

    def both(budget):
        fast, public = quiet(budget), _trio_internals.quiet_public(budget)
        assert fast == public
        return fast

    for budget in (SPIN_BUDGET, 0.5):
        assert both(budget) is True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            assert both(budget) is False  # a task in the run queue
        with trio.move_on_after(0.2):
            assert both(budget) == (budget < 0.2)


def test_without_trios_internals_quiet_is_the_public_one_and_says_so_once(monkeypatch):
    monkeypatch.setattr(_trio_internals, "_warned", False)
    with pytest.warns(RuntimeWarning, match="current_statistics") as caught:
        first = _trio_internals._select(lambda: (None, "trio._core._run has moved"))
        second = _trio_internals._select(lambda: (None, "trio._core._run has moved"))
    assert first is second is _trio_internals.quiet_public
    assert len(caught) == 1

    async def main():
        await trio.testing.wait_all_tasks_blocked()
        assert first(SPIN_BUDGET) is True  # and it answers like the fast one
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            assert first(SPIN_BUDGET) is False

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        trio.run(main)


def test_a_runner_unlike_the_one_resolved_falls_back_with_one_warning(monkeypatch):
    # Resolved, but the runner met at run time lacks what quiet() reads.
    monkeypatch.setattr(_trio_internals, "_warned", False)
    odd = _trio_internals._select(lambda: (SimpleNamespace(runner=object()), None))
    assert odd is not _trio_internals.quiet_public

    async def main():
        with pytest.warns(RuntimeWarning, match="changed shape") as caught:
            for _ in range(3):  # the public answer, found the public way
                assert odd(SPIN_BUDGET) == _trio_internals.quiet_public(SPIN_BUDGET)
        assert len(caught) == 1

    trio.run(main)
    with pytest.raises(RuntimeError):  # outside a run: an error, like the public one
        odd(SPIN_BUDGET)


@pytest.mark.e2e
def test_a_trio_without_the_internals_warns_once_per_process_and_still_polls():
    # A fresh process whose trio lacks one of the runner fields _trio_internals reads:
    # importing the transport warns once, polling works the public way, and resolving
    # again in that process warns no more.
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        import trio, trio.testing, trio._core._run
        del trio._core._run.Runner.__annotations__["runq"]
        import transport.rpc
        from transport import _trio_internals, _spin
        assert not _trio_internals.FAST and _spin.quiet is _trio_internals.quiet_public
        _trio_internals._select(_trio_internals._resolve)

        async def main():
            await trio.testing.wait_all_tasks_blocked()
            assert _spin.spin_until(_spin.SpinPolicy(budget=1.0), lambda: None, lambda: True)
        trio.run(main)
        print("OK")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr
    assert done.stderr.count("RuntimeWarning") == 1, done.stderr
    assert "trio's Runner has no runq" in done.stderr


# -- the trio helpers ---------------------------------------------------------------------

def test_poll_for_returns_the_first_frames_or_nothing_after_its_budget():
    answers = iter([[], [], [b"a", b"b"]])
    assert poll_for(lambda: next(answers), 1.0) == [b"a", b"b"]
    calls = []
    assert poll_for(lambda: calls.append(1) or [], 0.0) == [] and calls == [1]


async def test_spin_until_steps_until_done_and_records_how_it_ended():
    steps = []
    policy = SpinPolicy(budget=5.0)  # no deadline near in this test: quiet
    assert spin_until(policy, lambda: steps.append(1), lambda: len(steps) == 3)
    assert (policy.polls, policy.hits, len(steps)) == (1, 1, 3)

    def broken():
        raise RuntimeError("the owner's bug")

    with pytest.raises(RuntimeError):  # propagates, and counts as a miss
        spin_until(policy, broken, lambda: False)
    assert (policy.polls, policy.hits, policy.skipping) == (2, 1, 1)
    assert not spin_until(policy, broken, lambda: False)  # that chance is given up


async def test_nobody_polls_while_another_task_is_runnable():
    steps = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
        assert not spin_until(SpinPolicy(budget=5.0), lambda: steps.append(1), lambda: True)
    assert steps == []


async def test_a_run_of_polled_messages_lets_a_cancellation_in_and_loses_nothing():
    # A server loop whose every poll brings the next request never reaches a
    # checkpoint of its own: poll_next yields every YIELD_EVERY, before reading, so a
    # cancellation from outside (a callback trio runs only between task steps, asked
    # for in the middle of the run) gets in, and no polled message is dropped.
    policy = SpinPolicy(budget=5.0)
    token = trio.lowlevel.current_trio_token()
    taken = handed_back = 0

    def poll():
        nonlocal taken
        taken += 1
        if taken == 10:
            token.run_sync_soon(scope.cancel)
        return [b"request"]

    with trio.CancelScope() as scope:
        while handed_back < 10_000_000:  # (never yielding, it would end here instead)
            frames = await poll_next(policy, poll, lambda: True)
            assert frames == [b"request"]  # every poll got its message
            handed_back += 1
    assert scope.cancelled_caught
    assert taken == handed_back > 10


async def test_poll_next_polls_only_when_a_message_is_expected():
    taken = []
    assert await poll_next(SpinPolicy(budget=5.0), lambda: taken.append(1) or [b"x"],
                           lambda: False) == []
    assert await poll_next(None, lambda: taken.append(1) or [b"x"], lambda: True) == []
    assert taken == []


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
            with pytest.raises(Closed, match="peer closed"):
                await fb.recv_many()
    finally:
        fb.close()


async def test_a_socket_error_met_by_a_poll_is_raised_by_recv_many():
    # A socket reports an error once (then only the end of the stream): the poll that
    # met it keeps it for recv_many instead of dropping it.
    a, b = socketpair()
    fb = from_socket(b)
    try:
        with trio.fail_after(5):
            b.send(b"unread")  # a closes with this unread: b gets ECONNRESET
            a.close()
            assert fb.poll_frames() == []
            with pytest.raises(Closed, match="reset"):
                await fb.recv_many()
    finally:
        fb.close()


# -- end to end: what callers see -----------------------------------------------------

SERVER = textwrap.dedent("""
    import sys, trio
    from transport.mesh.sealing import FrameSigner
    from transport.rpc import RpcServer

    guard = FrameSigner(sys.argv[1].encode(), b"rpc") if sys.argv[1:] else None
    server = RpcServer("tcp://127.0.0.1:0", lambda req: req.payload, spin=True, guard=guard)

    async def main():
        async with trio.open_nursery() as nursery:
            print("READY", await nursery.start(server.run), flush=True)

    trio.run(main)
""")


@pytest.fixture(params=[None])
def remote_server(request):
    """A polling echo RpcServer in a child process (its frames signed with the secret
    ``request.param``, if any): (address, secret)."""
    secret = [request.param] if request.param else []
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *secret], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["READY"], line
        yield line[1], request.param
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.e2e
@pytest.mark.parametrize("remote_server", [None, "s3cret"], indirect=True)
async def test_sequential_calls_to_a_polling_peer_are_all_answered(remote_server):
    # Polling or parking (that depends on the machine's load), every call gets its own
    # answer; with a secret too: signed lone frames go out at once like plain ones.
    address, secret = remote_server
    guard = FrameSigner(secret.encode(), b"rpc") if secret else None
    with trio.fail_after(30):
        async with RpcClient(address, timeout=10, guard=guard) as client:
            await client.wait_connected()
            for n in range(500):
                assert await client.call("t", "echo", n) == n
            assert client.pending == 0


@pytest.mark.e2e
async def test_concurrent_callers_to_a_polling_peer_are_all_answered(remote_server):
    # Answers wake many callers at once, and the first to call again must not poll
    # while the rest of its batch waits (how rarely it polls: bench/polling.py).
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
            assert client.pending == 0


@pytest.mark.e2e
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


@pytest.mark.e2e
async def test_a_peer_in_this_process_is_never_polled_into_an_answer(nursery):
    # It cannot answer while we poll: every poll misses and the back-off doubles, so at
    # most the 9 polls of the pure policy's 300 chances (fewer when the process was
    # busy at a chance: an upper bound, true however loaded the machine is).
    server = RpcServer("tcp://127.0.0.1:0", lambda req: req.payload, spin=True)
    await nursery.start(server.run)
    with trio.fail_after(30):
        async with RpcClient(server.address, timeout=10) as client:
            for i in range(300):
                assert await client.call("t", "echo", i) == i
            assert client.spin.hits == 0
            assert client.spin.polls <= 9


@pytest.mark.e2e
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


@pytest.mark.e2e
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


@pytest.mark.e2e
async def test_a_server_polling_a_busy_client_still_stops_when_cancelled():
    # (That a polling loop lets a cancellation in is shown deterministically above;
    # this is the real server with a real client calling as fast as it can.)
    server = RpcServer("tcp://127.0.0.1:0", lambda req: req.payload, spin=True)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            caller = subprocess.Popen([sys.executable, "-c", CALLER, server.address],
                                      stderr=subprocess.DEVNULL)
            try:
                await wait_until(lambda: server.served >= 1000, "the caller is busy",
                                 timeout=30)
                nursery.cancel_scope.cancel()
            finally:
                caller.kill()
                caller.wait(10)


@pytest.mark.e2e
async def test_a_lone_deferred_answer_is_polled_for_and_sent_from_the_reader(nursery,
                                                                          monkeypatch):
    # A budget no scheduling hiccup uses up (nothing else in this test is due within
    # it), so the three polls the answer takes always fit in one.
    monkeypatch.setattr(transport._spin, "SPIN_BUDGET", 1.0)
    polls = []

    def handler(req):
        if req.event == "warm":
            return None
        deferred = Deferred(poll=lambda: polls.append(1) or (len(polls) == 3 and
                                                             deferred.resolve(req.payload)))
        return deferred  # settled only by polling: nothing else ever resolves it

    server = RpcServer("tcp://127.0.0.1:0", handler)
    await nursery.start(server.run)
    with trio.fail_after(20):
        async with RpcClient(server.address, timeout=5, spin=False) as client:
            await client.wait_connected()
            await client.call("t", "warm")
            assert await client.call("t", "echo", "polled") == "polled"
    assert len(polls) == 3 and server.answers_polled == 1


@pytest.mark.e2e
async def test_a_deferreds_failing_poll_costs_only_the_poll_and_is_counted(nursery, caplog):
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
    caplog.set_level(logging.ERROR, logger="transport.rpc.server")
    with trio.fail_after(20):
        async with RpcClient(server.address, timeout=5) as client:
            i = 0
            while len(polls) < 2 and i < 200:  # (a poll is skipped when a tick is due)
                assert await client.call("t", "echo", i) == i  # the connection lives on
                i += 1
    assert len(polls) >= 2  # polled (and failed); the answers came the usual way
    assert server.poll_errors == len(polls)  # each failed poll counted,
    logged = [r for r in caplog.records if r.name == "transport.rpc.server"]
    assert len(logged) == 1 and logged[0].exc_info[0] is RuntimeError  # the first logged


# -- waiting asleep: the kernel wakes the thread when the message lands --------------------

def _cpu_share(run) -> tuple[object, float, float]:
    """(what ``run()`` returned, wall seconds, the share of them this thread ran)."""
    import time
    wall, cpu = time.perf_counter(), time.thread_time()
    out = run()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    return out, wall, cpu / wall


@pytest.mark.e2e
async def test_a_late_answer_is_waited_for_asleep_not_spun_for():
    # A peer slower than the spin (a busy machine): after a short spin the thread
    # sleeps in the kernel on the socket, so it leaves the CPU to whoever must answer;
    # the kernel wakes it when the answer lands.  (Spinning, it would run ~100% of
    # the wait; the bound below is loose on purpose.)
    import threading
    a, b = socketpair()
    fb = from_socket(b)
    got: list[bytes] = []
    try:
        await trio.testing.wait_all_tasks_blocked()
        threading.Timer(0.2, a.sendall, (frame_header(1) + b"x",)).start()
        done, wall, share = _cpu_share(lambda: spin_until(
            SpinPolicy(budget=3.0), lambda: got.extend(fb.poll_frames()), lambda: bool(got),
            fb.fileno()))
        assert done and got == [b"x"]
        assert 0.15 < wall < 2.5
        assert share < 0.5, f"ran {share:.0%} of a {wall:.2f} s wait"
        threading.Timer(0.2, a.sendall, (frame_header(1) + b"y",)).start()
        frames, wall, share = _cpu_share(lambda: poll_for(fb.poll_frames, 3.0, fb.fileno()))
        assert frames == [b"y"] and share < 0.5, f"ran {share:.0%} of a {wall:.2f} s wait"
    finally:
        a.close()
        fb.close()


@pytest.mark.e2e
async def test_a_wait_asleep_gives_way_to_another_tasks_io():
    # Asleep on its own socket, the poll also watches trio's poller: when anything
    # another task waits for is ready, it stops at once and trio runs that task.
    import threading
    a, b = socketpair()
    c, d = socketpair()
    woke = trio.Event()

    async def other_task():
        await trio.lowlevel.wait_readable(d)
        woke.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.testing.wait_all_tasks_blocked()
            threading.Timer(0.1, c.send, (b"!",)).start()
            done, wall, _ = _cpu_share(lambda: spin_until(
                SpinPolicy(budget=5.0), lambda: None, lambda: False, b.fileno()))
            assert not done and wall < 2.5  # not the 5 s budget
            with trio.fail_after(5):
                await woke.wait()
    finally:
        for s in (a, b, c, d):
            s.close()


async def test_without_trios_poller_a_poll_spins_as_before(monkeypatch):
    # A trio whose I/O manager moved (or another OS): no descriptor to sleep on, so
    # the poll spins its budget as it did before it could sleep.
    monkeypatch.setattr(transport._spin, "io_fd", _trio_internals._io_fd_from(None))
    a, b = socketpair()
    fb = from_socket(b)
    try:
        a.sendall(frame_header(1) + b"x")
        got: list[bytes] = []
        assert spin_until(SpinPolicy(budget=1.0), lambda: got.extend(fb.poll_frames()),
                          lambda: bool(got), fb.fileno())
        assert got == [b"x"]
        assert poll_for(lambda: [], 0.001, fb.fileno()) == []
    finally:
        a.close()
        fb.close()


def test_spins_that_miss_give_way_to_sleeping_and_a_spin_now_and_then_finds_out():
    from transport._spin import SPIN_FIRST_MIN
    p = SpinPolicy(budget=150e-6)
    full = p.spin_for()
    assert full > SPIN_FIRST_MIN
    p.record(True, 20e-6)                    # met spinning: learnt
    assert p.typical < SPIN_BUDGET / 4
    learnt = p.typical
    spins = []
    for _ in range(40):                      # a slow peer: every message met asleep
        spins.append(p.spin_for() > SPIN_FIRST_MIN)
        p.record(True, 900e-6, asleep=True)
    assert p.typical == learnt               # a wake-up's wait is not learnt
    assert p.hits == 41 and p.skipping == 0  # hits all: never parked instead
    assert spins[:3] == [True, False, True] and 3 <= sum(spins) <= 7  # 1, 2, 4, 8 … apart
    while p.spin_for() == SPIN_FIRST_MIN:    # the peer is prompt again: the next spin
        p.record(True, 900e-6, asleep=True)  # (no spin: no penalty grows)
    p.record(True, 15e-6)                    # meets it, and spinning resumes
    assert p.spin_for() > SPIN_FIRST_MIN and p.spin_for() > SPIN_FIRST_MIN
