"""Each side of the slave protocol alone, fed what a broken or hostile peer might send.

fuzz/test_session_pair.py runs the two pure sessions against each other, each
speaking the protocol correctly.  Here one side at a time gets envelopes of any kind,
any sid and any body (the codec guarantees only ``[int, int, any]``), mixed with
well-formed ones so that jobs exist for the garbage to collide with, while its shell
(modelled as in the pair) does what a shell does.  Whatever arrives:

- the session raises nothing (``ProtocolError`` is for its own shell's mistakes);
- **the slave's side** (``WorkerSession``) answers every INVOKE it took while serving
  exactly once: by its handler's end, by ``bad-message`` (a body of the wrong shape, a
  sid already in use), ``unknown-event``, ``cancelled`` or ``shutting-down``, or, when
  it exits with the handler still running, by the node when it reaps it; it starts only
  events the app has, runs at most ``concurrency`` handlers and queues only when they
  are all busy, and feeds a chunked request's input only while it is open;
- **the node's side** (``SlaveSession``) answers every job it was handed at most once,
  and exactly once by the time the process is reaped; a chunk never follows a job's
  answer; a handshake that is not one is answered with a ``Kill`` (first, before the
  jobs it fails), never a crash; a reply for a sid it does not hold is counted.
"""
from __future__ import annotations

from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.protocol import node_session as N
from engine.protocol import slave_session as W
from engine.protocol.messages import PROTOCOL_VERSION, STREAM_WINDOW, handshake_body
from transport.codec import Envelope, Kind

EVENTS = ["echo", "count", "digest"]
KINDS = [int(k) for k in Kind] + [0, 9, 99, -1, 2**40]
FINAL = {int(Kind.RESULT), int(Kind.CHOKE), int(Kind.ERROR)}
SIDS = st.integers(0, 6) | st.integers(-2**63, 2**64)

bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
invoke_bodies = st.one_of(
    st.tuples(st.sampled_from([*EVENTS, "nope", ""]), bodies).map(list),
    st.tuples(st.sampled_from(EVENTS), bodies, st.sampled_from([True, False, 1, None])).map(list),
    bodies,
)
credit_bodies = st.integers(-3, 100) | st.sampled_from([2**63, 0.5, True, None, "7"])
error_bodies = st.fixed_dictionaries({"code": st.sampled_from(["handler", "cancelled", "x"]) | bodies},
                                     optional={"message": bodies, "type": bodies, "retryable": bodies}) | bodies
handshake_bodies = st.one_of(
    st.builds(lambda c: handshake_body(pid=7, app="a", concurrency=c, events=EVENTS), st.integers(-1, 5)),
    st.fixed_dictionaries({"version": st.sampled_from([PROTOCOL_VERSION, 0, 2, "1", None])},
                          optional={"concurrency": bodies}),
    bodies,
)


def envelopes_to_slave() -> st.SearchStrategy[Envelope]:
    return st.one_of(
        st.builds(Envelope, st.just(int(Kind.INVOKE)), SIDS, invoke_bodies),
        st.builds(Envelope, st.sampled_from([int(Kind.CHUNK), int(Kind.CHOKE), int(Kind.CANCEL)]), SIDS, bodies),
        st.builds(Envelope, st.just(int(Kind.CREDIT)), SIDS, credit_bodies),
        st.builds(Envelope, st.sampled_from(KINDS), SIDS, bodies),
    )


def envelopes_to_node() -> st.SearchStrategy[Envelope]:
    return st.one_of(
        st.builds(Envelope, st.sampled_from([int(Kind.RESULT), int(Kind.CHUNK), int(Kind.CHOKE)]), SIDS, bodies),
        st.builds(Envelope, st.just(int(Kind.ERROR)), SIDS, error_bodies),
        st.builds(Envelope, st.just(int(Kind.CREDIT)), SIDS, credit_bodies),
        st.builds(Envelope, st.just(int(Kind.HANDSHAKE)), st.integers(0, 3), handshake_bodies),
        st.builds(Envelope, st.sampled_from(KINDS), SIDS, bodies),
    )


# -- the slave's side ------------------------------------------------------------------------

