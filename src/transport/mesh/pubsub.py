"""Publisher and Subscriber: a distributed event emitter over nng Pub0/Sub0.

A Publisher listens on a Pub0 socket; each Subscriber dials every Publisher (same
namespace and key) whose advertised ``broadcasts`` overlap its ``subscribes_to``, as
they are discovered, so a late joiner starts receiving without anyone restarting.

Each nng message is a codec frame of ``PUBLISH`` envelopes (sid = sequence number,
body ``[topic, payload, seq]``): when many publishes are queued they share one
message, which is where throughput comes from.  Pub0 never blocks: a subscriber
that cannot keep up loses messages in nng's queues or in its own bounded buffer,
never stalls the publisher, and counts what it lost from the gaps in the sequence.
A gap wider than ``MAX_GAP`` is no loss a queue could explain: it is counted as a
reset (``stats["resets"]``), so a lying publisher cannot inflate ``dropped``.

With a secret, frames are sealed for this Publisher (``b"event:" + its id``,
transport/mesh/sealing.py): encrypted, so a stranger dialing its endpoint reads
nothing, and refused by a Subscriber (before anything is counted) unless authentic,
fresh and not a replay.  Without one, anyone who can dial the endpoint reads the events.

A Subscriber keeps its links to Publishers with a :class:`~transport.mesh.dialing.
LinkKeeper`, as a Requester does: at most ``max_links``, a few connecting at a time, a
link not connected within ``dial_timeout`` dropped and its Publisher backed off.
"""
from __future__ import annotations

import functools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, NamedTuple

import msgpack
import pynng
import trio

from transport.codec import DEFAULT_MAX_MESSAGE, Kind, encode_envelope
from transport.errors import CodecError, QueueFull
from transport.mesh.component import Component, _names, count_unmatched
from transport.mesh.dialing import LinkKeeper
from transport.mesh.link_counts import keep_links_told
from transport._outbox import Outbox
from transport.mesh.peers import Beacon, any_match, matches
from transport.sockets import TrioSocket, bound_address
from transport.rpc.connection import check_max_message

if TYPE_CHECKING:
    from transport.mesh.sealing import FrameSigner

log = logging.getLogger(__name__)

# A gap in one publisher's sequence wider than this is counted as a reset, not as
# events dropped: 16.7 M events is minutes of a stalled subscriber at full rate, far
# more than the queues between them hold (docs/mesh.md).
MAX_GAP = 1 << 24
MAX_BROADCASTS = 1000   # types a Publisher adds to its beacon as it publishes them


