"""The two pure sides of the slave protocol: the node's session of a slave (driven with
plain numbers for time) and the slave's own (engine.protocol.slave_session).
fuzz/test_session_pair.py runs them against each other."""
from __future__ import annotations

import pytest

from engine.errors import JobCancelled, ShuttingDown, SlaveDied, SlaveHung
from engine.pool.prefetch import AUTO_PREFETCH_MAX
from engine.protocol.node_session import (PROTOCOL_VERSION, STREAM_WINDOW, Chunk, Failed, Finished, InputCredit,
                             Kill, ProtocolError, Ready, Send, SlaveSession, State, Stopping)
from engine.protocol.messages import invoke_body
from engine.protocol.slave_session import (CancelHandler, CloseInput, EndInput, Exit, Feed, OpenInput, Resume,
                                           Start, WorkerSession)
from engine.protocol.slave_session import ProtocolError as WorkerProtocolError
from engine.protocol.slave_session import State as WorkerState
from transport.codec import Envelope, Kind
from transport.errors import BadMessage, HandlerError, UnknownEvent, body_to_error, error_to_body


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


# -- the slave's side: engine.protocol.slave_session ------------------------------------------

def worker(concurrency=1, events=("echo", "count", "digest")):
    return WorkerSession(concurrency=concurrency, events=events)


def invoke(w, sid, event="echo", payload=None, chunked=False):
    return w.receive(Envelope(Kind.INVOKE, sid, invoke_body(event, payload, chunked)))


def error_of(action):
    assert type(action) is Envelope and action.kind == Kind.ERROR, action
    return body_to_error(action.body)


def test_the_node_accepts_the_workers_handshake():
    w = worker(concurrency=3)
    hello_env = w.hello(pid=42, app="a")
    assert hello_env.kind == Kind.HANDSHAKE and hello_env.body["events"] == ["count", "digest", "echo"]
    assert hello_env.body["window"] == STREAM_WINDOW
    assert session(concurrency=4).receive(hello_env, 0.0) == [Ready(3)]
    assert w.heartbeat() == Envelope(Kind.HEARTBEAT, 0, {"jobs": 0})


def test_worker_starts_an_invoke_and_answers_it_exactly_once():
    w = worker()
    assert invoke(w, 7, "echo", {"x": 1}) == [Start(7, "echo", {"x": 1})]
    assert w.heartbeat().body == {"jobs": 1}
    [reply] = w.result(7, "v")
    assert type(reply) is Envelope and reply == (Kind.RESULT, 7, "v")
    with pytest.raises(WorkerProtocolError, match="answered twice"):
        w.result(7, "again")
    with pytest.raises(WorkerProtocolError):
        w.failed(7, ValueError("late"))
    assert not w.running


def test_worker_answers_a_bad_invoke_instead_of_crashing():
    w = worker()
    for body in (None, "echo", [], ["echo"], [1, 2], ["echo", 1, True, 4], {"event": "echo"}):
        [err] = w.receive(Envelope(Kind.INVOKE, 3, body))
        assert isinstance(error_of(err), BadMessage) and err.sid == 3
    assert not w.running and not w.waiting
    invoke(w, 4)
    [err] = invoke(w, 4)                           # a sid it already holds
    assert isinstance(error_of(err), BadMessage) and "already in use" in error_of(err).message
    assert list(w.running) == [4]


def test_worker_answers_an_unknown_event_when_it_would_start_taking_no_slot():
    w = worker(concurrency=1)
    invoke(w, 1)
    assert invoke(w, 2, "nope") == []               # queued behind job 1, like any other
    assert invoke(w, 3) == []
    reply, unknown, start = w.result(1, None)
    assert reply == (Kind.RESULT, 1, None)
    assert isinstance(error_of(unknown), UnknownEvent) and unknown.sid == 2
    assert "['count', 'digest', 'echo']" in error_of(unknown).message
    assert start == Start(3, "echo", None)


def test_worker_runs_at_most_concurrency_and_starts_prefetched_jobs_in_order():
    w = worker(concurrency=2)
    assert [type(a) for sid in (1, 2) for a in invoke(w, sid)] == [Start, Start]
    assert invoke(w, 3) == [] and invoke(w, 4) == [] and list(w.waiting) == [3, 4]
    assert w.result(2, "b") == [Envelope(Kind.RESULT, 2, "b"), Start(3, "echo", None)]
    assert sorted(w.running) == [1, 3] and list(w.waiting) == [4]
    assert invoke(w, 5) == []                        # a free slot would not jump the queue
    assert w.stream_ended(1) == [Envelope(Kind.CHOKE, 1, None), Start(4, "echo", None)]


def test_worker_cancels_a_waiting_job_at_once_and_a_running_one_through_its_handler():
    w = worker(concurrency=1)
    invoke(w, 1)
    invoke(w, 2)
    [ack] = w.receive(Envelope(Kind.CANCEL, 2, None))   # waiting: answered now
    assert isinstance(error_of(ack), JobCancelled) and ack.sid == 2 and not w.waiting
    assert w.receive(Envelope(Kind.CANCEL, 1, None)) == [CancelHandler(1)]
    assert w.receive(Envelope(Kind.CANCEL, 1, None)) == []    # told once
    [ack] = w.cancelled(1)
    assert isinstance(error_of(ack), JobCancelled) and ack.sid == 1
    assert w.receive(Envelope(Kind.CANCEL, 1, None)) == []    # answered: its reply is on its way
    invoke(w, 3)
    w.receive(Envelope(Kind.CANCEL, 3, None))
    assert w.result(3, "done anyway") == [Envelope(Kind.RESULT, 3, "done anyway")]  # not cancelled twice
    assert not w.cancelling


