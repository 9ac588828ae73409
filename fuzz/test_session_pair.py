"""The two pure sides of the slave protocol run against each other: the node's
``SlaveSession`` (engine/protocol/node_session.py) and the slave's ``WorkerSession``
(engine/protocol/slave_session.py), joined by a lossless in-memory pipe (a deque of
envelopes each way, delivered one at a time, in order).

Around them this machine plays what their trio shells would do: the pool submits jobs
(plain, streamed, chunked, of an event the app lacks), cancels them, consumes streamed
chunks and grants CREDIT, forwards a chunked request's chunks within the slave's
credit, terminates the slave; the app's handlers return, stream, raise, take input, or
stop after a CANCEL; heartbeats flow and the clock moves, so the node may also kill a
slave that looks hung.

Invariants: no job is answered twice, by the node's session or on the wire; the slave
never runs more than its concurrency nor queues more than the prefetch; a stream never
runs beyond its window of credit, nor a chunked request beyond the slave's; no reply
reaches the node for a job it does not hold; and when the run ends (terminate, drain,
reap) every job handed to the slave has been answered exactly once, and a slave told to
TERMINATE has answered everything it had not started before it exits.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Hashable

from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.protocol import node_session as N
from engine.protocol import slave_session as W
from engine.protocol.messages import CREDIT_BATCH, STREAM_WINDOW
from transport.codec import Envelope, Kind

EVENTS = ["echo", "sleep", "count", "digest"]  # the app's; "nope" is not one of them
INLINE = "echo"     # a plain sync handler: the shell runs it inline, answered at Start
STREAM = "count"    # a generator: streams chunks, then CHOKE
CHUNKED = "digest"  # reads a chunked request
STREAM_LENGTH = 2 * STREAM_WINDOW + 3  # chunks a stream yields when left to run to its end
HEARTBEAT_TIMEOUT = 10.0
TERMINATION_TIMEOUT = 5.0
FINAL = {int(Kind.RESULT), int(Kind.CHOKE), int(Kind.ERROR)}
# a burst of jobs: (event, chunks its request will send if it is a chunked one)
# envelopes delivered by one step, each acted on before the next: few, or a stream's worth
DELIVERIES = st.one_of(st.integers(1, 4), st.integers(5, 2 * STREAM_WINDOW))
JOBS = st.lists(st.tuples(st.sampled_from(["echo", "sleep", "count", "digest", "nope"]),
                          st.integers(0, STREAM_WINDOW + 10)), min_size=1, max_size=6)


def sid_of(job: Hashable) -> int:
    """The pool's job for the node's session: here, its sid."""
    assert isinstance(job, int)
    return job


@dataclass
class Handler:
    """A handler running in the slave (as far as the model of its shell knows)."""
    event: str
    cancel_requested: bool = False


@dataclass
class Input:
    """A chunked request's input, as the slave's InputStream keeps it."""
    items: deque[int] = field(default_factory=deque)
    allowed: int = STREAM_WINDOW   # chunks the node may still send
    taken: int = 0                 # taken and not yet granted back
    ended: bool = False


@dataclass
class Upload:
    """The node's side of a chunked request: what it may and will still send."""
    total: int
    sent: int = 0
    credit: int = STREAM_WINDOW
    choked: bool = False


