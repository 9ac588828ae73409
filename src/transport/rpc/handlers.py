"""What an :class:`~transport.rpc.RpcServer` handler sees and may return: the
:class:`Request`, and besides a plain value or a coroutine, a :class:`Stream` or a
:class:`Deferred` answer (see :mod:`transport.rpc` for how each is answered)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterable, Callable, Protocol

from transport.errors import CodecError, RemoteError

if TYPE_CHECKING:
    from transport.inbound import InputStream


class FrameGuard(Protocol):
    """Optional frame authentication (the mesh's shared secret): ``seal`` wraps an
    outgoing frame, ``open`` unwraps an incoming one or raises CodecError."""

    def seal(self, frame: bytes) -> bytes: ...
    def open(self, frame: bytes) -> bytes: ...


class FrameGate(Protocol):
    """A server's frame authentication that lets unsealed frames in as well, marked so
    (``Request.sealed``), for a handler that decides per request what a caller without
    the key may do (a node's control endpoint: read-only verbs on loopback;
    ``transport/seal.py``).  ``open`` returns the frame and, if it came sealed and
    verified, the guard that seals the answers on its connection (None: it came
    unsealed); it raises :class:`Refused` for a frame it can read but not trust, and
    CodecError for one it cannot read."""

    def open(self, frame: bytes) -> tuple[bytes, FrameGuard | None]: ...


class Refused(CodecError):
    """A frame a :class:`FrameGate` can read but will not trust (sealed with another
    key, replayed, too old): the server answers every request in ``frame`` with
    ``error``, unsealed, so that its caller learns why rather than waiting out a timeout."""

    def __init__(self, frame: bytes, error: RemoteError) -> None:
        super().__init__(str(error))
        self.frame = frame
        self.error = error


def sealing(try_send: Callable[[bytes], Any] | None,
            guard: FrameGuard | None) -> Callable[[bytes], Any] | None:
    """A link's direct write (``try_send_nowait``) that seals each frame it is given
    first, as the writer task does: with a guard, lone messages still go out at once."""
    if try_send is None or guard is None:
        return try_send
    seal = guard.seal
    return lambda frame: try_send(seal(frame))


@dataclass(slots=True)
class Request:
    sid: int
    target: str
    event: str
    payload: Any
    peer: int  # which client connection it came on
    chunks: "InputStream | None" = None  # a chunked request's chunks (transport/inbound.py)
    # Whether it came in a frame the server's guard or gate verified (FrameGate).
    sealed: bool = False


class Stream:
    """Return this from a handler to stream ``items`` as CHUNKs then CHOKE."""

    __slots__ = ("items",)

    def __init__(self, items: AsyncIterable[Any]):
        self.items = items


# How a server hears that a Deferred it was handed got its answer: called once, as
# ``on_settled(conn, sid, how, value)`` with the ``conn`` and ``sid`` the server bound
# it with (``conn`` is the server's own business) and ``how`` one of the outcomes below.
OnSettled = Callable[[Any, int, int, Any], None]


class Deferred:
    """A handler's answer that arrives later, from elsewhere, with no task waiting.

    The handler returns a Deferred; whoever produces the answer settles it once with
    :meth:`resolve`, :meth:`fail` or :meth:`stream` (later settlements are ignored), from
    synchronous code such as a completion callback, and the server answers from there.
    ``on_cancel`` is called if the caller gives up first (CANCEL, or it disconnected);
    the answer is then not sent.  Settling before the handler has returned is fine.

    The server binds it to its own :data:`OnSettled` callback (``bind``): a Deferred
    knows whom to tell, not who that is."""

    __slots__ = ("on_cancel", "poll", "_outcome", "_on_settled", "_conn", "_sid")

    def __init__(self, on_cancel: Callable[[], Any] | None = None,
                 poll: Callable[[], bool] | None = None):
        self.on_cancel = on_cancel
        # Settles it now if its answer has arrived (True if anything came): the server
        # polls with it when this is all it waits for (transport/_spin.py).
        self.poll = poll
        self._outcome: tuple[int, Any] | None = None
        self._on_settled: OnSettled | None = None
        self._conn: Any = None
        self._sid = 0

    def resolve(self, value: Any) -> None:
        """Answer with ``RESULT value``."""
        self._settle(RESOLVED, value)

    def fail(self, error: BaseException) -> None:
        """Answer with ``ERROR`` (as if the handler had raised ``error``)."""
        self._settle(FAILED, error)

    def stream(self, items: AsyncIterable[Any]) -> None:
        """Answer with ``items`` as CHUNKs then CHOKE (streamed on a worker task)."""
        self._settle(STREAMED, items)

    @property
    def settled(self) -> bool:
        return self._outcome is not None

    def _settle(self, how: int, value: Any) -> None:
        if self._outcome is None:
            self._outcome = (how, value)
            if self._on_settled is not None:
                self._on_settled(self._conn, self._sid, how, value)

    def bind(self, on_settled: OnSettled, conn: Any, sid: int) -> None:
        """For the server it was handed to: call ``on_settled(conn, sid, how, value)``
        once it is settled (at once if it already is)."""
        self._on_settled, self._conn, self._sid = on_settled, conn, sid
        if self._outcome is not None:
            on_settled(conn, sid, *self._outcome)


# A Deferred's outcomes, as its OnSettled callback is told them (``how``).
RESOLVED, FAILED, STREAMED = 1, 2, 3

Handler = Callable[[Request], Any]  # a value, a coroutine, a Stream or a Deferred
