"""Where an app request runs in a cluster, and how it gets there and back.

:class:`Forwarding` asks the :class:`~engine.cluster.balance.BalanceTable` for the node
to run a request on (ours or a connected peer's), runs it here or sends it as
``cluster.run`` (a verb that always runs locally: one hop at most), relays the answer
(a value or a stream of chunks), and falls back to the next node when one did not run
it (``NOT_RUN``).  It needs only a :class:`ClusterView` of the cluster service.

Liveness.  A forward has no deadline of its own (a job may rightly take minutes), but
it waits only on a peer that is heard from: the service's status exchanges (every
``report_interval``) and every reply call :meth:`Forwarding.heard_from`.  A watchdog
fails the forwards to a peer silent for ``suspect_after`` seconds, and
:meth:`Forwarding.lost` (the peer left, or stopped answering status) fails them at once,
with :class:`~engine.errors.PeerLost`: the request may have run there, so it is not
retried elsewhere (that is how a partition used to run it twice).  On the other side the
peer runs each ``cluster.run`` in a cancel scope filed under the node that sent it
(``from``), and cancels them when it loses that node: nobody waits for their answers.
"""
from __future__ import annotations

from typing import Any, AsyncGenerator, Awaitable, Callable, Mapping, Protocol, TypeVar, cast

import trio

from transport.errors import QueueFull, RemoteError, Unreachable
from transport.rpc import RpcClient, Stream

from engine.app import App
from engine.cluster.balance import AppLoad, BalanceTable
from engine.errors import AppBroken, AppNotFound, PeerLost, ShuttingDown
from engine.node.control import answer

# Errors that mean "this node did not run the request": another node may.
NOT_RUN = (Unreachable, QueueFull, AppNotFound, ShuttingDown, AppBroken)

T = TypeVar("T")


class ClusterView(Protocol):
    """What forwarding needs of the cluster service (:class:`engine.cluster.service.Cluster`)."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def table(self) -> BalanceTable: ...

    @property
    def stats(self) -> dict[str, int]: ...

    def links(self) -> Mapping[str, RpcClient]:
        """Peer id -> its control client (connected or not)."""
        ...

    def local_app(self, app: str) -> App | None:
        """This node's app of that name, if it runs one."""
        ...

    def app_load(self, app: App) -> AppLoad: ...

    def wanted_digest(self, app: str) -> str | None:
        """The content the cluster's catalog says ``app`` runs at (only nodes reporting
        it are routed to), or None: no record, any node hosting the app will do."""
        ...