def test_worker_keeps_a_stream_within_its_window_of_credit():
    w = worker()
    invoke(w, 1, "count")
    for i in range(STREAM_WINDOW):
        assert w.send_window(1) == STREAM_WINDOW - i
        assert w.chunk(1, i) == Envelope(Kind.CHUNK, 1, i)
    assert w.send_window(1) == 0
    with pytest.raises(WorkerProtocolError, match="window"):
        w.chunk(1, "one too many")
    for nonsense in (0, -3, "16", 2.5, None):
        assert w.receive(Envelope(Kind.CREDIT, 1, nonsense)) == []
    assert w.receive(Envelope(Kind.CREDIT, 1, 16)) == [Resume(1)]
    assert w.receive(Envelope(Kind.CREDIT, 1, 16)) == []      # it was not waiting any more
    assert w.send_window(1) == 32
    assert w.receive(Envelope(Kind.CREDIT, 9, 16)) == []      # not a job it runs


def test_worker_terminate_answers_waiting_jobs_then_says_so_and_exits():
    w = worker(concurrency=1)
    invoke(w, 1)
    invoke(w, 2)
    invoke(w, 3, "digest", chunked=True)
    *errors, close, bye, exit_ = w.receive(Envelope(Kind.TERMINATE, 0, None))
    assert [e.sid for e in errors] == [2, 3] and all(isinstance(error_of(e), ShuttingDown) for e in errors)
    assert close == CloseInput(3) and bye == Envelope(Kind.TERMINATE, 0, None) and exit_ == Exit()
    assert w.state is WorkerState.EXITING
    assert invoke(w, 4) == []                          # it reads no more
    assert w.result(1, "x") == [Envelope(Kind.RESULT, 1, "x")]  # a job running meanwhile still answers


def test_worker_holds_a_chunked_requests_input_until_the_job_is_answered():
    w = worker(concurrency=1)
    invoke(w, 1)
    assert invoke(w, 2, "digest", "f", chunked=True) == [OpenInput(2)]   # waits, its chunks may come
    assert w.receive(Envelope(Kind.CHUNK, 2, b"a")) == [Feed(2, b"a")]
    assert w.receive(Envelope(Kind.CHUNK, 9, b"?")) == []              # no such input
    assert w.result(1, None)[1] == Start(2, "digest", "f")
    assert w.grant_input(2, 16) == [Envelope(Kind.CREDIT, 2, 16)]
    assert w.receive(Envelope(Kind.CHOKE, 2, None)) == [EndInput(2)]
    assert w.result(2, "sha") == [Envelope(Kind.RESULT, 2, "sha"), CloseInput(2)]
    assert w.grant_input(2, 16) == [] and w.receive(Envelope(Kind.CHUNK, 2, b"late")) == []


def test_worker_cancelling_a_waiting_chunked_job_drops_its_input():
    w = worker(concurrency=1)
    invoke(w, 1)
    invoke(w, 2, "digest", chunked=True)
    ack, close = w.receive(Envelope(Kind.CANCEL, 2, None))
    assert isinstance(error_of(ack), JobCancelled) and close == CloseInput(2)


def test_worker_sends_nothing_and_starts_nothing_once_the_link_is_gone():
    w = worker(concurrency=1)
    invoke(w, 1, "count")
    invoke(w, 2)
    w.connection_lost()
    assert w.chunk(1, "x") is None
    assert w.result(1, "x") == [] and not w.running and not w.waiting
    assert invoke(w, 3) == []


def test_the_protocol_window_is_the_one_chunked_requests_run_on():
    """A slave reads a chunked request through transport.inbound, whose window and
    credit batch must be the ones its handshake announces."""
    from engine.protocol import messages
    from transport import inbound
    assert (messages.STREAM_WINDOW, messages.CREDIT_BATCH) == (inbound.WINDOW, inbound.CREDIT_BATCH)


def test_a_slave_that_overruns_its_stream_window_is_killed_not_buffered():
    """Any worker, in any language: at most STREAM_WINDOW chunks beyond the credit the
    node granted; one more and the slave is broken (its jobs fail), so a misbehaving
    worker cannot make the node buffer without bound."""
    s = session()
    hello(s)
    s.invoke(1, "a", "count", None)
    for i in range(STREAM_WINDOW):
        assert s.receive(Envelope(Kind.CHUNK, 1, i), 1) == [Chunk("a", i)]
    assert s.grant(1, 16) == [Send(Envelope(Kind.CREDIT, 1, 16))]
    for i in range(16):                                # exactly what the credit allows
        assert s.receive(Envelope(Kind.CHUNK, 1, i), 1) == [Chunk("a", i)]
    kill, failed = s.receive(Envelope(Kind.CHUNK, 1, "one too many"), 1)
    assert isinstance(kill, Kill) and "stream window" in kill.reason
    assert failed.job == "a" and isinstance(failed.error, SlaveDied)
