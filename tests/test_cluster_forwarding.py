"""Forwarding's liveness (engine/cluster/forwarding.py), on trio's clock with fake peers.

Defect 7 of #13: a forward to a partitioned peer hung ~4 s (until the peer was dropped
at expiry) and was then run again elsewhere while the peer kept working through a queue
whose answers nobody read.  Now a forward waits only on a peer that is heard from; it
fails with ``PeerLost`` (not retried) once the peer has been silent ``suspect_after``
seconds, and the peer cancels the jobs it runs for a node it lost.
"""
from __future__ import annotations

from typing import Any, AsyncGenerator, Mapping

import pytest
import trio
import trio.testing

from engine.cluster.balance import AppLoad, BalanceTable, NodeReport
from engine.cluster.forwarding import Forwarding
from engine.errors import PeerLost

APP = "work"


class FakePeer:
    """A peer's control client: ``cluster.run`` answers ``value`` after ``delay`` s."""

    connected = True

    def __init__(self, delay: float, value: Any = "done"):
        self.delay, self.value = delay, value
        self.calls: list[dict[str, Any]] = []

    def stream(self, target: str, verb: str, args: dict[str, Any]) -> "FakeReplies":
        assert verb == "cluster.run"
        self.calls.append(args)
        return FakeReplies(self.delay, self.value)


class FakeReplies:
    streamed = False

    def __init__(self, delay: float, value: Any):
        self.delay, self.value = delay, value

    def __aiter__(self) -> AsyncGenerator[Any, None]:
        return self._replies()

    async def _replies(self) -> AsyncGenerator[Any, None]:
        await trio.sleep(self.delay)
        yield self.value


class FakeCluster:
    """The :class:`~engine.cluster.forwarding.ClusterView` of a node without the app and
    one peer hosting it."""

    id = "me"
    name = "test"

    def __init__(self, peer: FakePeer):
        self.table = BalanceTable(expiry=3600)
        self.stats = {"forwarded": 0, "fallbacks": 0, "served_for_peers": 0}
        self.peer = peer
        self.table.update(NodeReport("peer", "tcp://peer", {APP: AppLoad()}, seq=1), 0.0)

    def links(self) -> Mapping[str, Any]:
        return {"peer": self.peer}

    def local_app(self, app: str) -> None:
        return None

    def app_load(self, app: Any) -> AppLoad:
        raise AssertionError("no local app")

    def wanted_digest(self, app: str) -> str | None:
        return None


async def start(peer: FakePeer, nursery: trio.Nursery) -> Forwarding:
    forwarding = Forwarding(FakeCluster(peer), suspect_after=1.5, tick=0.25)  # type: ignore[arg-type]
    await nursery.start(forwarding.run)
    return forwarding


async def test_a_forward_to_a_silent_peer_fails_fast_with_peer_lost_and_runs_once(autojump_clock):
    peer = FakePeer(delay=3600)                        # partitioned: never answers
    async with trio.open_nursery() as nursery:
        forwarding = await start(peer, nursery)
        t0 = trio.current_time()
        with pytest.raises(PeerLost, match="peer.*may or may not have run"):
            await forwarding.serve(APP, "go", None)
        assert trio.current_time() - t0 <= 1.5 + 0.25 + 0.01
        assert len(peer.calls) == 1 and peer.calls[0]["from"] == "me"    # not retried
        assert forwarding.stats["peer_lost"] == 1
        nursery.cancel_scope.cancel()


async def test_a_long_job_on_a_peer_that_is_heard_from_is_waited_for(autojump_clock):
    peer = FakePeer(delay=30, value="slow but fine")
    async with trio.open_nursery() as nursery:
        forwarding = await start(peer, nursery)

        async def status_exchanges() -> None:       # what the service does every 0.5 s
            while True:
                forwarding.heard_from("peer", trio.current_time())
                await trio.sleep(0.5)

        nursery.start_soon(status_exchanges)
        assert await forwarding.serve(APP, "go", None) == "slow but fine"
        assert forwarding.stats["peer_lost"] == 0
        nursery.cancel_scope.cancel()


async def test_losing_the_peer_fails_its_forwards_at_once(autojump_clock):
    peer = FakePeer(delay=3600)
    async with trio.open_nursery() as nursery:
        forwarding = await start(peer, nursery)
        failed = trio.Event()

        async def forward() -> None:
            with pytest.raises(PeerLost, match="left the cluster"):
                await forwarding.serve(APP, "go", None)
            failed.set()

        forwarding.heard_from("peer", trio.current_time() + 3600)   # never suspected
        nursery.start_soon(forward)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        forwarding.lost("peer", "left the cluster")
        await failed.wait()
        assert trio.current_time() == t0
        nursery.cancel_scope.cancel()


async def test_jobs_run_for_a_lost_origin_are_cancelled_and_others_are_not(autojump_clock, monkeypatch):
    forwarding = Forwarding(FakeCluster(FakePeer(0)))  # type: ignore[arg-type]
    cancelled: list[str] = []

    async def run_local(app: str, event: str, payload: Any) -> Any:
        try:
            await trio.sleep(payload)
        except trio.Cancelled:
            cancelled.append(event)
            raise
        return event

    monkeypatch.setattr(forwarding, "run_local", run_local)
    results: dict[str, Any] = {}

    async def run(origin: str, event: str, seconds: float) -> None:
        try:
            results[event] = await forwarding.run_for_peer(origin, APP, event, seconds)
        except PeerLost as exc:
            results[event] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "gone", "orphan", 60)
        nursery.start_soon(run, "other", "kept", 5)
        await trio.testing.wait_all_tasks_blocked()
        forwarding.lost("gone", "no status answer within 3 s")
    assert cancelled == ["orphan"] and isinstance(results["orphan"], PeerLost)
    assert results["kept"] == "kept" and forwarding.stats["orphans_cancelled"] == 1