class Forwarding:
    def __init__(self, cluster: ClusterView, *, suspect_after: float = 1.5, tick: float = 0.25):
        self.cluster = cluster
        self.suspect_after = suspect_after
        self.tick = tick
        self.stats = {"peer_lost": 0, "orphans_cancelled": 0}
        self._heard: dict[str, float] = {}                       # peer -> last heard (trio clock)
        self._waiting: dict[str, dict[trio.CancelScope, str]] = {}   # peer -> forwards (-> why failed)
        self._served: dict[str, set[trio.CancelScope]] = {}      # origin -> jobs run for it

    # -- liveness --------------------------------------------------------------------------
    def heard_from(self, pid: str, now: float) -> None:
        self._heard[pid] = max(now, self._heard.get(pid, now))

    def lost(self, pid: str, why: str) -> None:
        """The peer left or stopped answering: fail the forwards waiting on it, and cancel
        the jobs this node runs for it (their answers have nowhere to go)."""
        self._heard.pop(pid, None)
        for scope in (waiting := self._waiting.get(pid, {})):
            if not scope.cancel_called:
                waiting[scope] = why
                scope.cancel()
        for scope in self._served.get(pid, ()):
            if not scope.cancel_called:
                self.stats["orphans_cancelled"] += 1
                scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The watchdog: fail forwards to a peer silent for ``suspect_after`` seconds."""
        task_status.started()
        while True:
            await trio.sleep(self.tick)
            now = trio.current_time()
            for pid, waiting in list(self._waiting.items()):
                silent = now - self._heard.get(pid, now)
                if waiting and silent > self.suspect_after:
                    self.lost(pid, f"silent for {silent:.1f} s")

    async def _from_peer(self, pid: str, step: Callable[[], Awaitable[T]]) -> T:
        """Await ``step`` (the next reply from ``pid``) unless the peer is lost first."""
        scope = trio.CancelScope()
        waiting = self._waiting.setdefault(pid, {})
        waiting[scope] = ""
        self._heard.setdefault(pid, trio.current_time())
        try:
            with scope:
                value = await step()
                self.heard_from(pid, trio.current_time())
                return value
        finally:
            why = waiting.pop(scope, "")
            if not waiting and self._waiting.get(pid) is waiting:
                del self._waiting[pid]
        self.stats["peer_lost"] += 1
        raise PeerLost(f"node {pid} of cluster {self.cluster.name} was lost ({why}) before it "
                       f"answered; the request may or may not have run there")

    async def run_for_peer(self, origin: str, app: str, event: str, payload: Any) -> Any:
        """``cluster.run``: run a request a peer forwarded, cancelled if that peer is lost."""
        self.cluster.stats["served_for_peers"] += 1
        scope = trio.CancelScope()
        served = self._served.setdefault(origin, set())
        served.add(scope)
        try:
            with scope:
                return await self.run_local(app, event, payload)
        finally:
            served.discard(scope)
            if not served and self._served.get(origin) is served:
                del self._served[origin]
        raise PeerLost(f"node {origin}, which sent this request, was lost: cancelled")

    def route(self, app: str, event: str = "", payload: Any = None, *,
              exclude: set[str] | frozenset[str] = frozenset()) -> str | None:
        """The node id to run this request on (ours or a connected peer's), or None."""
        cluster, table = self.cluster, self.cluster.table
        now = trio.current_time()
        local = cluster.local_app(app)
        table.set_app_load(cluster.id, app, None if local is None else cluster.app_load(local), now)
        links = cluster.links()
        down = {pid for pid in table.ids() if pid != cluster.id
                and not (pid in links and links[pid].connected)}
        return table.pick(app, cluster.id, now, exclude=down | set(exclude),
                          digest=cluster.wanted_digest(app))

    async def serve(self, app: str, event: str, payload: Any) -> Any:
        """Run an app request here or on the peer :meth:`route` picks; a node that did
        not run it (unreachable, queue full, app missing) hands it to the next one."""
        cluster = self.cluster
        if not cluster.links():
            return await self.run_local(app, event, payload)
        tried: dict[str, RemoteError] = {}
        while (target := self.route(app, event, payload, exclude=set(tried))) is not None:
            try:
                if target == cluster.id:
                    return await self.run_local(app, event, payload)
                return await self.forward(target, app, event, payload)
            except NOT_RUN as exc:
                tried[target] = exc
                cluster.stats["fallbacks"] += 1
                if isinstance(exc, Unreachable) and target != cluster.id:
                    cluster.table.forget(target)
        if cluster.id not in tried:
            return await self.run_local(app, event, payload)   # its own clear error
        last = list(tried.values())[-1]
        detail = "; ".join(f"{nid}: {exc}" for nid, exc in tried.items())
        raise type(last)(f"no node of cluster {cluster.name} could run {app}/{event} ({detail})")

    async def run_local(self, app: str, event: str, payload: Any) -> Any:
        local = self.cluster.local_app(app)
        if local is None:
            raise AppNotFound(f"no app named {app!r} on this node")
        return await answer(local.submit(event, payload))

    async def forward(self, pid: str, app: str, event: str, payload: Any) -> Any:
        cluster = self.cluster
        client = cluster.links()[pid]
        cluster.table.note_sent(pid, app)
        cluster.stats["forwarded"] += 1
        replies = client.stream("", "cluster.run", {"app": app, "event": event,
                                                     "payload": payload, "from": cluster.id})
        chunks = cast(AsyncGenerator[Any, None], replies.__aiter__())   # (it is one: aclose)
        try:
            first = await self._from_peer(pid, chunks.__anext__)
        except StopAsyncIteration:
            cluster.table.note_done(pid, app)
            return Stream(_nothing())
        except BaseException:
            cluster.table.note_done(pid, app)
            await chunks.aclose()
            raise
        # RESULT or CHUNK: the reply stream knows once the first reply arrived.
        if not replies.streamed:
            cluster.table.note_done(pid, app)
            await chunks.aclose()
            return first
        return Stream(self._relay(pid, app, first, chunks))

    async def _relay(self, pid: str, app: str, first: Any, chunks: Any) -> AsyncGenerator[Any, None]:
        try:
            yield first
            while True:
                try:
                    chunk = await self._from_peer(pid, chunks.__anext__)
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            self.cluster.table.note_done(pid, app)
            await chunks.aclose()


async def _nothing() -> AsyncGenerator[Any, None]:
    return
    yield  # pragma: no cover
