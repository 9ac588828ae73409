"""The slave's side of its session with the node, as a pure state machine (no I/O, no
trio): the mirror of :mod:`engine.protocol.node_session`.

``WorkerSession`` is fed what the node sent (:meth:`~WorkerSession.receive`) and what
the app's handlers did (a job returned, yielded a chunk, raised, stopped after a
CANCEL), and answers with *actions* for the trio shell (``engine/worker/runtime.py``):
an :class:`~transport.codec.Envelope` to send, a handler to start or to cancel, a
chunked request's input to open / feed / end / drop, a stream producer to wake, or
:class:`Exit`.  So the rules below are tested without processes, sockets or clocks
(tests/test_protocol.py, and fuzz/test_session_pair.py runs both sides against each
other).

What it owns (docs/protocol.md):

- **INVOKE validation.**  A body that is not ``[event, payload(, true)]``, or a sid
  already held, is answered with a ``bad-message`` ERROR; an event the app does not
  handle with ``unknown-event`` (when the job would start).  The slave lives on.
- **Slots and prefetch.**  At most ``concurrency`` jobs run at once; INVOKEs beyond
  that (the node's prefetch) wait in arrival order and start as slots free.
- **Cancellation.**  CANCEL of a waiting job answers it ``cancelled`` at once; of a
  running job, asks the shell to cancel its handler (:class:`CancelHandler`), and the
  ``cancelled`` ERROR goes back when the handler ends (:meth:`cancelled`), unless it
  answered otherwise first.  A CANCEL or CREDIT for a sid not held is ignored: the
  reply is already on its way.
- **Exactly once.**  Every INVOKE is ended by exactly one of RESULT / CHOKE / ERROR;
  reporting a second end for a job is a :class:`ProtocolError` (a bug in the shell).
- **Stream credit.**  A job may send :data:`STREAM_WINDOW` chunks beyond the node's
  CREDITs; :meth:`send_window` says how many it may send now, and a :class:`Resume`
  tells the shell when a producer that ran out may go on.
- **TERMINATE.**  Jobs not started are answered ``shutting-down``, the slave says
  TERMINATE and exits (:class:`Exit`); the shell then stops, cancelling the handlers
  still running, whose jobs the node fails when it reaps the process.

A plain sync handler runs *inline*: the shell calls it on :class:`Start` and reports
its end before it feeds the session the next envelope.  Each job costs the session a
few dict operations and two small objects (its Start, its reply): this is the slave's
hot path.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Union

from transport.codec import Envelope, Kind
from transport.errors import BadMessage, UnknownEvent, error_to_body

from engine.errors import JobCancelled, ShuttingDown
from engine.protocol.messages import STREAM_WINDOW, handshake_body, is_credit, parse_invoke

# Plain ints: comparing with an IntEnum member costs an attribute lookup per envelope.
_INVOKE, _CHUNK, _CHOKE, _CANCEL = int(Kind.INVOKE), int(Kind.CHUNK), int(Kind.CHOKE), int(Kind.CANCEL)
_CREDIT, _TERMINATE, _RESULT, _ERROR = int(Kind.CREDIT), int(Kind.TERMINATE), int(Kind.RESULT), int(Kind.ERROR)
_HEARTBEAT, _HANDSHAKE = int(Kind.HEARTBEAT), int(Kind.HANDSHAKE)
# Envelope(kind, sid, body) without NamedTuple's Python-level __new__: half the cost, for
# the one envelope every job ends with.
_envelope = tuple.__new__


class State(str, Enum):
    SERVING = "serving"  # takes jobs
    EXITING = "exiting"  # TERMINATE received: answers what runs, starts nothing, exits
    CLOSED = "closed"    # the link is gone: nothing more can be sent


# -- actions for the shell (an Envelope in the list means: send it) ---------------------
# Not frozen: a frozen dataclass's __init__ costs three times as much, and Start is
# made once per job on the slave's hot path.  Nothing mutates an action.
@dataclass(slots=True)
class Start:
    """Run the handler of ``event`` on ``payload`` for job ``sid`` (a chunked request's
    handler also gets the input the shell opened for that sid)."""
    sid: int
    event: str
    payload: Any


@dataclass(slots=True)
class CancelHandler:
    """The node cancelled running job ``sid``: cancel its handler's task, then report
    how it ended (:meth:`WorkerSession.cancelled` if it stopped)."""
    sid: int


@dataclass(slots=True)
class Resume:
    """Job ``sid`` had used up its stream window and got credit: its producer may go on."""
    sid: int


@dataclass(slots=True)
class OpenInput:
    """Job ``sid`` is a chunked request: hold its chunks (they may arrive before it starts)."""
    sid: int


@dataclass(slots=True)
class Feed:
    """The next chunk of job ``sid``'s request."""
    sid: int
    item: Any