class WorkerAlone(RuleBasedStateMachine):
    @initialize(concurrency=st.integers(1, 3))
    def start(self, concurrency: int) -> None:
        self.worker = W.WorkerSession(concurrency=concurrency, events=EVENTS)
        self.concurrency = concurrency
        self.invokes: Counter[int] = Counter()   # INVOKEs read while serving, per sid
        self.replies: Counter[int] = Counter()   # RESULT / CHOKE / ERROR sent, per sid
        self.handlers: set[int] = set()          # running, as the shell sees it
        self.cancel_asked: set[int] = set()
        self.inputs: set[int] = set()            # chunked requests' inputs the shell holds
        self.left_running: set[int] = set()      # handlers still running when it exited
        self.exited = False

    def act(self, actions: list[W.Action]) -> None:
        for a in actions:
            if type(a) is Envelope:
                assert not self.exited, "sent after Exit"
                if a.kind in FINAL:  # (what the node sent never ends a running handler)
                    self.replies[a.sid] += 1
            elif isinstance(a, W.Start):
                assert a.event in EVENTS, f"started {a.event!r}, which the app does not handle"
                assert a.sid not in self.handlers, f"job {a.sid} started twice"
                self.handlers.add(a.sid)
            elif isinstance(a, W.CancelHandler):
                assert a.sid in self.handlers
                self.cancel_asked.add(a.sid)
            elif isinstance(a, W.Resume):
                assert a.sid in self.handlers and self.worker.send_window(a.sid) > 0
            elif isinstance(a, W.OpenInput):
                assert a.sid not in self.inputs
                self.inputs.add(a.sid)
            elif isinstance(a, (W.Feed, W.EndInput)):
                assert a.sid in self.inputs, f"input of job {a.sid} fed while not open"
            elif isinstance(a, W.CloseInput):
                self.inputs.remove(a.sid)
            elif isinstance(a, W.Exit):
                self.exited = True
                self.left_running = set(self.handlers)

    @rule(env=envelopes_to_slave())
    def node_sends(self, env: Envelope) -> None:
        serving = self.worker.state is W.State.SERVING
        actions = self.worker.receive(env)
        if serving and env.kind == Kind.INVOKE:
            self.invokes[env.sid] += 1
        if not serving:
            assert actions == [], "a slave that stopped serving acted on an envelope"
        self.act(actions)

    @precondition(lambda self: self.handlers and not self.exited)
    @rule(data=st.data(), how=st.sampled_from(["result", "failed", "stream_ended", "cancelled"]))
    def handler_ends(self, data: st.DataObject, how: str) -> None:
        sid = data.draw(st.sampled_from(sorted(self.handlers)))
        if how == "cancelled" and sid not in self.cancel_asked:
            how = "result"
        self.handlers.remove(sid)  # before its end is reported: that may start the next
        self.cancel_asked.discard(sid)
        if how == "result":
            self.act(self.worker.result(sid, None))
        elif how == "failed":
            self.act(self.worker.failed(sid, ValueError("no")))
        elif how == "stream_ended":
            self.act(self.worker.stream_ended(sid))
        else:
            self.act(self.worker.cancelled(sid))

    @precondition(lambda self: any(self.worker.send_window(s) > 0 for s in self.handlers) and not self.exited)
    @rule(data=st.data())
    def handler_yields(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(s for s in self.handlers if self.worker.send_window(s) > 0)))
        assert self.worker.chunk(sid, "c") is not None

    @precondition(lambda self: self.inputs and not self.exited)
    @rule(data=st.data(), n=st.integers(-1, 20))
    def handler_takes_input(self, data: st.DataObject, n: int) -> None:
        self.act(self.worker.grant_input(data.draw(st.sampled_from(sorted(self.inputs))), n))

    @invariant()
    def slots_are_respected(self) -> None:
        if not self.exited:
            assert set(self.worker.running) == self.handlers
            assert len(self.worker.running) <= self.concurrency
            if self.worker.waiting:
                assert len(self.worker.running) == self.concurrency, "a job waits while a slot is free"

    @invariant()
    def no_invoke_is_answered_twice(self) -> None:
        twice = {sid: n for sid, n in self.replies.items() if n > self.invokes[sid]}
        assert not twice, f"more answers than INVOKEs: {twice} (INVOKEs {dict(self.invokes)})"

    def teardown(self) -> None:
        """Every handler still running ends (as the shell lets it), then: exactly one
        answer per INVOKE, from the slave or, for what it left running, its reaper."""
        if not hasattr(self, "worker"):
            return
        for _ in range(1000):
            if self.exited or not self.handlers:
                break
            sid = min(self.handlers)
            self.handlers.remove(sid)
            self.act(self.worker.result(sid, None))
        assert self.exited or not self.worker.waiting, "jobs left waiting with every slot free"
        for sid, n in self.invokes.items():
            answered = self.replies[sid] + (1 if sid in self.left_running else 0)
            assert answered == n, f"job {sid}: {n} INVOKE(s), {answered} answer(s)"


