"""One namespace's bridge: its mesh link and the browsers connected to it.

A :class:`NamespaceHub` opens its mesh link when the first browser arrives and closes
it ``linger`` seconds after the last one leaves (a page reload does not rediscover the
mesh).  Events are encoded to JSON once and pushed, without waiting, into every
browser's bounded :class:`~sockend.protocol.EventOutbox`; each browser has its own
writer task, so a slow one skips events or is evicted, and never holds back the rest.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import trio

from sockend.bridge import Mesh, NamespaceLink
from sockend.protocol import EVICT, QUEUED, EventOutbox, event_frame

log = logging.getLogger(__name__)


class Client:
    """One connected browser."""

    def __init__(self, ws, namespace: str, outbox: EventOutbox, remote: str = ""):
        self.ws = ws
        self.namespace = namespace
        self.outbox = outbox
        self.remote = remote
        self.inflight = 0
        self.uploads: dict = {}           # request id -> InputStream of an upload in progress
        self.evicted = False
        self.scope = trio.CancelScope()   # cancelled to evict
        self._wake = trio.Event()

    def push(self, frame: str) -> str:
        result = self.outbox.push(frame)
        if result == QUEUED:
            self._wake.set()
        elif result == EVICT:
            self.evicted = True
            self.scope.cancel()
        return result

    async def next_frame(self) -> str:
        while True:
            frame = self.outbox.pop()
            if frame is not None:
                return frame
            self._wake = trio.Event()
            await self._wake.wait()


class NamespaceHub:
    def __init__(self, namespace: str, mesh: Mesh, stats: dict[str, int], *, linger: float):
        self.namespace = namespace
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
        frame = event_frame(topic, data)
        stats = self.stats
        stats["events_in"] += 1
        if frame is None:
            stats["events_unserializable"] += 1
            return
        for client in list(self.clients):
            if client.evicted:
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