class Publisher(Component):
    role = "publisher"

    def __init__(self, name: str, *, broadcasts: list[str] | tuple[str, ...] = (),
                 high_water: int = 100_000, nng_buffer: int = 128, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.nng_buffer = nng_buffer  # frames queued per subscriber before Pub0 drops
        self.broadcasts = _names(broadcasts, "broadcasts")
        self._covered: set[str] = set()   # topics published that its beacon covers
        self.high_water = high_water
        self._outbox = Outbox()
        self._drained = trio.Event()
        self._seq = 0
        self._sock: TrioSocket | None = None
        self.address: str | None = None
        self.stats = {"published": 0, "frames": 0, "refused": 0}

    def advertised(self) -> tuple[str, ...]:
        return self.broadcasts

    def advertise(self, *topics: str) -> None:
        """Add to what it broadcasts, also while it runs (Subscribers of those topics
        learn of it at once)."""
        new = tuple(t for t in _names(topics, "topics") if t not in self.broadcasts)
        if new:
            self.broadcasts += new
            self._readvertise()

    @property
    def subscribers(self) -> int:
        """Subscribers connected right now.  A subscriber dials once it has
        discovered this publisher, and what is published before its connection
        is up does not reach it (pub/sub keeps no history)."""
        return 0 if self._sock is None else len(self._sock.sock.pipes)

    def publish(self, topic: str, data: Any = None) -> None:
        """Queue one event; returns at once.  Raises QueueFull when ``high_water``
        events are queued (the producer outruns its own writer, not a subscriber:
        ``await publisher.flush()`` now and then in tight loops), CodecError when
        ``data`` cannot be carried."""
        if not isinstance(topic, str) or not topic:
            raise ValueError("topic must be a non-empty string")
        if self.broadcasts and topic not in self._covered:
            # a type it did not declare: say so, or no Subscriber of it dials this one
            if not any_match(self.broadcasts, topic) and len(self.broadcasts) < MAX_BROADCASTS:
                self.advertise(topic)
            if len(self._covered) < MAX_BROADCASTS:
                self._covered.add(topic)
        if len(self._outbox) >= self.high_water:
            self.stats["refused"] += 1
            raise QueueFull(f"publisher {self.name!r} has {self.high_water} events queued")
        seq = self._seq + 1
        try:
            packed = encode_envelope(Kind.PUBLISH, seq, (topic, data, seq))
        except CodecError as exc:
            reason = str(exc).removeprefix("cannot encode: ")
            raise CodecError(f"cannot encode event {topic!r}: {reason}") from None
        self._seq = seq
        self._outbox.put(packed)
        self.stats["published"] += 1

    async def flush(self) -> None:
        """Wait until every queued event has been handed to nng."""
        while self._outbox:
            if self._drained.is_set():
                self._drained = trio.Event()
            await self._drained.wait()

    async def _writer(self, sock: TrioSocket) -> None:
        guard = self.guard(seals=b"event:" + self.id.encode())
        while True:
            await self._outbox.wait()
            for frame, _ in self._outbox.frames():
                if guard is not None:
                    frame = guard.seal(frame)
                await sock.send(frame)
                self.stats["frames"] += 1
            self._drained.set()

    async def _serve(self, nursery: trio.Nursery) -> None:
        raw = pynng.Pub0()
        try:
            raw.listen(f"tcp://{self.bind}:0")
        except pynng.NNGException:
            raw.close()
            raise
        self._sock = sock = TrioSocket(raw, buffer=self.nng_buffer)
        self.address = bound_address(raw)
        nursery.start_soon(self._close_on_cancel, sock)
        nursery.start_soon(self._writer, sock)
        await self._start_discovery(nursery, self.address)

    @staticmethod
    async def _close_on_cancel(sock: TrioSocket) -> None:
        try:
            await trio.sleep_forever()
        finally:
            sock.close()


class Event(NamedTuple):
    """One delivered event (immutable; a named tuple because a subscriber makes
    ~100,000 a second and a frozen dataclass costs 4x as much to build)."""

    topic: str
    data: Any
    publisher: str   # the publisher's name


_new_event = tuple.__new__
_PUBLISH = int(Kind.PUBLISH)  # a plain int: the enum member's lookup costs more than the test
_unpackb = functools.partial(msgpack.unpackb, raw=False, strict_map_key=False, use_list=True)


EventHandler = Callable[[Any], Awaitable[None]]


@dataclass
class _Feed:
    """A Subscriber's link to one Publisher (what a LinkKeeper keeps)."""

    beacon: Beacon
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    up: trio.Event = field(default_factory=trio.Event)  # set when nng's pipe connects
    received: int = 0   # events taken from it (its beacon's links: the monitor's graph)

    @property
    def connected(self) -> bool:
        return self.up.is_set()

    @property
    def in_flight(self) -> int:
        return 0        # a feed carries no requests: it closes as soon as its peer leaves

    async def wait_connected(self) -> None:
        await self.up.wait()

    def close(self) -> None:
        self.scope.cancel()


class Subscriber(Component):
    role = "subscriber"

    def __init__(self, name: str, *, subscribes_to: list[str] | tuple[str, ...] = (),
                 buffer: int = 10_000, nng_buffer: int = 1024, max_links: int = 64,
                 dial_timeout: float = 3.0, max_message: int = DEFAULT_MAX_MESSAGE,
                 **kw: Any) -> None:
        super().__init__(name, **kw)
        # nng refuses (and drops the pipe of) a frame over this before it is buffered,
        # so one publisher cannot make this process hold a 200 MiB message.
        self.max_message = check_max_message(max_message, "Subscriber")
        self.subscribes_to = _names(subscribes_to, "subscribes_to") or ("**",)
        self._handlers: list[tuple[str, EventHandler]] = []
        if buffer < 1 or nng_buffer < 1:
            raise ValueError("buffer and nng_buffer must be >= 1")
        # Delivery buffer: the reader fills it a frame at a time and waits while it is
        # full, so a slow consumer backs up into nng's bounded queue (nng_buffer frames)
        # where Sub0 drops, counted from the sequence gaps; the publisher never waits.
        self._buffer: deque[Event] = deque()
        self._buffer_max = buffer
        self._nng_buffer = nng_buffer
        self._readable = trio.Event()
        self._room = trio.Event()
        self._room_wanted = False   # the reader waits for the buffer to drain
        self._taken = 0
        self._last_seq: dict[str, int] = {}
        self._wanted: dict[str, bool] = {}
        self.stats = {"received": 0, "dropped": 0, "resets": 0, "bad_frames": 0,
                      "filtered": 0, "handler_errors": 0, "dial_failed": 0, "unmatched": 0}
        self.unmatched: dict[str, int] = {}  # event type no handler took -> how many (bounded)
        self._keeper: LinkKeeper[_Feed] = LinkKeeper(
            candidates=self._publishers, dial=self._dial, stats=self.stats,
            dropped=self._forget_publisher,
            max_links=max_links, dial_timeout=dial_timeout)

    @property
    def links(self) -> int:
        """Publishers linked to (connected or connecting)."""
        return len(self._keeper.links)

    def advertised(self) -> tuple[str, ...]:
        return self.subscribes_to

    @property
    def dropped(self) -> int:
        return self.stats["dropped"]

    def on(self, pattern: str) -> Callable[[EventHandler], EventHandler]:
        """Register ``async def handler(data)`` for events matching ``pattern``.
        Handlers run one at a time in the subscriber's task; with handlers the
        subscriber is not also iterable."""
        def register(fn: EventHandler) -> EventHandler:
            self._handlers.append((pattern, fn))
            return fn
        return register

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        """The next event.  Checks for cancellation and yields to the scheduler every
        64 events rather than on each one: at ~100,000 events/s a per-event
        checkpoint costs more than the event itself."""
        buf = self._buffer
        while not buf:
            self._readable = trio.Event()
            await self._readable.wait()
        self._taken += 1
        if not self._taken & 63:
            await trio.lowlevel.checkpoint()
        event = buf.popleft()
        if self._room_wanted:
            self._room_wanted = False
            self._room.set()
        return event

    receive = __anext__

    async def receive_many(self, limit: int = 4096) -> list[Event]:
        """Every buffered event (at least one, at most ``limit``): the fast path."""
        buf = self._buffer
        while not buf:
            self._readable = trio.Event()
            await self._readable.wait()
        await trio.lowlevel.checkpoint_if_cancelled()
        n = min(limit, len(buf))
        out = [buf.popleft() for _ in range(n)]
        self._room_wanted = False
        self._room.set()
        return out

    def _wants(self, topic: str) -> bool:
        hit = self._wanted.get(topic)
        if hit is None:
            hit = any(matches(p, topic) for p in self.subscribes_to)
            if len(self._wanted) < 10_000:
                self._wanted[topic] = hit
        return hit

    async def _serve(self, nursery: trio.Nursery) -> None:
        discovery = await self._start_discovery(nursery)
        nursery.start_soon(self._keeper.run, nursery, discovery)
        nursery.start_soon(keep_links_told, discovery, self._link_counts,
                           self.discovery_config.hello_interval)
        if self._handlers:
            nursery.start_soon(self._dispatch)

    def _publishers(self) -> list[Beacon]:
        discovery = self.discovery
        assert discovery is not None, "links are kept only while it runs"
        return discovery.table.interesting("publisher", self.subscribes_to)

    def _link_counts(self) -> list[tuple[str, int]]:
        """(Publisher id, events received from it) of every feed it holds."""
        return [(pid, feed.received) for pid, feed in self._keeper.links.items()]

    def _forget_publisher(self, pid: str) -> None:
        self._last_seq.pop(pid, None)

    async def _dial(self, nursery: trio.Nursery, b: Beacon) -> _Feed:
        feed = _Feed(b)
        await nursery.start(self._listen, b.id, b.name, feed)
        return feed

    async def _listen(self, pid: str, publisher: str, feed: _Feed,
                      *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raw = pynng.Sub0(recv_max_size=self.max_message)
        raw.subscribe(b"")
        sock = TrioSocket(raw, buffer=self._nng_buffer)
        sock.on_pipe_event(added=lambda pipe: feed.up.set())
        guard = self.guard(seals=b"subscriber:" + self.id.encode(),
                           opens=b"event:" + pid.encode())
        try:
            with feed.scope:
                raw.dial(feed.beacon.endpoint, block=False)
                task_status.started()
                while True:
                    frame = await sock.recv()
                    while len(self._buffer) >= self._buffer_max:
                        self._room = trio.Event()
                        self._room_wanted = True
                        await self._room.wait()
                    feed.received += self._take(pid, publisher, frame, guard)
        finally:
            sock.close()

    def _take(self, pid: str, publisher: str, frame: bytes, guard: FrameSigner | None) -> int:
        """Buffer the events of one frame from publisher ``pid``; return how many."""
        # The frame is unpacked and checked here in one pass rather than through
        # codec.decode: at ~100,000 events/s building an Envelope per event is a
        # fifth of the subscriber's time.
        stats = self.stats
        try:
            if guard is not None:
                frame = guard.open(frame)
            items = _unpackb(frame)
        except Exception:  # CodecError from the guard, msgpack's zoo for garbage
            stats["bad_frames"] += 1
            return 0
        if type(items) is not list:
            stats["bad_frames"] += 1
            return 0
        last = self._last_seq.get(pid)
        push = self._buffer.append
        wanted = self._wanted
        before = len(self._buffer)
        bad = filtered = 0
        for item in items:
            if type(item) is not list or len(item) != 3:
                bad += 1
                continue
            kind, seq, body = item
            if kind != _PUBLISH or type(seq) is not int or type(body) is not list \
                    or len(body) != 3 or type(body[0]) is not str:
                bad += 1
                continue
            if last is not None and seq > last + 1:
                if seq - last <= MAX_GAP:
                    stats["dropped"] += seq - last - 1   # lost in nng's queues
                else:
                    stats["resets"] += 1   # no queue loses that many: not counted as drops
            if last is None or seq > last:
                last = seq
            topic = body[0]
            hit = wanted.get(topic)
            if hit is None:
                hit = self._wants(topic)
            if not hit:
                filtered += 1
                continue
            push(_new_event(Event, (topic, body[1], publisher)))
        if bad:
            stats["bad_frames"] += bad
        if filtered:
            stats["filtered"] += filtered
        taken = len(self._buffer) - before
        stats["received"] += taken
        if last is not None:  # else no valid event yet: nothing to count gaps from
            self._last_seq[pid] = last
        if taken:
            self._readable.set()
        return taken

    async def _dispatch(self) -> None:
        async for event in self:
            handled = False
            for pattern, fn in self._handlers:
                if matches(pattern, event.topic):
                    handled = True
                    try:
                        await fn(event.data)
                    except Exception:  # one bad event must not stop the subscription
                        self.stats["handler_errors"] += 1
                        log.exception("subscriber %r handler for %r failed", self.name, event.topic)
            if not handled:
                self.stats["unmatched"] += 1
                count_unmatched(self.unmatched, event.topic, f"subscriber {self.name!r}",
                                "event")