class SessionPair(RuleBasedStateMachine):
    @initialize(concurrency=st.integers(1, 3), prefetch=st.integers(0, 3), first=JOBS)
    def start(self, concurrency: int, prefetch: int, first: list[tuple[str, int]]) -> None:
        self.now = 0.0
        self.node = N.SlaveSession(pid=7, now=0.0, startup_timeout=10.0, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                                   termination_timeout=TERMINATION_TIMEOUT, concurrency=concurrency,
                                   prefetch=prefetch)
        self.prefetch = prefetch
        self.worker = W.WorkerSession(concurrency=concurrency, events=EVENTS)
        self.to_slave: deque[Envelope] = deque()
        self.to_node: deque[Envelope] = deque([self.worker.hello(pid=7, app="app")])
        self.slave_alive = True       # the process: False once it exited or was killed
        self.slave_exit_code: int | None = None
        self.next_sid = 1
        self.invoked: set[int] = set()
        self.answers: Counter[int] = Counter()         # node side: Finished / Failed per job
        self.replies: Counter[int] = Counter()         # on the wire: RESULT / CHOKE / ERROR per sid
        self.handlers: dict[int, Handler] = {}
        self.inputs: dict[int, Input] = {}
        self.uploads: dict[int, Upload] = {}
        self.chunks_sent: Counter[int] = Counter()     # CHUNKs of a stream the slave sent
        self.credit_delivered: Counter[int] = Counter()  # CREDIT the slave has read
        self.buffered: dict[int, deque[object]] = {}   # chunks the node's job holds, unconsumed
        self.consumed: Counter[int] = Counter()        # taken by the job's consumer, not yet granted
        self.reached_slave: set[int] = set()   # jobs whose INVOKE the slave read
        self.unanswered_at_exit: list[int] | None = None
        self.last_heartbeat = 0.0
        self.most_waiting = 0
        self.window_used_up = False
        self.deliver_to_node()  # the handshake: what comes before it is test_protocol's
        assert self.node.state is N.State.READY
        self.submit(first)

    # -- the node's shell ------------------------------------------------------------
    def node_act(self, actions: list[N.Action]) -> None:
        for a in actions:
            if isinstance(a, N.Send):
                if self.slave_alive and self.slave_exit_code is None:
                    self.to_slave.append(a.envelope)
            elif isinstance(a, N.Kill):
                event(f"the node killed the slave: {a.reason.split(' ')[0]}")
                self.slave_alive = False     # SIGKILL: whatever was in flight is gone
                self.slave_exit_code = -9
                self.to_slave.clear()
                self.to_node.clear()
            elif isinstance(a, N.Chunk):
                job = sid_of(a.job)
                assert self.answers[job] == 0, f"chunk for job {job}, already answered"
                self.buffered.setdefault(job, deque()).append(a.value)
            elif isinstance(a, (N.Finished, N.Failed)):
                job = sid_of(a.job)
                self.answers[job] += 1
                self.buffered.pop(job, None)
                self.uploads.pop(job, None)
            elif isinstance(a, N.InputCredit):
                upload = self.uploads.get(sid_of(a.job))
                if upload is not None:
                    upload.credit += a.chunks

    # -- the slave's shell -----------------------------------------------------------
    def slave_act(self, actions: list[W.Action]) -> None:
        for a in actions:  # a list iterator sees what an inline job's end appends
            if type(a) is Envelope:
                self.to_node.append(a)
                if a.kind == Kind.ERROR and a.sid:
                    event(f"the slave answered ERROR {a.body['code']}"
                          f"{' to a job it never started' if a.sid not in self.handlers else ''}")
                if a.kind in FINAL and a.sid:
                    self.replies[a.sid] += 1
                    self.handlers.pop(a.sid, None)
                elif a.kind == Kind.CHUNK:
                    self.chunks_sent[a.sid] += 1
            elif isinstance(a, W.Start):
                assert a.sid not in self.handlers
                self.handlers[a.sid] = Handler(a.event)
                if a.event == CHUNKED:
                    assert a.sid in self.inputs, "a chunked job started without its input"
                if a.event == INLINE:  # runs to its end before the next envelope is read
                    actions += self.worker.result(a.sid, a.payload)
            elif isinstance(a, W.CancelHandler):
                self.handlers[a.sid].cancel_requested = True
            elif isinstance(a, W.Resume):
                event("a stream that used up its window was resumed")
                assert self.worker.send_window(a.sid) > 0
            elif isinstance(a, W.OpenInput):
                assert a.sid not in self.inputs
                self.inputs[a.sid] = Input()
            elif isinstance(a, W.Feed):
                stream = self.inputs[a.sid]
                assert stream.allowed > 0, f"the node sent job {a.sid} chunks beyond the slave's credit"
                if not stream.ended:
                    stream.allowed -= 1
                    stream.items.append(a.item)
            elif isinstance(a, W.EndInput):
                self.inputs[a.sid].ended = True
            elif isinstance(a, W.CloseInput):
                del self.inputs[a.sid]
            elif isinstance(a, W.Exit):
                event(f"the slave exited with {len(self.handlers)} handler(s) running")
                self.unanswered_at_exit = sorted(sid for sid in self.reached_slave
                                                 if not self.replies[sid] and sid not in self.handlers)
                self.slave_exit_code = 0   # it stops reading; what it sent still arrives

    @property
    def slave_reading(self) -> bool:
        return self.slave_alive and self.slave_exit_code is None

    def running(self, *, event: str | None = None) -> list[int]:
        if not self.slave_reading:
            return []
        return sorted(sid for sid, h in self.handlers.items() if event is None or h.event == event)

    # -- rules: the pool -------------------------------------------------------------
    @precondition(lambda self: self.node.state is N.State.READY and self.node.free > 0)
    @rule(jobs=JOBS)
    def submit(self, jobs: list[tuple[str, int]]) -> None:
        """The pool hands the slave jobs, as many as it has room for (a burst fills the
        prefetch); ``upload``: the chunks a chunked request will send."""
        for event_name, upload in jobs[:self.node.free]:
            sid, self.next_sid = self.next_sid, self.next_sid + 1
            chunked = event_name == CHUNKED
            if chunked:
                self.uploads[sid] = Upload(upload)
            self.invoked.add(sid)
            self.node_act(self.node.invoke(sid, sid, event_name, sid, chunked=chunked))

    @precondition(lambda self: any(s not in self.node.cancelling for s in self.node.jobs))
    @rule(data=st.data())
    def node_cancels(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(s for s in self.node.jobs if s not in self.node.cancelling)))
        self.node_act(self.node.cancel(sid, self.now))

    @precondition(lambda self: any(self.buffered.values()))
    @rule(data=st.data(), n=st.integers(1, STREAM_WINDOW))
    def consumer_takes_chunks(self, data: st.DataObject, n: int) -> None:
        """A job's consumer takes chunks; the pool grants CREDIT in CREDIT_BATCH steps."""
        self.consume(data.draw(st.sampled_from(sorted(s for s, b in self.buffered.items() if b))), n)

    def consume(self, sid: int, n: int) -> None:
        buffered = self.buffered[sid]
        for _ in range(min(n, len(buffered))):
            buffered.popleft()
            self.consumed[sid] += 1
            if self.consumed[sid] >= CREDIT_BATCH:
                self.node_act(self.node.grant(sid, self.consumed[sid]))
                self.consumed[sid] = 0

    @precondition(lambda self: any(u.credit > 0 and not u.choked for u in self.uploads.values()))
    @rule(data=st.data(), n=st.integers(1, 20))
    def node_forwards_request_chunks(self, data: st.DataObject, n: int) -> None:
        """The pool forwards a chunked request's chunks as the slave's CREDIT allows."""
        self.forward_upload(data.draw(st.sampled_from(sorted(s for s, u in self.uploads.items()
                                                             if u.credit > 0 and not u.choked))), n)

    def forward_upload(self, sid: int, n: int) -> None:
        upload = self.uploads[sid]
        if sid in self.node.cancelling or not self.slave_reading:
            return
        for _ in range(n):
            if upload.sent == upload.total:
                upload.choked = True
                self.to_slave.append(Envelope(Kind.CHOKE, sid, None))
                return
            if upload.credit == 0:
                return
            upload.credit -= 1
            self.to_slave.append(Envelope(Kind.CHUNK, sid, upload.sent))
            upload.sent += 1

    @precondition(lambda self: self.node.state is N.State.READY)
    @rule(really=st.integers(0, 3))
    def node_terminates(self, really: int) -> None:
        """Retirement or shutdown; rarer than the rest (1 in 4), as it ends the run."""
        if really == 0:
            self.node_act(self.node.terminate(self.now))

    @rule(dt=st.floats(0.0, 2.0))
    def clock_moves(self, dt: float) -> None:
        """Time passes: the slave's heartbeat task sends one every third of the timeout
        (the node may still miss them if the link lags); the node checks its deadlines."""
        self.now += dt
        if self.slave_reading and self.now - self.last_heartbeat >= HEARTBEAT_TIMEOUT / 3:
            self.slave_heartbeat()
        self.node_act(self.node.tick(self.now))

    # -- rules: the link -------------------------------------------------------------
    @precondition(lambda self: self.to_slave and self.slave_reading)
    @rule(n=DELIVERIES)
    def deliver_to_slave(self, n: int = 1) -> None:
        """The next ``n`` envelopes, each read and acted on before the next."""
        for _ in range(n):
            if not (self.to_slave and self.slave_reading):
                return
            env = self.to_slave.popleft()
            if env.kind == Kind.CREDIT:
                self.credit_delivered[env.sid] += env.body
            elif env.kind == Kind.INVOKE:
                self.reached_slave.add(env.sid)
            self.slave_act(self.worker.receive(env))

    @precondition(lambda self: self.to_node)
    @rule(n=DELIVERIES)
    def deliver_to_node(self, n: int = 1) -> None:
        for _ in range(n):
            if not self.to_node:
                return
            self.node_act(self.node.receive(self.to_node.popleft(), self.now))

    @precondition(lambda self: self.slave_exit_code is not None and not self.to_node
                  and self.node.state is not N.State.DEAD)
    @rule()
    def process_is_reaped(self) -> None:
        """The slave's process ended (it exited, or was killed) and the node read all it
        sent: the pool reaps it."""
        self.slave_alive = False
        self.to_slave.clear()
        self.node_act(self.node.exited(self.slave_exit_code))

    # -- rules: the slave's handlers and shell ---------------------------------------
    def slave_heartbeat(self) -> None:
        self.last_heartbeat = self.now
        self.to_node.append(self.worker.heartbeat())

    @precondition(lambda self: self.running())
    @rule(data=st.data(), outcome=st.sampled_from(["return", "raise"]))
    def handler_ends(self, data: st.DataObject, outcome: str) -> None:
        sid = data.draw(st.sampled_from(self.running()))
        if outcome == "return":
            self.slave_act(self.worker.result(sid, f"r{sid}"))
        else:
            self.slave_act(self.worker.failed(sid, ValueError(f"handler {sid} failed")))

    @precondition(lambda self: any(self.handlers[s].cancel_requested for s in self.running()))
    @rule(data=st.data())
    def handler_stops_when_cancelled(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from([s for s in self.running() if self.handlers[s].cancel_requested]))
        self.slave_act(self.worker.cancelled(sid))

    @precondition(lambda self: any(self.worker.send_window(s) > 0 for s in self.running(event=STREAM)))
    @rule(data=st.data(), n=st.integers(1, STREAM_WINDOW))
    def handler_yields(self, data: st.DataObject, n: int) -> None:
        self.yield_chunks(data.draw(st.sampled_from([s for s in self.running(event=STREAM)
                                                     if self.worker.send_window(s) > 0])), n)

    def yield_chunks(self, sid: int, n: int) -> None:
        for i in range(min(n, self.worker.send_window(sid))):  # then it would wait for Resume
            env = self.worker.chunk(sid, i)
            assert env is not None
            self.slave_act([env])
        self.window_used_up |= self.worker.send_window(sid) == 0

    @precondition(lambda self: self.running(event=STREAM))
    @rule(data=st.data())
    def stream_ends(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(self.running(event=STREAM)))
        self.slave_act(self.worker.stream_ended(sid))

    @precondition(lambda self: any(self.inputs.get(s) and self.inputs[s].items
                                   for s in self.running(event=CHUNKED)))
    @rule(data=st.data(), n=st.integers(1, 40))
    def handler_takes_request_chunks(self, data: st.DataObject, n: int) -> None:
        """As transport.inbound.InputStream: grant back in CREDIT_BATCH steps."""
        self.take_input(data.draw(st.sampled_from([s for s in self.running(event=CHUNKED)
                                                   if self.inputs.get(s) and self.inputs[s].items])), n)

    def take_input(self, sid: int, n: int) -> None:
        stream = self.inputs[sid]
        for _ in range(min(n, len(stream.items))):
            stream.items.popleft()
            stream.taken += 1
            if stream.taken >= CREDIT_BATCH and not stream.ended:
                stream.allowed += stream.taken
                granted, stream.taken = stream.taken, 0
                self.slave_act(self.worker.grant_input(sid, granted))

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def nothing_is_answered_twice(self) -> None:
        twice = [sid for sid, n in self.answers.items() if n > 1]
        assert not twice, f"jobs answered more than once by the node's session: {twice}"
        twice = [sid for sid, n in self.replies.items() if n > 1]
        assert not twice, f"jobs the slave answered more than once: {twice}"

    @invariant()
    def every_reply_is_for_a_job_the_node_holds(self) -> None:
        assert self.node.unknown_sids == 0

    @invariant()
    def the_slave_session_runs_what_its_shell_runs(self) -> None:
        if self.slave_reading:
            assert set(self.worker.running) == set(self.handlers), "a slot held by no handler, or the reverse"

    @invariant()
    def slots_and_prefetch_are_respected(self) -> None:
        w = self.worker
        self.most_waiting = max(self.most_waiting, len(w.waiting))
        assert len(w.running) <= w.concurrency
        assert len(w.waiting) <= self.prefetch
        if w.waiting and w.state is W.State.SERVING:
            assert len(w.running) == w.concurrency, "a job waits while a slot is free"
        assert len(self.node.jobs) <= self.node.capacity

    @invariant()
    def streams_stay_within_their_credit(self) -> None:
        for sid, sent in self.chunks_sent.items():
            assert sent <= STREAM_WINDOW + self.credit_delivered[sid], f"job {sid} ran past its window"
        for sid, buffered in self.buffered.items():
            assert len(buffered) <= STREAM_WINDOW

    @invariant()
    def a_dead_slave_leaves_nothing_unanswered(self) -> None:
        if self.node.state is N.State.DEAD:
            self.all_answered_once()

    def check_the_invariants(self) -> None:
        self.nothing_is_answered_twice()
        self.every_reply_is_for_a_job_the_node_holds()
        self.the_slave_session_runs_what_its_shell_runs()
        self.slots_and_prefetch_are_respected()
        self.streams_stay_within_their_credit()

    def all_answered_once(self) -> None:
        assert not self.node.jobs
        unanswered = sorted(sid for sid in self.invoked if self.answers[sid] != 1)
        assert not unanswered, f"jobs not answered exactly once: {unanswered}"

    # -- the end: drain, terminate, reap ------------------------------------------------
    def teardown(self) -> None:
        if not hasattr(self, "node"):
            return
        n = len(self.invoked)
        event(f"jobs before the end: {'0' if not n else '1-3' if n < 4 else '4-9' if n < 10 else '10+'}")
        self.drain()
        self.node_act(self.node.terminate(self.now))
        self.drain()
        if self.node.state is not N.State.DEAD:
            assert self.slave_exit_code is not None, "the slave did not exit after TERMINATE"
            self.process_is_reaped()
        if self.unanswered_at_exit is not None:
            assert not self.unanswered_at_exit, \
                f"the slave exited without answering jobs it never started: {self.unanswered_at_exit}"
        self.all_answered_once()
        event(f"most jobs queued in the slave: {self.most_waiting}")
        if self.window_used_up:
            event("a stream used up its window")

    def drain(self) -> None:
        """Run both sides until nothing moves: deliver everything, let consumers take
        what is buffered, forward what uploads may send, and let every handler run to
        its end (a stream's to STREAM_LENGTH chunks, so every run with a stream also
        uses up its window and waits for CREDIT)."""
        for _ in range(10_000):
            self.check_the_invariants()
            if self.to_slave and self.slave_reading:
                self.deliver_to_slave(1)
            elif self.to_node:
                self.deliver_to_node(1)
            elif sid := next((s for s, b in self.buffered.items() if b), 0):
                self.consume(sid, STREAM_WINDOW)
            elif self.slave_reading and (sid := next((s for s, u in self.uploads.items() if u.credit > 0
                                                      and not u.choked and s not in self.node.cancelling), 0)):
                self.forward_upload(sid, STREAM_WINDOW)
            elif not self.finish_a_handler():
                return
        raise AssertionError("the pair did not settle")

    def finish_a_handler(self) -> bool:
        """Move the first handler that can move; False if none is left."""
        for sid in self.running():
            handler = self.handlers[sid]
            if handler.cancel_requested:
                self.slave_act(self.worker.cancelled(sid))
            elif handler.event == STREAM and self.chunks_sent[sid] < STREAM_LENGTH:
                if not self.worker.send_window(sid):
                    continue  # waits for CREDIT
                self.yield_chunks(sid, STREAM_LENGTH - self.chunks_sent[sid])
            elif handler.event == STREAM:
                self.slave_act(self.worker.stream_ended(sid))
            elif handler.event == CHUNKED and sid in self.inputs and self.inputs[sid].items:
                self.take_input(sid, STREAM_WINDOW)
            elif handler.event == CHUNKED and sid in self.inputs and not self.inputs[sid].ended:
                continue  # waits for chunks
            else:
                self.slave_act(self.worker.result(sid, None))
            return True
        if self.running():  # all wait on each other: cannot happen with a lossless link
            raise AssertionError(f"handlers {self.running()} wait for ever")
        return False


# A run is 50 steps and a drain: half the profile's examples (fuzz/conftest.py).
SessionPair.TestCase.settings = settings(max_examples=settings.default.max_examples // 2,
                                         stateful_step_count=50, deadline=None)
TestSessionPair = SessionPair.TestCase