@dataclass(slots=True)
class EndInput:
    """Job ``sid``'s request has no more chunks (CHOKE)."""
    sid: int


@dataclass(slots=True)
class CloseInput:
    """Job ``sid`` is answered: drop its input."""
    sid: int


@dataclass(slots=True)
class Exit:
    """Stop serving: flush what was sent and exit."""


Action = Union[Envelope, Start, CancelHandler, Resume, OpenInput, Feed, EndInput, CloseInput, Exit]


class ProtocolError(Exception):
    """The shell used the session wrongly (a bug, not the node's fault)."""


class WorkerSession:
    def __init__(self, *, concurrency: int, events: Iterable[str]):
        self.concurrency = max(1, concurrency)
        self.events = sorted(events)              # what the app handles (handshake, errors)
        self._known = frozenset(self.events)
        self.state = State.SERVING
        self._serving = True                       # state is SERVING (read per envelope)
        self.running: dict[int, int] = {}          # sid -> chunks it may send now (window)
        self.waiting: dict[int, tuple[str, Any]] = {}  # prefetched: sid -> (event, payload), FIFO
        self.inputs: set[int] = set()              # chunked jobs whose input the shell holds
        self.cancelling: set[int] = set()          # running jobs whose handler was cancelled

    # -- messages of the slave's own ------------------------------------------------------
    def hello(self, *, pid: int, app: str) -> Envelope:
        """The HANDSHAKE, the first thing the slave sends."""
        return Envelope(_HANDSHAKE, 0, handshake_body(pid=pid, app=app, concurrency=self.concurrency,
                                                      events=self.events))

    def heartbeat(self) -> Envelope:
        return Envelope(_HEARTBEAT, 0, {"jobs": len(self.running)})

    # -- queries ------------------------------------------------------------------------
    def send_window(self, sid: int) -> int:
        """Chunks running job ``sid`` may send now (0: wait for a :class:`Resume`)."""
        return self.running.get(sid, 0)

    # -- what the node sent -------------------------------------------------------------
    def receive(self, env: Envelope) -> list[Action]:
        if not self._serving:
            return []  # the shell reads no more after TERMINATE or the link's end
        kind, sid, body = env
        if kind == _INVOKE:
            running = self.running
            # The common case first, inline: a plain [event, payload] (a shape
            # parse_invoke accepts) of a known event, and a free slot with no queue.
            if type(body) is list and len(body) == 2 and len(running) < self.concurrency \
                    and not self.waiting and sid not in running and type(body[0]) is str \
                    and body[0] in self._known:
                running[sid] = STREAM_WINDOW
                return [Start(sid, body[0], body[1])]
            return self._invoke(sid, body)
        if kind == _CHUNK:  # the next chunk of a chunked request
            return [Feed(sid, body)] if sid in self.inputs else []
        if kind == _CHOKE:
            return [EndInput(sid)] if sid in self.inputs else []
        if kind == _CREDIT:
            left = self.running.get(sid)
            if left is None or not is_credit(body):
                return []
            self.running[sid] = left + body
            return [Resume(sid)] if left <= 0 else []
        if kind == _CANCEL:
            return self._cancel(sid)
        if kind == _TERMINATE:
            return self._terminate()
        return []  # unknown kinds are ignored: newer nodes may say more

    def connection_lost(self) -> None:
        """The node's end closed: nothing more can be sent, nothing more starts."""
        self.state = State.CLOSED
        self._serving = False
        self.waiting.clear()

    # -- what the handlers did ----------------------------------------------------------
    def result(self, sid: int, value: Any) -> list[Action]:
        """Job ``sid``'s handler returned ``value``."""
        if self._serving and not (self.waiting or self.inputs or self.cancelling):
            # each job's path, inline: nothing queued, no input to drop, no CANCEL
            if self.running.pop(sid, None) is None:
                raise ProtocolError(f"job {sid} ended, but it is not running (answered twice?)")
            return [_envelope(Envelope, (_RESULT, sid, value))]
        return self._end(sid, _RESULT, value)

    def stream_ended(self, sid: int) -> list[Action]:
        """Job ``sid``'s generator is exhausted: CHOKE."""
        return self._end(sid, _CHOKE, None)

    def failed(self, sid: int, error: BaseException) -> list[Action]:
        """Job ``sid``'s handler raised (or could not be called with this request)."""
        return self._end(sid, _ERROR, error_to_body(error))

    def cancelled(self, sid: int) -> list[Action]:
        """Job ``sid``'s handler stopped because the node cancelled it: acknowledge."""
        return self._end(sid, _ERROR, error_to_body(JobCancelled("cancelled by the node")))

    def chunk(self, sid: int, value: Any) -> Envelope | None:
        """Job ``sid``'s generator yielded ``value``; its :meth:`send_window` must be > 0.
        The CHUNK to send (None: the link is gone).  An envelope, not a list of actions:
        the shell sends it with back-pressure (``await``), unlike the others."""
        left = self.running.get(sid)
        if left is None:
            raise ProtocolError(f"chunk of job {sid}, which is not running")
        if left <= 0:
            raise ProtocolError(f"chunk of job {sid} beyond its stream window: wait for Resume")
        self.running[sid] = left - 1
        return Envelope(_CHUNK, sid, value) if self.state is not State.CLOSED else None

    def grant_input(self, sid: int, chunks: int) -> list[Action]:
        """Job ``sid``'s handler took ``chunks`` more chunks of its request: let the node
        send as many more."""
        if sid not in self.inputs or chunks <= 0 or self.state is State.CLOSED:
            return []
        return [Envelope(_CREDIT, sid, chunks)]

    # -- internals ----------------------------------------------------------------------
    def _invoke(self, sid: int, body: Any) -> list[Action]:
        request = parse_invoke(body)
        if request is None or sid in self.running or sid in self.waiting:
            why = (f"sid {sid} is already in use" if request is not None else
                   f"INVOKE body must be [event, payload(, chunked)], got {body!r:.80}")
            return [Envelope(_ERROR, sid, error_to_body(BadMessage(why)))]
        event, payload, chunked = request
        if not chunked:
            if self.waiting or len(self.running) >= self.concurrency:
                self.waiting[sid] = (event, payload)  # prefetched: waits for a slot
                return []
            return self._start(sid, event, payload)
        self.inputs.add(sid)
        actions: list[Action] = [OpenInput(sid)]
        if self.waiting or len(self.running) >= self.concurrency:
            self.waiting[sid] = (event, payload)
        else:
            actions += self._start(sid, event, payload)
        return actions

    def _start(self, sid: int, event: str, payload: Any) -> list[Action]:
        if event in self._known:
            self.running[sid] = STREAM_WINDOW
            return [Start(sid, event, payload)]
        # answered at once, taking no slot
        return self._answered(sid, Envelope(_ERROR, sid, error_to_body(UnknownEvent(
            f"no handler for event {event!r}; the app handles {self.events}"))))

    def _start_waiting(self) -> list[Action]:
        actions: list[Action] = []
        waiting = self.waiting
        while waiting and len(self.running) < self.concurrency:
            sid = next(iter(waiting))
            event, payload = waiting.pop(sid)
            actions += self._start(sid, event, payload)
        return actions

    def _end(self, sid: int, kind: int, body: Any) -> list[Action]:
        if self.running.pop(sid, None) is None:
            raise ProtocolError(f"job {sid} ended, but it is not running (answered twice?)")
        if self.cancelling:
            self.cancelling.discard(sid)
        if self.state is State.CLOSED:
            self.inputs.discard(sid)
            return []
        reply = _envelope(Envelope, (kind, sid, body))
        actions: list[Action] = self._answered(sid, reply) if self.inputs else [reply]
        if self.waiting and self._serving:
            actions += self._start_waiting()  # the freed slot: the next prefetched job
        return actions

    def _answered(self, sid: int, reply: Envelope) -> list[Action]:
        if sid in self.inputs:
            self.inputs.discard(sid)
            return [reply, CloseInput(sid)]
        return [reply]

    def _cancel(self, sid: int) -> list[Action]:
        if sid in self.running:
            if sid in self.cancelling:
                return []
            self.cancelling.add(sid)
            return [CancelHandler(sid)]
        if self.waiting.pop(sid, None) is not None:  # prefetched, never started
            return self._answered(sid, Envelope(_ERROR, sid, error_to_body(
                JobCancelled("cancelled by the node before it started"))))
        return []  # it has finished: its reply is on its way

    def _terminate(self) -> list[Action]:
        self.state = State.EXITING
        self._serving = False
        actions: list[Action] = []
        for sid in self.waiting:  # prefetched jobs: answered, not dropped
            actions += self._answered(sid, Envelope(_ERROR, sid, error_to_body(
                ShuttingDown("the slave is exiting; the job never started"))))
        self.waiting.clear()
        actions.append(Envelope(_TERMINATE, 0, None))
        actions.append(Exit())
        return actions
