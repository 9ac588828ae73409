"""Requester: sends requests to whichever Responders advertise their type.

One :class:`~transport.rpc.RpcClient` (a *link*) per Responder it uses (same namespace
and key), kept by a :class:`~transport.mesh.dialing.LinkKeeper`: lazily and in bounded
numbers (``max_links``, ``dial_timeout``), a Responder being dialed only if it serves a
type the Requester declared in ``requests`` or has been asked to send (any type, when
it declared none), so a flood of fake beacons costs a trickle of dials, not a link each.
``await requester.send({"type": "t", ...}, timeout=5)``:

- waits (queued) until a Responder advertising ``t`` exists, up to the timeout;
- spreads requests round-robin over those Responders, preferring connected ones and
  skipping any whose circuit breaker is open;
- on a retryable error (the Responder vanished: ``Unreachable``; or it answered with
  an error marked ``retryable``) tries again, on another Responder when there is one,
  after a short backoff, at most ``retries`` times; a non-retryable error is raised at
  once; past the deadline, ``TimeoutError_`` says what was tried.
- at most ``max_pending`` requests may be outstanding: the next one gets ``QueueFull``
  at once instead of growing memory without bound.

``async for answer in requester.send_many(requests, window=100)`` keeps up to ``window``
requests in flight from one task and yields the answers in the order of ``requests``.
Many small requests then share frames both ways and no task is woken per request,
which is several times the throughput of as many tasks each awaiting ``send``.  Each
request still gets retries and fail-over (a retryable failure is sent again through
``send``); the first error ends the iteration unless ``return_exceptions=True``, which
yields the error in that request's place instead.
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import AbstractSet, Any, AsyncIterator, Iterable, Iterator

import trio

from transport.mesh.breaker import CircuitBreaker, backoff
from transport.errors import BadMessage, Closed, QueueFull, RemoteError, TimeoutError_
from transport.mesh.component import Component, _names
from transport.mesh.dialing import LinkKeeper
from transport.mesh.link_counts import keep_links_told
from transport.mesh.peers import Beacon, matches
from transport.mesh.strategies import RoundRobin, Strategy, strategy
from transport.rpc import RpcClient
from transport.rpc.client import PendingCall


MAX_WANTED = 1024      # request types remembered for dialing
DEFAULT_TIMEOUT = 10.0  # s, when neither the argument nor MESH_TIMEOUT says


@dataclass
class _Link:
    beacon: Beacon
    client: RpcClient
    breaker: CircuitBreaker
    sent: int = 0       # requests dispatched on it (its beacon's links: the monitor's graph)

    # What the LinkKeeper needs of it (closing fails its calls with Unreachable: they
    # fail over).
    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def in_flight(self) -> int:
        return self.client.pending

    async def wait_connected(self) -> None:
        await self.client.wait_connected()

    def close(self) -> None:
        self.client.close()


class Requester(Component):
    role = "requester"

    def __init__(self, name: str, *, requests: list[str] | tuple[str, ...] = (),
                 timeout: float | None = None, max_pending: int = 10_000, retries: int = 3,
                 breaker_threshold: int = 3, breaker_cooldown: float = 1.0,
                 spin: bool = True, max_links: int = 64, dial_timeout: float = 3.0,
                 balance: str | Strategy = "round-robin", **kw: Any) -> None:
        """``balance``: how it chooses among the Responders that can serve a request
        (transport/mesh/strategies.py): "round-robin", "random", "least-pending",
        "lowest-latency", or a Strategy."""
        super().__init__(name, **kw)
        if timeout is None:   # MESH_TIMEOUT (s), else cote's COTE_REQUEST_TIMEOUT (ms), else 10 s
            env = os.environ
            timeout = float(env["MESH_TIMEOUT"]) if env.get("MESH_TIMEOUT") else \
                float(env["COTE_REQUEST_TIMEOUT"]) / 1000 if env.get("COTE_REQUEST_TIMEOUT") \
                else DEFAULT_TIMEOUT
        if timeout <= 0 or max_pending < 1 or retries < 0 or breaker_threshold < 1:
            raise ValueError("need timeout > 0, max_pending >= 1, retries >= 0, breaker_threshold >= 1")
        self.requests = _names(requests, "requests")
        self._wanted: set[str] = set(self.requests)  # types whose Responders it dials
        self.timeout = timeout
        self.max_pending = max_pending
        self.retries = retries
        self.spin = spin
        self._breaker_threshold = breaker_threshold
        self._breaker_cooldown = breaker_cooldown
        self._links_changed = trio.Event()
        self._outstanding = 0
        self._candidates: dict[str, list[_Link]] = {}  # event -> links serving it
        self._turn = 0
        self.balance = strategy(balance)
        self._round_robin = type(self.balance) is RoundRobin   # the fast path of _pick
        self._learns = self.balance.learns
        self._started: dict[int, float] = {}   # id(call) -> when (send_many, learning strategies)
        self.stats = {"sent": 0, "answered": 0, "failed": 0, "retried": 0, "refused": 0,
                      "dial_failed": 0}
        self._keeper: LinkKeeper[_Link] = LinkKeeper(
            candidates=self._responders, dial=self._dial, stats=self.stats,
            changed=self._changed_links, max_links=max_links, dial_timeout=dial_timeout)
        self.links = self._keeper.links  # peer id -> link (read-only outside the keeper)

    def advertised(self) -> tuple[str, ...]:
        return self.requests

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- following discovery ------------------------------------------------------
    async def _serve(self, nursery: trio.Nursery) -> None:
        discovery = await self._start_discovery(nursery)
        nursery.start_soon(self._keeper.run, nursery, discovery)
        nursery.start_soon(keep_links_told, discovery, self._link_counts,
                           self.discovery_config.hello_interval)

    def _link_counts(self) -> list[tuple[str, int]]:
        """(Responder id, requests sent on its link) of every link it holds."""
        return [(pid, link.sent) for pid, link in self.links.items()]

    def _responders(self) -> list[Beacon]:
        """The Responders worth a link: serving what it declared or was asked for."""
        discovery = self.discovery
        assert discovery is not None, "links are kept only while it runs"
        return [b for b in discovery.peers() if b.role == "responder" and self._wants(b)]

    def _wants(self, b: Beacon) -> bool:
        if not self.requests or len(self._wanted) >= MAX_WANTED:
            return True  # declared nothing (or asked for too many types): any Responder
        return not b.types or any(matches(w, t) for w in self._wanted for t in b.types)

    def _want(self, event: str) -> None:
        """A request for ``event`` found no link: dial for it (the keeper does)."""
        if event not in self._wanted and len(self._wanted) < MAX_WANTED:
            self._wanted.add(event)
            self._keeper.poke()

    async def _dial(self, nursery: trio.Nursery, b: Beacon) -> _Link:
        rid = b.id.encode()
        client = RpcClient(b.endpoint, guard=self.guard(seals=b"request:" + rid,
                                                           opens=b"answer:" + rid),
                           spin=self.spin)
        await nursery.start(client.run)
        return _Link(b, client, CircuitBreaker(threshold=self._breaker_threshold,
                                               cooldown=self._breaker_cooldown))

    def _changed_links(self) -> None:
        self._candidates.clear()
        if self._learns:
            self.balance.keep(self.links.keys())
        self._links_changed.set()
        self._links_changed = trio.Event()

    # -- choosing -----------------------------------------------------------------
    def _pick(self, event: str, tried: AbstractSet[str], now: float,
              subset: str | None = None, to: str | None = None) -> _Link | None:
        """The link for one request of ``event``: among those serving it (and of
        ``subset``, or the Responder ``to``), connected ones whose breaker allows first,
        chosen by the balancing strategy; a fresh one still gets the request (nng queues
        it until the dial completes) when it is all there is."""
        if not self._round_robin or subset is not None or to is not None:
            return self._pick_by_strategy(event, tried, now, subset, to)
        candidates = self._candidates.get(event)
        if candidates is None:
            candidates = sorted((link for link in self.links.values()
                                 if not link.beacon.types
                                 or any(matches(t, event) for t in link.beacon.types)),
                                key=lambda link: link.beacon.id)
            if len(self._candidates) < 10_000:
                self._candidates[event] = candidates
        n = len(candidates)
        if not n:
            self._want(event)
            return None
        turn = self._turn
        fallback = None
        for i in range(n):
            link = candidates[(turn + i) % n]
            if link.beacon.id in tried or not link.breaker.allows(now):
                continue
            if link.client.connected:
                self._turn = turn + i + 1
                return link
            if fallback is None:
                fallback = link
                self._turn = turn + i + 1
        return fallback

    def _pick_by_strategy(self, event: str, tried: AbstractSet[str], now: float,
                          subset: str | None, to: str | None) -> _Link | None:
        candidates = [link for link in self.links.values()
                      if (not link.beacon.types or any(matches(t, event) for t in link.beacon.types))
                      and (subset is None or link.beacon.subset == subset)
                      and (to is None or link.beacon.id == to)]
        if not candidates:
            if to is None:
                self._want(event)
            return None
        candidates.sort(key=lambda link: link.beacon.id)
        ready = [link for link in candidates if link.beacon.id not in tried
                 and link.breaker.allows(now) and link.client.connected]
        if ready:
            chosen = self.balance.choose([link.beacon.id for link in ready])
            return next(link for link in ready if link.beacon.id == chosen)
        for link in candidates:      # none connected yet: a fresh link queues the request
            if link.beacon.id not in tried and link.breaker.allows(now):
                return link
        return None

    def _next_reopen(self, event: str, now: float) -> float | None:
        times = [link.breaker.opened_at + link.breaker.current_cooldown
                 for link in self.links.values() if link.breaker.state == "open"]
        return min(times) if times else None

    # -- sending ------------------------------------------------------------------
    def _check_running(self) -> None:
        scope = self._scope
        if self.discovery is None or scope is None or scope.cancel_called \
                or not self._ready.is_set():
            raise Closed(f"requester {self.name!r} is not running")

    def _admit(self, request: Any) -> None:
        """The checks every request passes before it counts as outstanding (with
        :meth:`_check_running`)."""
        if type(request) is not dict and not isinstance(request, dict):
            raise BadMessage("a request is a dict with a non-empty string 'type'")
        event = request.get("type")
        if type(event) is not str or not event:
            raise BadMessage("a request is a dict with a non-empty string 'type'")
        if self._outstanding >= self.max_pending:
            self.stats["refused"] += 1
            raise QueueFull(f"requester {self.name!r} already has {self.max_pending} "
                            f"requests outstanding")

    async def send(self, request: dict[str, Any], *, timeout: float | None = None,
                   chunks: Any = None, subset: str | None = None, to: str | None = None) -> Any:
        """The answer to ``request``.  ``chunks`` (an iterable or async iterable) makes
        it a chunked request, read by an ``async def handler(req, chunks)``; such a
        request waits for a Responder like any other but is sent once: a failure after
        that is raised, not retried (its chunks cannot be sent twice).  ``subset`` (or
        ``"__subset"`` in the request, as in cote): only a Responder of that subset
        serves it; ``to``: only the Responder of that id (its beacon's).  A request
        nobody can serve waits, like any, until one appears or its timeout passes."""
        self._admit(request)
        self._check_running()
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sends nothing
        limit = self.timeout if timeout is None else timeout
        if subset is None and "__subset" in request:
            wanted = request["__subset"]
            subset = wanted if isinstance(wanted, str) and wanted else None
        self._outstanding += 1
        self.stats["sent"] += 1
        try:
            result = await self._deliver(request["type"], request, limit, chunks, subset, to)
        except BaseException:
            self.stats["failed"] += 1
            raise
        finally:
            self._outstanding -= 1
        self.stats["answered"] += 1
        return result

    async def _deliver(self, event: str, request: dict[str, Any], limit: float,
                       chunks: Any = None, subset: str | None = None,
                       to: str | None = None) -> Any:
        now = trio.current_time()
        deadline = now + limit
        tried: AbstractSet[str] = _NONE_TRIED  # a set of its own once one has failed
        attempt = 0
        last_error: RemoteError | None = None
        dispatched = False
        while True:
            if now >= deadline:
                break
            link = self._pick(event, tried, now, subset, to)
            if link is None:
                if tried:           # every candidate failed once: start over (after backoff)
                    tried = set()
                    now = trio.current_time()
                    continue
                wake = self._next_reopen(event, now)
                with trio.move_on_at(min(deadline, wake + 0.001) if wake else deadline):
                    await self._links_changed.wait()
                now = trio.current_time()
                continue
            dispatched = True
            link.breaker.on_dispatch()
            link.sent += 1
            learns, rid = self._learns, link.beacon.id
            if learns:
                self.balance.sent(rid)
            client = link.client
            try:
                if chunks is None:  # client.call's steps, without a coroutine of its own
                    call = client.start(self.namespace, event, request,
                                        timeout=deadline - now, now=now)
                    try:
                        await client.finish(call)
                    finally:
                        if not call.done:  # cancelled while waiting
                            call.cancel()
                    result = call.outcome()
                else:
                    result = await client.call(self.namespace, event, request,
                                               timeout=deadline - now, chunks=chunks)
            except BaseException as exc:
                if learns:
                    self.balance.answered(rid, trio.current_time() - now,
                                          isinstance(exc, RemoteError) and not exc.retryable)
                if isinstance(exc, TimeoutError_):
                    link.breaker.on_failure(trio.current_time())
                    last_error = exc
                    break
                if not isinstance(exc, RemoteError):
                    raise
                if not exc.retryable:
                    link.breaker.on_success()  # it answered: alive, the request is at fault
                    raise
                link.breaker.on_failure(trio.current_time())
                last_error = exc
                attempt += 1
                if attempt > self.retries or chunks is not None:  # chunks go once
                    raise
                self.stats["retried"] += 1
                tried = {*tried, link.beacon.id}
                await trio.sleep(min(backoff(attempt), max(0.0, deadline - trio.current_time())))
                now = trio.current_time()
            else:
                if learns:
                    self.balance.answered(rid, trio.current_time() - now, True)
                link.breaker.on_success()
                return result
        if not dispatched:
            raise TimeoutError_(f"no responder advertising {event!r} in namespace "
                                f"{self.namespace!r} appeared within {limit:g} s")
        detail = f"; last error: {last_error}" if last_error else ""
        raise TimeoutError_(f"no answer to {event!r} within {limit:g} s{detail}")

    # -- many in flight from one task -----------------------------------------------
    async def send_many(self, requests: Iterable[dict[str, Any]], *, window: int = 100,
                        timeout: float | None = None,
                        return_exceptions: bool = False) -> AsyncIterator[Any]:
        """Send ``requests`` (any iterable, even an endless generator) keeping up to
        ``window`` in flight, and yield their answers in order (module docstring).
        ``timeout`` bounds each request, as for :meth:`send`.  Leave the loop early
        inside ``async with contextlib.aclosing(...)`` to give up the rest at once."""
        if window < 1:
            raise ValueError("window must be at least 1")
        limit = self.timeout if timeout is None else timeout
        source = iter(requests)
        in_flight: deque[tuple[dict[str, Any], _Link | None, Any]] = deque()
        # Refill in bursts of half a window: a burst leaves as one frame and its answers
        # come back close together.  Topping up one request per answer settles into a
        # frame per request each way, and every frame costs both processes a wake-up.
        refill_at = window - max(1, window // 2)
        try:
            while True:
                if len(in_flight) <= refill_at:
                    self._refill(source, in_flight, window, limit)
                if not in_flight:
                    return
                request, link, call = in_flight.popleft()
                if type(call) is PendingCall and call.done and call.error is None \
                        and not call.expired and not call.streamed:
                    # Answered already, with a plain value: the common case, kept short.
                    assert link is not None, "a started call has its link"
                    self._outstanding -= 1
                    self.stats["answered"] += 1
                    link.breaker.on_success()
                    if self._learns:
                        self._learn(link, call, True)
                    answer = call.items[0]
                else:
                    try:
                        answer = await self._landed(request, link, call, limit)
                    except RemoteError as exc:
                        if not return_exceptions:
                            raise
                        answer = exc
                yield answer
        finally:
            for _, link, call in in_flight:  # left early: the rest are given up
                if isinstance(call, PendingCall):
                    call.cancel()
                    self._outstanding -= 1
                    if self._learns and link is not None:
                        self._learn(link, call, False)

    def _refill(self, source: Iterator[Any], in_flight: deque[tuple[Any, _Link | None, Any]],
                window: int, limit: float) -> None:
        """Start requests from ``source`` until ``window`` are in flight.  One link per
        request type per burst (round-robin moves on burst by burst), and the links
        hold their sends until the burst is complete, so it leaves as one frame each."""
        self._check_running()
        chosen: dict[str, _Link | None] = {}
        now = trio.current_time()
        started = 0
        for each in self.links.values():
            each.client.hold(True)
        try:
            while len(in_flight) < window:
                request: Any = next(source, _END)
                if request is _END:
                    break
                try:
                    self._admit(request)
                except RemoteError as exc:  # not a request, or too many outstanding:
                    in_flight.append((request, None, exc))  # its answer, in its place
                    continue
                event = request["type"]
                if "__subset" in request:   # directed: send() chooses for it, in its turn
                    in_flight.append((request, None, None))
                    continue
                if event in chosen:
                    link = chosen[event]
                else:
                    link = chosen[event] = self._pick(event, _NONE_TRIED, now)
                if link is None:  # nobody serves it yet: send() waits for one in its turn
                    in_flight.append((request, None, None))
                    continue
                try:
                    call = link.client.start(self.namespace, event, request, timeout=limit,
                                             now=now)
                except RemoteError as exc:  # e.g. a payload msgpack cannot carry
                    in_flight.append((request, None, exc))
                    continue
                if link.breaker.state != "closed":  # half-open: one trial, not a burst
                    link.breaker.on_dispatch()
                    del chosen[event]
                self._outstanding += 1
                started += 1
                link.sent += 1
                in_flight.append((request, link, call))
                if self._learns:
                    self.balance.sent(link.beacon.id)
                    self._started[id(call)] = now
            self.stats["sent"] += started
        finally:
            for each in self.links.values():
                each.client.hold(False)

    async def _landed(self, request: dict[str, Any], link: _Link | None, call: Any,
                      limit: float) -> Any:
        """The answer of one request started by :meth:`_refill`."""
        if call is None:
            return await self.send(request, timeout=limit)
        if not isinstance(call, PendingCall):
            raise call
        assert link is not None, "a started call has its link"
        try:
            while not call.done:
                await call.wait()
        except BaseException:
            call.cancel()  # cancelled while waiting: the server can stop too
            self._outstanding -= 1
            if self._learns:
                self._learn(link, call, False)
            raise
        self._outstanding -= 1
        if self._learns:
            self._learn(link, call, call.error is None or not call.error.retryable)
        try:
            answer = call.outcome()
        except TimeoutError_:
            link.breaker.on_failure(trio.current_time())
            self.stats["failed"] += 1
            raise
        except RemoteError as exc:
            if not exc.retryable:
                link.breaker.on_success()  # it answered: alive, the request is at fault
                self.stats["failed"] += 1
                raise
            link.breaker.on_failure(trio.current_time())
            self.stats["retried"] += 1
            left = call.deadline - trio.current_time() if call.deadline != math.inf else limit
            return await self.send(request, timeout=max(left, 0.001))  # fail over
        link.breaker.on_success()
        self.stats["answered"] += 1
        return answer


    def _learn(self, link: _Link, call: PendingCall, ok: bool) -> None:
        """A call started by send_many ended: tell a learning strategy how it went."""
        started = self._started.pop(id(call), None)
        if started is not None:
            self.balance.answered(link.beacon.id, trio.current_time() - started, ok)


_END = object()
_NONE_TRIED: frozenset[str] = frozenset()
