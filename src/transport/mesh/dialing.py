"""Links to the peers a component needs, made lazily and in bounded numbers.

A Requester needs links to Responders, a Subscriber to Publishers; both learn of them
from discovery, and on an open mesh anyone can announce anything.  Dialing every peer
heard of would let a flood of fake beacons cost a socket and tasks each (5,000 fake
Responders once gave a Requester 2,682 links and p50 0.5 -> 68 ms).  So a
:class:`LinkKeeper`

- dials only the candidates its component names (peers serving what it needs), the
  longest known first, at most ``max_links`` links in all and at most ``MAX_DIALING``
  of them still connecting at a time;
- drops a link that has not connected within ``dial_timeout`` and backs its peer off
  (:class:`~transport.mesh.breaker.DialBackoff`: not dialed again for ``dial_timeout``
  seconds, doubling per failure up to a minute), so peers that never answer cost a
  trickle of dials;
- beacons decide whom to connect to; a connection's own health decides when it is
  dead.  A peer whose beacons stop (not heard for the expiry: a busy host, lost
  datagrams) keeps its link while that link is connected: work goes on flowing to it,
  and the link goes when it breaks.  A peer that said ``bye`` (it is draining), or
  changed endpoint, gets no new work; its link is closed, but only once it carries no
  request (closing it would cancel a running handler, and the request would run
  twice).  It reconciles whenever discovery changes, a dial ends, a kept link breaks,
  its component pokes it (it needs something new), or a backed-off peer may be dialed
  again.
"""
from __future__ import annotations

import math
from typing import Awaitable, Callable, Generic, Iterable, Protocol, TypeVar

import trio

from transport.mesh.breaker import DialBackoff
from transport.mesh.discovery import Discovery
from transport.mesh.peers import Beacon

MAX_DIALING = 4   # links still connecting at a time
IDLE_CHECK = 0.05  # s between looks at a departed peer's link that still carries requests


class DialedLink(Protocol):
    """What the keeper needs of a link."""

    beacon: Beacon

    @property
    def connected(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    async def wait_connected(self) -> None: ...
    def close(self) -> None: ...


L = TypeVar("L", bound=DialedLink)


class LinkKeeper(Generic[L]):
    """``candidates()`` names the peers worth a link now (in order of preference);
    ``dial(nursery, beacon)`` makes one (started in ``nursery``); ``changed()`` is
    called after every reconciliation and drop; ``dropped(peer_id)`` when a link goes.
    Failed dials are counted in ``stats["dial_failed"]`` (the component's stats)."""

    def __init__(self, *, candidates: Callable[[], Iterable[Beacon]],
                 dial: Callable[[trio.Nursery, Beacon], Awaitable[L]],
                 stats: dict[str, int],
                 changed: Callable[[], None] = lambda: None,
                 dropped: Callable[[str], None] = lambda peer_id: None,
                 max_links: int = 64, dial_timeout: float = 3.0) -> None:
        if max_links < 1 or dial_timeout <= 0:
            raise ValueError("need max_links >= 1 and dial_timeout > 0")
        self.links: dict[str, L] = {}
        self.max_links = max_links
        self.dial_timeout = dial_timeout
        self.backoff = DialBackoff(base=dial_timeout)
        self.stats = stats
        stats.setdefault("dial_failed", 0)
        self._candidates = candidates
        self._dial = dial
        self._changed = changed
        self._dropped = dropped
        self._dirty = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._discovery: Discovery | None = None
        self.retiring: dict[str, L] = {}   # links of departed peers, finishing their requests
        self.silent: set[str] = set()      # peers not heard for the expiry, links kept

    def poke(self) -> None:
        """Reconcile soon (the component needs something it may not have a link for)."""
        self._dirty.set()

    async def run(self, nursery: trio.Nursery, discovery: Discovery) -> None:
        """Keep the links (forever); links and their watchers live in ``nursery``."""
        self._nursery = nursery
        self._discovery = discovery
        nursery.start_soon(self._watch_discovery, discovery)
        while True:
            self._dirty = trio.Event()
            await self._reconcile(nursery)
            due = self.backoff.next_due(trio.current_time())
            with trio.move_on_at(math.inf if due is None else due):
                await self._dirty.wait()

    async def _watch_discovery(self, discovery: Discovery) -> None:
        seen = -1
        while True:
            seen = await discovery.wait_change(seen)
            self._dirty.set()

    def _drop(self, peer_id: str) -> None:
        link = self.links.pop(peer_id)
        self._dropped(peer_id)
        if link.connected and link.in_flight and self._nursery is not None:
            self.retiring[peer_id] = link       # no new work; what it carries finishes
            self._nursery.start_soon(self._close_when_idle, peer_id, link)
        else:
            link.close()

    async def _watch_silent(self, peer_id: str, link: L) -> None:
        """A silent peer's link is kept while connected: reconcile when it breaks (or
        the peer is heard again)."""
        while link.connected and peer_id in self.silent and self.links.get(peer_id) is link:
            await trio.sleep(IDLE_CHECK)
        self._dirty.set()

    async def _close_when_idle(self, peer_id: str, link: L) -> None:
        """Close a departed peer's link once its requests are answered (their own
        deadlines bound the wait) or it broke."""
        try:
            while link.connected and link.in_flight:
                await trio.sleep(IDLE_CHECK)
        finally:
            link.close()
            if self.retiring.get(peer_id) is link:
                del self.retiring[peer_id]

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        wanted = {b.id: b for b in self._candidates() if b.endpoint}
        departed = self._discovery.departed if self._discovery is not None else {}
        for pid, link in list(self.links.items()):
            b = wanted.get(pid)
            if b is None and link.connected and pid not in departed:
                if pid not in self.silent:     # silent, not gone: its connection says
                    self.silent.add(pid)
                    nursery.start_soon(self._watch_silent, pid, link)
                continue
            self.silent.discard(pid)
            if b is None or b.endpoint != link.beacon.endpoint:
                self._drop(pid)
            else:
                link.beacon = b
        now = trio.current_time()
        dialing = sum(1 for link in self.links.values() if not link.connected)
        for pid, b in wanted.items():
            if len(self.links) >= self.max_links or dialing >= MAX_DIALING:
                break
            if pid in self.links or not self.backoff.allows(pid, now):
                continue
            link = await self._dial(nursery, b)
            self.links[pid] = link
            nursery.start_soon(self._watch_dial, link)
            dialing += 1
        self._changed()

    async def _watch_dial(self, link: L) -> None:
        """A link not connected within ``dial_timeout`` is dropped and its peer backed
        off; either way a dial slot is free for the next candidate."""
        pid = link.beacon.id
        with trio.move_on_after(self.dial_timeout):
            await link.wait_connected()
            self.backoff.succeeded(pid)
            self._dirty.set()
            return
        if self.links.get(pid) is link and not link.connected:
            self._drop(pid)
            self.backoff.failed(pid, trio.current_time())
            self.stats["dial_failed"] += 1
            self._changed()
            self._dirty.set()
