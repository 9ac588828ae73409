"""The node-side slave session state machine, driven with plain numbers for time."""
from __future__ import annotations

import pytest

from engine.errors import JobCancelled, ShuttingDown, SlaveDied, SlaveHung
from engine.pool.prefetch import AUTO_PREFETCH_MAX
from engine.protocol.node_session import (PROTOCOL_VERSION, STREAM_WINDOW, Chunk, Failed, Finished, InputCredit,
                             Kill, ProtocolError, Ready, Send, SlaveSession, State, Stopping)
from transport.codec import Envelope, Kind
from transport.errors import HandlerError, error_to_body


def session(now=0.0, **kw):
    kw = dict(pid=42, now=now, startup_timeout=5, heartbeat_timeout=3, termination_timeout=2,
              concurrency=2) | kw
    return SlaveSession(**kw)


def hello(s, now=0.0, concurrency=2):
    return s.receive(Envelope(Kind.HANDSHAKE, 0, {"version": PROTOCOL_VERSION, "pid": 42,
                                                  "concurrency": concurrency}), now)


def test_handshake_then_invoke_and_single_result():
    s = session()
    assert s.free == 0 and s.state is State.SPAWNING
    assert hello(s) == [Ready(2)]
    assert s.state is State.READY and s.free == 2
    assert s.invoke(7, "job7", "echo", {"x": 1}) == [Send(Envelope(Kind.INVOKE, 7, ["echo", {"x": 1}]))]
    assert s.free == 1
    assert s.receive(Envelope(Kind.RESULT, 7, "v"), 1.0) == [Finished("job7", "v", streamed=False)]
    assert s.free == 2 and not s.jobs


def test_stream_chunks_then_choke_and_errors_end_a_job():
    s = session()
    hello(s)
    s.invoke(1, "a", "count", None)
    s.invoke(2, "b", "boom", None)
    with pytest.raises(ProtocolError):
        s.invoke(3, "c", "x", None)  # concurrency 2 reached
    assert s.receive(Envelope(Kind.CHUNK, 1, 0), 1) == [Chunk("a", 0)]
    assert s.receive(Envelope(Kind.CHUNK, 1, 1), 1) == [Chunk("a", 1)]
    assert s.receive(Envelope(Kind.CHOKE, 1, None), 1) == [Finished("a", None, streamed=True)]
    [failed] = s.receive(Envelope(Kind.ERROR, 2, error_to_body(ValueError("no"))), 1)
    assert failed.job == "b" and isinstance(failed.error, HandlerError)
    assert failed.error.type == "ValueError" and failed.error.message == "no"
    assert s.receive(Envelope(Kind.RESULT, 99, "late"), 1) == [] and s.unknown_sids == 1


def test_handshake_may_lower_but_not_raise_concurrency_and_bad_handshake_kills():
    s = session(concurrency=4)
    assert hello(s, concurrency=1) == [Ready(1)]
    s = session(concurrency=1)
    assert hello(s, concurrency=8) == [Ready(1)]
    s = session()
    actions = s.receive(Envelope(Kind.HANDSHAKE, 0, {"version": 999}), 0)
    assert isinstance(actions[0], Kill) and s.state is State.KILLING


def test_startup_deadline_kills_a_silent_slave():
    s = session(now=10.0)
    assert s.next_deadline() == 15.0
    assert s.tick(14.9) == []
    [kill] = s.tick(15.0)
    assert isinstance(kill, Kill) and "startup-timeout" in kill.reason
    assert s.exited(-9)[:0] == [] and s.state is State.DEAD and not s.handshaked


def test_missed_heartbeats_kill_and_fail_jobs_with_slave_hung():
    s = session()
    hello(s, now=1.0)
    s.invoke(1, "a", "spin", None)
    s.receive(Envelope(Kind.HEARTBEAT, 0, None), 2.0)  # any message proves it alive
    assert s.next_deadline() == 5.0
    assert s.tick(4.99) == []
    kill, failed = s.tick(5.0)
    assert isinstance(kill, Kill) and "heartbeat" in kill.reason
    assert failed.job == "a" and isinstance(failed.error, SlaveHung)
    assert "heartbeat" in failed.error.message
    # the reaped exit fails nothing twice
    assert s.exited(-9) == [] and s.state is State.DEAD
    assert s.receive(Envelope(Kind.RESULT, 1, "too late"), 6.0) == []


def test_exit_fails_held_jobs_with_slave_died_naming_the_signal():
    s = session()
    hello(s)
    s.invoke(1, "a", "x", None)
    s.invoke(2, "b", "x", None)
    failed = s.exited(-11)
    assert [f.job for f in failed] == ["a", "b"]
    assert all(isinstance(f.error, SlaveDied) and "SIGSEGV" in f.error.message for f in failed)
    assert failed[0].error is not failed[1].error
    assert s.exited(0) == []  # once only


def test_terminate_then_termination_deadline():
    s = session()
    assert isinstance(s.terminate(0)[0], Kill)  # not handshaked: cannot read TERMINATE
    s = session()
    hello(s)
    assert s.terminate(1.0) == [Send(Envelope(Kind.TERMINATE, 0, None))]
    assert s.free == 0 and s.terminate(1.5) == []
    assert s.next_deadline() == 3.0
    assert s.tick(2.9) == []
    assert isinstance(s.tick(3.0)[0], Kill)


