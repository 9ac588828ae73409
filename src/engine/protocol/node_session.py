"""The node side of one slave's session, as a pure state machine (no I/O, no trio).

``SlaveSession`` is fed what happened (an envelope arrived, a job was handed over,
the clock moved, the process exited) and answers with *actions* for the trio shell
(``engine/pool/process.py``) to carry out: send an envelope, kill the process, deliver a
chunk / result / error to a job.  Time is a plain number passed in, so the
deadlines (startup, heartbeat, termination) are tested without clocks.  Its mirror on
the slave is :mod:`engine.protocol.slave_session`.

States::

    spawning --HANDSHAKE--> ready (0..concurrency+prefetch jobs; "busy" when > 0)
    ready    --terminate()--> terminating --exit--> dead
    any      --deadline missed--> killing --exit--> dead
    any      --exit--> dead

Every job handed over with :meth:`invoke` is answered exactly once, by a reply
from the slave or by the session itself when the slave hangs or dies.

Cancellation: :meth:`cancel` sends ``CANCEL`` and keeps the job (its slot stays
taken) until the slave's acknowledgement (an ``ERROR`` with code ``cancelled``, or
whatever reply was already on its way); chunks in between are dropped.  A slave
that does not acknowledge within ``termination_timeout`` is killed, so a handler
that ignores cancellation cannot hold the slot for ever.

Prefetch: with ``prefetch`` > 0 the session lets the shell hand the slave up to that
many INVOKEs beyond its ``concurrency``; the slave queues them and starts each as a
slot frees, so the next job is already there when one ends (no node round trip
between jobs).  ``prefetch`` is only the bound (the deepest the pool policy may go,
e.g. ``AUTO_PREFETCH_MAX`` in auto mode); the policy decides how deep it goes.

Flow control: the slave sends at most :data:`STREAM_WINDOW` chunks of a job beyond
what the node granted back with ``CREDIT`` (:meth:`grant`), so a fast producer and a
slow consumer meet at a bounded buffer (docs/protocol.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Hashable, Union

from transport.codec import Envelope, Kind
from transport.errors import RemoteError, body_to_error

from engine.errors import SlaveDied, SlaveHung
# The shared constants, named here too for the node's side (the pool grants CREDIT in
# CREDIT_BATCH steps); the slave imports them from messages, never from this module.
from engine.protocol.messages import (CREDIT_BATCH as CREDIT_BATCH, PROTOCOL_VERSION as PROTOCOL_VERSION,
                                      STREAM_WINDOW as STREAM_WINDOW, handshake_concurrency, invoke_body,
                                      is_credit)


class State(str, Enum):
    SPAWNING = "spawning"        # process started, no handshake yet
    READY = "ready"              # handshaked; may hold jobs (busy) up to concurrency
    TERMINATING = "terminating"  # asked to exit (or said it is exiting); no new jobs
    KILLING = "killing"          # we decided to kill it; waiting for the exit
    DEAD = "dead"


# -- actions for the shell ------------------------------------------------------------
@dataclass(frozen=True)
class Send:
    envelope: Envelope


@dataclass(frozen=True)
class Kill:
    """SIGKILL the process now; ``reason`` is for logs and info."""
    reason: str


@dataclass(frozen=True)
class Stopping:
    """The slave will take no more jobs (it said it is exiting)."""


@dataclass(frozen=True)
class Chunk:
    job: Hashable
    value: Any


@dataclass(frozen=True)
class Finished:
    """The job is answered: ``streamed`` False -> ``value`` is the single result;
    True -> the stream ended (CHOKE) and ``value`` is None."""
    job: Hashable
    value: Any = None
    streamed: bool = False


@dataclass(frozen=True)
class Failed:
    """The job failed: ``from_slave`` True -> the slave answered with an ERROR; False
    -> the session failed it (the slave died, hung or was killed)."""
    job: Hashable
    error: RemoteError
    from_slave: bool = False


@dataclass(frozen=True)
class InputCredit:
    """The slave took chunks of a chunked job: it may be sent ``chunks`` more."""
    job: Hashable
    chunks: int


@dataclass(frozen=True)
class Ready:
    """Handshake accepted: the slave may take ``concurrency`` jobs."""
    concurrency: int


Action = Union[Send, Kill, Stopping, Chunk, Finished, Failed, InputCredit, Ready]


class ProtocolError(Exception):
    """The shell used the session wrongly (a bug, not a slave's fault)."""


class SlaveSession:
    def __init__(self, *, pid: int, now: float, startup_timeout: float, heartbeat_timeout: float,
                 termination_timeout: float, concurrency: int = 1, prefetch: int = 0):
        self.pid = pid
        self.state = State.SPAWNING
        self.started_at = now
        self.last_seen = now
        self.startup_timeout = startup_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.termination_timeout = termination_timeout
        self.concurrency = concurrency      # what we asked for; the handshake confirms it
        self.prefetch = prefetch            # most INVOKEs it may hold queued beyond that
        self.jobs: dict[int, Hashable] = {}  # sid -> job
        # sid -> chunks the slave may still send of that job's reply: the window, plus the
        # credit granted since; a slave that sends more is broken (killed), so a worker
        # in any language cannot make the node buffer without bound
        self.room: dict[int, int] = {}
        self.cancelling: dict[int, float] = {}  # sid -> deadline of the slave's acknowledgement
        self.handshaked = False
        self.startup_error: RemoteError | None = None  # what a failing slave said before dying
        self.kill_reason: str | None = None
        self.exit_code: int | None = None
        self._terminate_deadline: float | None = None
        self.unknown_sids = 0               # replies for sids we do not hold (late, after a kill)
        self.handshake_info: dict[str, Any] = {}

    # -- queries ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Most jobs the slave may hold at once: running plus prefetched."""
        return self.concurrency + self.prefetch

    @property
    def free(self) -> int:
        return self.capacity - len(self.jobs) if self.state is State.READY else 0

    def next_deadline(self) -> float | None:
        if self.state is State.SPAWNING:
            return self.started_at + self.startup_timeout
        if self.state is State.READY:
            deadline = self.last_seen + self.heartbeat_timeout
        elif self.state is State.TERMINATING and self._terminate_deadline is not None:
            deadline = self._terminate_deadline
        else:
            return None
        if self.cancelling:
            deadline = min(deadline, min(self.cancelling.values()))
        return deadline

    # -- events from the shell -----------------------------------------------------------
    def invoke(self, sid: int, job: Hashable, event: str, payload: Any,
               chunked: bool = False) -> list[Action]:
        if self.state is not State.READY or len(self.jobs) >= self.capacity:
            raise ProtocolError(f"slave {self.pid} cannot take a job in state {self.state.value} "
                                f"with {len(self.jobs)}/{self.capacity} jobs")
        if sid in self.jobs:
            raise ProtocolError(f"sid {sid} already in use on slave {self.pid}")
        self.jobs[sid] = job
        self.room[sid] = STREAM_WINDOW
        return [Send(Envelope(Kind.INVOKE, sid, invoke_body(event, payload, chunked)))]

    def cancel(self, sid: int, now: float) -> list[Action]:
        """Ask the slave to stop job ``sid``; it stays held until acknowledged."""
        if sid not in self.jobs or sid in self.cancelling \
                or self.state not in (State.READY, State.TERMINATING):
            return []
        self.cancelling[sid] = now + self.termination_timeout
        return [Send(Envelope(Kind.CANCEL, sid, None))]

    def withdraw(self, sid: int, error: RemoteError) -> list[Action]:
        """Job ``sid``'s INVOKE could not be sent (over the link's size limit): the
        slave never heard of it, so the job fails here with ``error``, its slot free."""
        job = self.jobs.pop(sid, None)
        if job is None:
            return []
        self.cancelling.pop(sid, None)
        self.room.pop(sid, None)
        return [Failed(job, error)]

    def grant(self, sid: int, chunks: int) -> list[Action]:
        """The job's consumer took ``chunks`` more chunks: let the slave send as many."""
        if sid not in self.jobs or sid in self.cancelling or chunks <= 0 \
                or self.state not in (State.READY, State.TERMINATING):
            return []
        self.room[sid] += chunks
        return [Send(Envelope(Kind.CREDIT, sid, chunks))]

    def receive(self, env: Envelope, now: float) -> list[Action]:
        """One envelope from the slave. Anything it sends proves it alive."""
        if self.state in (State.DEAD, State.KILLING):
            return []
        self.last_seen = now
        kind, sid, body = env
        if kind == Kind.HEARTBEAT:
            return []
        if kind == Kind.HANDSHAKE:
            return self._handshake(body)
        if kind == Kind.TERMINATE:  # the slave says it is exiting: give it no more jobs
            if self.state is not State.TERMINATING:
                self.state = State.TERMINATING
                self._terminate_deadline = now + self.termination_timeout
                return [Stopping()]
            return []
        if kind == Kind.CREDIT:  # for the chunks of a chunked job
            job = self.jobs.get(sid)
            if job is None or sid in self.cancelling or not is_credit(body):
                return []
            return [InputCredit(job, body)]
        if kind == Kind.ERROR and sid == 0:
            # A slave-level failure (e.g. the app module did not import); it will exit.
            self.startup_error = body_to_error(body)
            return []
        if kind in (Kind.RESULT, Kind.CHUNK, Kind.CHOKE, Kind.ERROR):
            job = self.jobs.get(sid)
            if job is None:
                self.unknown_sids += 1
                return []
            if kind == Kind.CHUNK:
                room = self.room[sid] - 1
                if room < 0:
                    return self._kill(f"sent more chunks of job {sid} than its stream window "
                                      f"allows ({STREAM_WINDOW} beyond the credit granted)",
                                      SlaveDied)
                self.room[sid] = room
                return [] if sid in self.cancelling else [Chunk(job, body)]
            del self.jobs[sid]
            del self.room[sid]
            self.cancelling.pop(sid, None)
            if kind == Kind.RESULT:
                return [Finished(job, body, streamed=False)]
            if kind == Kind.CHOKE:
                return [Finished(job, None, streamed=True)]
            return [Failed(job, body_to_error(body), from_slave=True)]
        return []  # unknown kinds are ignored: newer slaves may say more

    def tick(self, now: float) -> list[Action]:
        """The clock moved: check the startup, heartbeat and termination deadlines."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return []
        late = [sid for sid, t in self.cancelling.items() if now >= t]
        if late:
            return self._kill(f"job {late[0]} still running {self.termination_timeout:g}s after "
                              f"CANCEL (termination-timeout)", SlaveDied)
        if self.state is State.SPAWNING:
            return self._kill(f"no handshake within startup-timeout {self.startup_timeout:g}s",
                              SlaveDied)
        if self.state is State.READY:
            return self._kill(f"no heartbeat for {now - self.last_seen:.1f}s "
                              f"(heartbeat-timeout {self.heartbeat_timeout:g}s)", SlaveHung)
        return self._kill(f"did not exit within termination-timeout {self.termination_timeout:g}s",
                          SlaveDied)

    def terminate(self, now: float) -> list[Action]:
        """Ask the slave to finish and exit (idle retirement, shutdown)."""
        if self.state in (State.TERMINATING, State.KILLING, State.DEAD):
            return []
        if self.state is State.SPAWNING:  # it cannot read TERMINATE yet
            return self._kill("terminated before its handshake", SlaveDied)
        self.state = State.TERMINATING
        self._terminate_deadline = now + self.termination_timeout
        return [Send(Envelope(Kind.TERMINATE, 0, None))]

    def kill(self, reason: str, error_type: type[RemoteError] = SlaveDied) -> list[Action]:
        if self.state in (State.KILLING, State.DEAD):
            return []
        return self._kill(reason, error_type)

    def exited(self, exit_code: int | None) -> list[Action]:
        """The process is gone (reaped). Jobs still held fail with SlaveDied."""
        if self.state is State.DEAD:
            return []
        self.state = State.DEAD
        self.exit_code = exit_code
        how = describe_exit(exit_code)
        if self.kill_reason:
            how += f" after being killed: {self.kill_reason}"
        return self._fail_all(SlaveDied, f"slave {self.pid} {how}")

    # -- internals -----------------------------------------------------------------
    def _handshake(self, body: Any) -> list[Action]:
        if self.state is not State.SPAWNING:
            return []  # a repeated handshake changes nothing
        try:
            conc = handshake_concurrency(body)
        except ValueError as exc:
            return self._kill(str(exc), SlaveDied)
        if conc is not None:
            self.concurrency = min(conc, self.concurrency)
        self.handshake_info = body
        self.handshaked = True
        self.state = State.READY
        return [Ready(self.concurrency)]

    def _kill(self, reason: str, error_type: type[RemoteError]) -> list[Action]:
        # Kill comes first: the shell must stop giving this slave jobs before the
        # failures below free the policy to hand out more work.
        self.state = State.KILLING
        self.kill_reason = reason
        return [Kill(reason), *self._fail_all(error_type, f"slave {self.pid} {reason}")]

    def _fail_all(self, error_type: type[RemoteError], message: str) -> list[Action]:
        # one error instance per job: an exception object raised in two tasks mixes tracebacks
        failed: list[Action] = [Failed(job, error_type(message)) for job in self.jobs.values()]
        self.jobs.clear()
        self.room.clear()
        self.cancelling.clear()
        return failed


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        import signal
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"
