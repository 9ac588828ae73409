"""Requester: sends requests to whichever Responders advertise their type.

One :class:`~transport.rpc.RpcClient` per discovered Responder (same namespace and
key).  ``await requester.send({"type": "t", ...}, timeout=5)``:

- waits (queued) until a Responder advertising ``t`` exists, up to the timeout;
- spreads requests round-robin over those Responders, preferring connected ones and
  skipping any whose circuit breaker is open;
- on a retryable error (the Responder vanished: ``Unreachable``; or it answered with
  an error marked ``retryable``) tries again, on another Responder when there is one,
  after a short backoff, at most ``retries`` times; a non-retryable error is raised at
  once; past the deadline, ``TimeoutError_`` says what was tried.
- at most ``max_pending`` requests may be outstanding: the next one gets ``QueueFull``
  at once instead of growing memory without bound.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from .breaker import CircuitBreaker, backoff
from .errors import BadMessage, Closed, QueueFull, RemoteError, TimeoutError_
from .mesh import Component, _names
from .peers import Beacon
from .rpc import RpcClient


@dataclass
class _Link:
    beacon: Beacon
    client: RpcClient
    breaker: CircuitBreaker


class Requester(Component):
    role = "requester"

    def __init__(self, name: str, *, requests: list[str] | tuple[str, ...] = (),
                 timeout: float = 10.0, max_pending: int = 10_000, retries: int = 3,
                 breaker_threshold: int = 3, breaker_cooldown: float = 1.0, **kw):
        super().__init__(name, **kw)
        if timeout <= 0 or max_pending < 1 or retries < 0 or breaker_threshold < 1:
            raise ValueError("need timeout > 0, max_pending >= 1, retries >= 0, breaker_threshold >= 1")
        self.requests = _names(requests, "requests")
        self.timeout = timeout
        self.max_pending = max_pending
        self.retries = retries
        self._breaker_args = dict(threshold=breaker_threshold, cooldown=breaker_cooldown)
        self.links: dict[str, _Link] = {}
        self._links_changed = trio.Event()
        self._outstanding = 0
        self._candidates: dict[str, list[_Link]] = {}  # event -> links serving it
        self._turn = 0
        self.stats = {"sent": 0, "answered": 0, "failed": 0, "retried": 0, "refused": 0}

    def advertised(self) -> tuple[str, ...]:
        return self.requests

    @property
    def outstanding(self) -> int:
        return self._outstanding

    # -- following discovery ------------------------------------------------------
    async def _serve(self, nursery: trio.Nursery) -> None:
        await self._start_discovery(nursery)
        nursery.start_soon(self._follow, nursery)

    async def _follow(self, nursery: trio.Nursery) -> None:
        seen = -1
        while True:
            seen = await self.discovery.wait_change(seen)
            await self._reconcile(nursery)

    async def _reconcile(self, nursery: trio.Nursery) -> None:
        wanted = {b.id: b for b in self.discovery.peers() if b.role == "responder" and b.endpoint}
        for pid in list(self.links):
            b = wanted.get(pid)
            if b is None or b.endpoint != self.links[pid].beacon.endpoint:
                # Closing fails its in-flight calls with Unreachable: they fail over.
                self.links.pop(pid).client.close()
        for pid, b in wanted.items():
            link = self.links.get(pid)
            if link is None:
                client = RpcClient(b.endpoint, guard=self.guard(b"rpc"))
                await nursery.start(client.run)
                self.links[pid] = _Link(b, client, CircuitBreaker(**self._breaker_args))
            else:
                link.beacon = b
        self._candidates.clear()
        self._links_changed.set()
        self._links_changed = trio.Event()

    # -- choosing -----------------------------------------------------------------
    def _pick(self, event: str, tried: set[str], now: float) -> _Link | None:
        """Round-robin over the links serving ``event``: connected ones whose breaker
        allows first; a fresh one still gets the request (nng queues it until the dial
        completes) when it is all there is."""
        candidates = self._candidates.get(event)
        if candidates is None:
            candidates = [self.links[b.id] for b in
                          self.discovery.table.serving("responder", event) if b.id in self.links]
            if len(self._candidates) < 10_000:
                self._candidates[event] = candidates
        n = len(candidates)
        if not n:
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

    def _next_reopen(self, event: str, now: float) -> float | None:
        times = [link.breaker.opened_at + link.breaker.current_cooldown
                 for link in self.links.values() if link.breaker.state == "open"]
        return min(times) if times else None

    # -- sending ------------------------------------------------------------------
    async def send(self, request: dict, *, timeout: float | None = None) -> Any:
        if not isinstance(request, dict) or not isinstance(request.get("type"), str) \
                or not request["type"]:
            raise BadMessage("a request is a dict with a non-empty string 'type'")
        if self.discovery is None or not self._ready.is_set() or self._scope.cancel_called:
            raise Closed(f"requester {self.name!r} is not running")
        if self._outstanding >= self.max_pending:
            self.stats["refused"] += 1
            raise QueueFull(f"requester {self.name!r} already has {self.max_pending} "
                            f"requests outstanding")
        limit = self.timeout if timeout is None else timeout
        self._outstanding += 1
        self.stats["sent"] += 1
        try:
            result = await self._deliver(request["type"], request, limit)
        except BaseException:
            self.stats["failed"] += 1
            raise
        finally:
            self._outstanding -= 1
        self.stats["answered"] += 1
        return result

    async def _deliver(self, event: str, request: dict, limit: float) -> Any:
        deadline = trio.current_time() + limit
        tried: set[str] = set()
        attempt = 0
        last_error: RemoteError | None = None
        dispatched = False
        while True:
            now = trio.current_time()
            if now >= deadline:
                break
            link = self._pick(event, tried, now)
            if link is None:
                if tried:           # every candidate failed once: start over (after backoff)
                    tried.clear()
                    continue
                wake = self._next_reopen(event, now)
                with trio.move_on_at(min(deadline, wake + 0.001) if wake else deadline):
                    await self._links_changed.wait()
                continue
            dispatched = True
            link.breaker.on_dispatch()
            try:
                result = await link.client.call(self.namespace, event, request,
                                                timeout=deadline - now)
            except TimeoutError_ as exc:
                link.breaker.on_failure(trio.current_time())
                last_error = exc
                break
            except RemoteError as exc:
                if not exc.retryable:
                    link.breaker.on_success()  # it answered: alive, the request is at fault
                    raise
                link.breaker.on_failure(trio.current_time())
                last_error = exc
                attempt += 1
                if attempt > self.retries:
                    raise
                self.stats["retried"] += 1
                tried.add(link.beacon.id)
                await trio.sleep(min(backoff(attempt), max(0.0, deadline - trio.current_time())))
            else:
                link.breaker.on_success()
                return result
        if not dispatched:
            raise TimeoutError_(f"no responder advertising {event!r} in namespace "
                                f"{self.namespace!r} appeared within {limit:g} s")
        detail = f"; last error: {last_error}" if last_error else ""
        raise TimeoutError_(f"no answer to {event!r} within {limit:g} s{detail}")