def test_slave_announcing_exit_stops_taking_jobs_and_startup_error_is_kept():
    s = session()
    hello(s)
    assert s.receive(Envelope(Kind.TERMINATE, 0, None), 1.0) == [Stopping()]
    assert s.free == 0
    s = session()
    s.receive(Envelope(Kind.ERROR, 0, error_to_body(ImportError("no module x"))), 0.5)
    assert s.startup_error.type == "ImportError" and "no module x" in str(s.startup_error)


def test_kill_with_a_chosen_error_type():
    s = session()
    hello(s)
    s.invoke(1, "a", "x", None)
    kill, failed = s.kill("drain timeout", ShuttingDown)
    assert isinstance(kill, Kill) and isinstance(failed.error, ShuttingDown)
    assert s.kill("again") == []


def test_cancel_sends_once_drops_late_chunks_and_frees_on_acknowledgement():
    s = session()
    hello(s)
    s.invoke(1, "a", "count", None)
    s.invoke(2, "b", "count", None)
    assert s.cancel(1, 1.0) == [Send(Envelope(Kind.CANCEL, 1, None))]
    assert s.cancel(1, 1.1) == [] and s.cancel(99, 1.1) == []
    assert s.free == 0                      # the slot stays taken until the slave says so
    assert s.receive(Envelope(Kind.CHUNK, 1, "late"), 1.2) == []  # the caller left
    assert s.receive(Envelope(Kind.CHUNK, 2, "x"), 1.2) == [Chunk("b", "x")]
    assert s.grant(1, 16) == []             # no credit for a cancelled stream
    assert s.grant(2, 16) == [Send(Envelope(Kind.CREDIT, 2, 16))]
    [ack] = s.receive(Envelope(Kind.ERROR, 1, error_to_body(JobCancelled("x"))), 1.3)
    assert ack.job == "a" and isinstance(ack.error, JobCancelled)
    assert s.free == 1 and not s.cancelling
    assert s.grant(1, 16) == []             # finished: nothing to grant


def test_cancel_not_acknowledged_within_termination_timeout_kills_the_slave():
    s = session(termination_timeout=2, heartbeat_timeout=30)
    hello(s)
    s.invoke(1, "a", "stubborn", None)
    s.invoke(2, "b", "other", None)
    s.cancel(1, 10.0)
    assert s.next_deadline() == 12.0
    s.receive(Envelope(Kind.HEARTBEAT, 0, None), 11.5)  # alive, but job 1 goes on
    assert s.tick(11.9) == []
    kill, *failed = s.tick(12.0)
    assert isinstance(kill, Kill) and "CANCEL" in kill.reason
    assert {f.job for f in failed} == {"a", "b"} and not s.cancelling


def test_prefetch_lets_the_session_hand_over_jobs_beyond_concurrency():
    s = session(concurrency=1, prefetch=2)
    assert hello(s, concurrency=1) == [Ready(1)]
    assert s.capacity == 3 and s.free == 3
    for sid in (1, 2, 3):
        s.invoke(sid, f"j{sid}", "echo", sid)
    assert s.free == 0
    with pytest.raises(ProtocolError, match="3/3"):
        s.invoke(4, "j4", "echo", 4)
    assert s.cancel(3, 1.0) == [Send(Envelope(Kind.CANCEL, 3, None))]  # prefetched: cancellable
    [failed] = s.receive(Envelope(Kind.ERROR, 3, error_to_body(JobCancelled("before it started"))), 1.1)
    assert failed.job == "j3" and isinstance(failed.error, JobCancelled) and s.free == 1
    assert s.receive(Envelope(Kind.RESULT, 1, 1), 1.2) == [Finished("j1", 1)]
    assert [f.job for f in s.exited(-9)] == ["j2"]  # held jobs fail with the slave, prefetched too


def test_the_session_allows_the_deepest_prefetch_the_policy_may_use():
    s = session(concurrency=1, prefetch=AUTO_PREFETCH_MAX)  # what the pool passes in auto mode
    hello(s, concurrency=1)
    assert s.capacity == 1 + AUTO_PREFETCH_MAX
    for sid in range(1, 2 + AUTO_PREFETCH_MAX):
        s.invoke(sid, sid, "echo", None)
    with pytest.raises(ProtocolError, match="17/17"):
        s.invoke(99, 99, "echo", None)


def test_failed_says_whether_the_slave_itself_answered():
    s = session()
    hello(s)
    s.invoke(1, "a", "boom", None)
    s.invoke(2, "b", "echo", None)
    [failed] = s.receive(Envelope(Kind.ERROR, 1, error_to_body(ValueError("no"))), 1.0)
    assert failed.from_slave                    # a reply: it says how long the job took
    [died] = s.exited(-9)
    assert died.job == "b" and not died.from_slave and isinstance(died.error, SlaveDied)
    s = session()
    hello(s)
    s.invoke(1, "a", "spin", None)
    kill, hung = s.tick(10.0)                   # heartbeat missed: failed by the session
    assert isinstance(kill, Kill) and not hung.from_slave


def test_credit_from_the_slave_lets_the_node_send_more_of_a_chunked_request():
    s = session(concurrency=1)
    s.receive(Envelope(Kind.HANDSHAKE, 0, {"version": 1, "concurrency": 1}), 0.0)
    assert s.invoke(5, "j5", "digest", "f", chunked=True) == [
        Send(Envelope(Kind.INVOKE, 5, ["digest", "f", True]))]
    assert s.receive(Envelope(Kind.CREDIT, 5, 16), 0.1) == [InputCredit("j5", 16)]
    assert s.receive(Envelope(Kind.CREDIT, 9, 16), 0.1) == []    # not a job it holds
    assert s.receive(Envelope(Kind.CREDIT, 5, -1), 0.1) == []    # nonsense is ignored
