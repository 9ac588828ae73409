"""Faults of one peer stay that peer's: in-process cluster nodes (real nodes, real
sockets on loopback, one trio run) driven into the moments the issue's trials found.

- A peer that leaves while this node computes its apps' digests (in a thread) closes its
  client under the status exchange that was waiting for the digests: the exchange used
  to raise ``Closed`` past its handler and take the node and every app down (#13,
  defect 1).
- Forwards to a peer that stops answering fail fast with ``PeerLost`` rather than hang
  and run twice (defect 7), tested on trio's clock with a fake peer in
  ``test_cluster_forwarding.py``.
"""
from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import engine.cluster.apps as cluster_apps
from engine.cluster.service import Cluster, ClusterOptions
from engine.cluster.verbs import ClusterMember, in_cluster
from engine.node.node import Node
from transport.mesh.discovery import DiscoveryConfig

from support import free_udp_port
from test_cluster import echo_app

SECRET = "the fault tests' cluster secret"


def cluster_of(node: Node) -> Cluster:
    member = node.cluster
    assert isinstance(member, ClusterMember)
    return member.cluster


def cluster_node(name: str, port: int, state_dir: Path) -> Node:
    options = ClusterOptions(name=name, secret=SECRET, state_dir=state_dir,
                             discovery=DiscoveryConfig(interface="127.0.0.1", port=port,
                                                       hello_interval=0.2, expiry=2.0))
    return Node(control="tcp://127.0.0.1:0", cluster=in_cluster(options))


async def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@pytest.mark.e2e
async def test_a_peer_leaving_while_the_node_computes_digests_does_not_crash_it(tmp_path, monkeypatch):
    computing, release = threading.Event(), threading.Event()
    make_bundle = cluster_apps.make_bundle

    def slow_make_bundle(manifest: Any, name: str, **kw: Any) -> Any:
        computing.set()
        release.wait(20)                  # (bounded: the test releases it)
        return make_bundle(manifest, name, **kw)

    name, port = f"f-{uuid.uuid4().hex[:8]}", free_udp_port()
    a = cluster_node(name, port, tmp_path / "a")
    b = cluster_node(name, port, tmp_path / "b")
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            b_scope = trio.CancelScope()

            async def run_b() -> None:
                with b_scope:
                    await b.run()

            nursery.start_soon(run_b)
            ca = cluster_of(a)
            await wait_for(lambda: b.state == "running" and cluster_of(b).id in ca.links()
                           and ca.links()[cluster_of(b).id].connected, "A linked to B")
            b_id = cluster_of(b).id

            # A gets an app: its next status exchange with B computes its digest, held.
            monkeypatch.setattr(cluster_apps, "make_bundle", slow_make_bundle)
            await a.deploy(echo_app(tmp_path / "apps", "echo"))
            await trio.to_thread.run_sync(computing.wait, 10)
            failures = ca.stats["exchange_failures"]

            b_scope.cancel()                                  # B leaves (says bye)
            await wait_for(lambda: b_id not in ca.links(), "A dropped B")
            release.set()
            await wait_for(lambda: ca.stats["exchange_failures"] > failures,
                           "the held exchange failed (its peer had left)")

            assert a.state == "running" and a.apps["echo"].state == "running"
            assert await ca.serve("echo", "echo", "still here") == "still here"
            nursery.cancel_scope.cancel()
