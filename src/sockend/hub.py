"""One namespace's bridge: its mesh link and the browsers connected to it.

A :class:`NamespaceHub` opens its mesh link when the first browser arrives and closes
it ``linger`` seconds after the last one leaves (a page reload does not rediscover the
mesh).  Events are encoded once per protocol (Sockend's JSON, Socket.IO's packets) and
pushed, without waiting, into the bounded :class:`~sockend.protocol.EventOutbox` of
every browser they are for (all of the namespace, or the members of the rooms an event
names with cote's ``__room``/``__rooms``); each browser has its own
writer task, so a slow one skips events or is evicted, and never holds back the rest.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import trio

from sockend.bridge import Mesh, NamespaceLink
from sockend.hooks import Browser
from sockend.protocol import EVICT, QUEUED, EventOutbox

log = logging.getLogger(__name__)

# How one protocol writes an event for its browsers: (namespace, topic, data) -> the
# frame its outboxes hold, or None when the data cannot be carried (counted).
EventFormat = Callable[[str, str, Any], Any]
ROOM_KEYS = ("__room", "__rooms")   # cote's: a Publisher addresses an event to rooms


class Client:
    """One browser in one namespace: its bounded event outbox, its rooms (through
    ``browser``), and how its writer is woken (``wake``; default: :meth:`next_frame`)."""

    def __init__(self, namespace: str, outbox: EventOutbox, browser: Browser, *,
                 event_format: str = "sockend", ws: Any = None,
                 wake: Callable[[], None] | None = None):
        self.ws = ws                      # Sockend's own protocol: its websocket
        self.namespace = namespace
        self.outbox = outbox
        self.browser = browser
        self.remote = browser.handshake.remote
        self.event_format = event_format
        self.inflight = 0
        self.uploads: dict[Any, Any] = {}           # request id -> InputStream of an upload in progress
        self.evicted = False
        self.scope = trio.CancelScope()   # cancelled to evict
        self._wake_event = trio.Event()
        self._wake = wake

    @property
    def rooms(self) -> set[str]:
        return self.browser.rooms

    def push(self, frame: Any) -> str:
        result = self.outbox.push(frame)
        if result == QUEUED:
            if self._wake is not None:
                self._wake()
            else:
                self._wake_event.set()
        elif result == EVICT:
            self.evicted = True
            self.scope.cancel()
        return result

    async def next_frame(self) -> Any:
        while True:
            frame = self.outbox.pop()
            if frame is not None:
                return frame
            self._wake_event = trio.Event()
            await self._wake_event.wait()


def split_rooms(data: Any) -> tuple[Any, frozenset[str] | None]:
    """An event's data without cote's ``__room``/``__rooms`` keys, and the rooms they
    name (None: the event is for every browser of the namespace)."""
    if not isinstance(data, dict) or not any(k in data for k in ROOM_KEYS):
        return data, None
    data = dict(data)
    rooms: set[str] = set()
    one = data.pop("__room", None)
    many = data.pop("__rooms", None)
    if isinstance(one, str):
        rooms.add(one)
    if isinstance(many, (list, tuple)):
        rooms.update(r for r in many if isinstance(r, str))
    return data, frozenset(rooms)


class NamespaceHub:
    def __init__(self, namespace: str, mesh: Mesh, stats: dict[str, int], *, linger: float,
                 formats: Mapping[str, EventFormat]):
        self.namespace = namespace
        self.formats = formats
        self.mesh = mesh
        self.stats = stats
        self.linger = linger
        self.clients: set[Client] = set()
        self.link: NamespaceLink | None = None
        self.ready = trio.Event()       # set once the link is open, or the hub gave up
        self.failure: BaseException | None = None
        self.closing = False            # set (without a checkpoint) when it stops taking clients
        self._membership = trio.Event()

    # -- clients --------------------------------------------------------------------
    def add(self, client: Client) -> None:
        self.clients.add(client)
        self._membership.set()

    def remove(self, client: Client) -> None:
        self.clients.discard(client)
        self._membership.set()

    def deliver(self, topic: str, data: Any) -> None:
        """One published event to every browser it is for, each protocol's frame built
        once (and only for protocols that have browsers here)."""
        stats = self.stats
        stats["events_in"] += 1
        data, rooms = split_rooms(data)
        frames: dict[str, Any] = {}
        for client in list(self.clients):
            if client.evicted or (rooms is not None and rooms.isdisjoint(client.rooms)):
                continue
            fmt = client.event_format
            if fmt in frames:
                frame = frames[fmt]
            else:
                frame = frames[fmt] = self.formats[fmt](self.namespace, topic, data)
                if frame is None:
                    stats["events_unserializable"] += 1
            if frame is None:
                continue
            result = client.push(frame)
            if result != QUEUED:
                stats["events_skipped"] += 1
                if result == EVICT:
                    stats["evicted"] += 1

    # -- lifetime -------------------------------------------------------------------
    async def run(self, on_exit: Callable[["NamespaceHub"], None]) -> None:
        try:
            async with self.mesh.open(self.namespace) as link:
                self.link = link
                self.ready.set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link)
                    await self._until_idle()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # the mesh could not start: tell the waiting browsers
            log.exception("sockend: namespace %r bridge failed", self.namespace)
            self.failure = exc
        finally:
            self.closing = True
            self.ready.set()
            if self.failure is not None:
                for client in list(self.clients):   # they reconnect to a fresh hub
                    client.scope.cancel()
            on_exit(self)

    async def _pump(self, link: NamespaceLink) -> None:
        while True:
            for topic, data in await link.next_events():
                self.deliver(topic, data)

    async def _until_idle(self) -> None:
        while True:
            while self.clients:
                self._membership = trio.Event()
                await self._membership.wait()
            self._membership = trio.Event()
            with trio.move_on_after(self.linger):
                await self._membership.wait()
            if not self.clients:
                self.closing = True   # no checkpoint between the check and this
                return