TestWorkerAlone = WorkerAlone.TestCase
TestWorkerAlone.settings = settings(max_examples=settings.default.max_examples // 2,
                                    stateful_step_count=40, deadline=None)


# -- the node's side -------------------------------------------------------------------------

class NodeAlone(RuleBasedStateMachine):
    @initialize(concurrency=st.integers(1, 3), prefetch=st.integers(0, 2), handshake=st.booleans())
    def start(self, concurrency: int, prefetch: int, handshake: bool) -> None:
        self.now = 0.0
        self.session = N.SlaveSession(pid=7, now=0.0, startup_timeout=10.0, heartbeat_timeout=5.0,
                                      termination_timeout=3.0, concurrency=concurrency, prefetch=prefetch)
        self.next_job = 1
        self.answers: Counter[int] = Counter()
        self.handed: set[int] = set()
        if handshake:  # usually it starts well: jobs exist for the garbage to hit
            self.act(self.session.receive(Envelope(Kind.HANDSHAKE, 0, handshake_body(
                pid=7, app="a", concurrency=concurrency, events=EVENTS)), 0.0))

    def act(self, actions: list[N.Action]) -> None:
        # The session fails jobs itself only as it kills the slave (the Kill first, so
        # the shell stops handing it jobs before they fail) or once it is reaped.
        if any(isinstance(a, N.Kill) or (isinstance(a, N.Failed) and not a.from_slave) for a in actions):
            assert isinstance(actions[0], N.Kill) or self.session.state is N.State.DEAD, actions
        for a in actions:
            if isinstance(a, (N.Finished, N.Failed)):
                self.answers[a.job] += 1
                assert a.job in self.handed
            elif isinstance(a, N.Chunk):
                assert self.answers[a.job] == 0, f"a chunk of job {a.job} after its answer"
            elif isinstance(a, N.InputCredit):
                assert a.job in self.session.jobs.values() and type(a.chunks) is int and a.chunks > 0

    @rule(env=envelopes_to_node(), dt=st.sampled_from([0.0, 0.5, 4.0]))
    def slave_sends(self, env: Envelope, dt: float) -> None:
        self.now += dt
        state = self.session.state
        actions = self.session.receive(env, self.now)
        if env.kind == Kind.HANDSHAKE and state is N.State.SPAWNING and self.session.state is not N.State.READY:
            assert isinstance(actions[0], N.Kill), f"a bad handshake got {actions}, not a Kill"
        self.act(actions)

    @precondition(lambda self: self.session.free > 0)
    @rule(chunked=st.booleans(), event=st.sampled_from(EVENTS))
    def pool_hands_a_job(self, chunked: bool, event: str) -> None:
        job, self.next_job = self.next_job, self.next_job + 1
        self.handed.add(job)
        self.act(self.session.invoke(job, job, event, None, chunked=chunked))  # sid = job

    @precondition(lambda self: self.session.jobs)
    @rule(data=st.data(), grant=st.integers(-1, 20))
    def pool_cancels_or_grants(self, data: st.DataObject, grant: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.session.jobs)))
        self.act(self.session.cancel(sid, self.now) if grant < 0 else self.session.grant(sid, grant))

    @rule(dt=st.floats(0.0, 12.0))
    def clock_moves(self, dt: float) -> None:
        self.now += dt
        self.act(self.session.tick(self.now))

    @rule(what=st.sampled_from(["terminate", "kill"]))
    def pool_stops_it(self, what: str) -> None:
        self.act(self.session.terminate(self.now) if what == "terminate" else self.session.kill("test"))

    @invariant()
    def every_job_is_answered_at_most_once(self) -> None:
        assert not [job for job, n in self.answers.items() if n > 1]
        assert len(self.session.jobs) <= self.session.capacity
        held = set(self.session.jobs.values())
        assert not [job for job in held if self.answers[job]], "a job answered and still held"

    def teardown(self) -> None:
        if not hasattr(self, "session"):
            return
        self.act(self.session.exited(-9))
        assert self.session.state is N.State.DEAD and not self.session.jobs
        unanswered = sorted(job for job in self.handed if self.answers[job] != 1)
        assert not unanswered, f"jobs not answered exactly once when the slave was reaped: {unanswered}"


TestNodeAlone = NodeAlone.TestCase
TestNodeAlone.settings = settings(max_examples=settings.default.max_examples // 2,
                                  stateful_step_count=40, deadline=None)
