"""The cluster end to end: real `python -m engine run --cluster` processes on loopback,
discovery confined to 127.0.0.1 on a port of their own; plus the bundle and message
checks in process.  Every test ends the processes it started and checks none is left."""
from __future__ import annotations

import json
from contextlib import AsyncExitStack
import shutil
import sys
import uuid
from functools import partial
from pathlib import Path

import psutil
import pytest
import trio

from engine.client import connect
from engine.errors import AppNotFound, QueueFull
from engine.cluster.service import Cluster, ClusterOptions
from engine.cluster.bundle import BundleError, check_bundle, digest_of, write_bundle
from support import NodeProcess, free_udp_port, start_node_process, stop_node, wait_until
from etcd_support import etcd_instance, etcd_server  # noqa: F401 (fixtures)
from transport.errors import BadMessage
from transport.rpc import RpcClient

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo"


def echo_app(where: Path, name: str, **engine) -> Path:
    folder = where / name
    shutil.copytree(ECHO, folder, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"].update({"termination-timeout": 2, **engine})
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


CLUSTER_SECRET = "the tests' cluster secret, long enough"


@pytest.fixture(params=["lan", "etcd"])
def cluster(request, tmp_path, monkeypatch):
    """``node = await cluster(*paths)``: a real node in this test's own cluster (its own
    name and discovery port, confined to loopback, and a secret: in the environment, so
    the nodes and the CLI run by the test, which signs deploys with it, both have it),
    stopped after the test.  Every test using it runs twice: UDP beacons (``lan``), and
    a real etcd as the registry (``etcd``, tests/etcd_support.py)."""
    monkeypatch.setenv("ENGINE_CLUSTER_SECRET", CLUSTER_SECRET)
    port, name = free_udp_port(), f"t-{uuid.uuid4().hex[:8]}"
    registry = ([] if request.param == "lan" else
                ["--cluster-registry", f"etcd://{request.getfixturevalue('etcd_server')}"])
    started: list[NodeProcess] = []

    async def start(*paths: Path) -> NodeProcess:
        i = len(started)
        node = await start_node_process(
            paths, tmp_path / f"node{i}.log", tmp_path,
            "--cluster", name, "--state-dir", str(tmp_path / f"state{i}"),
            "--discovery-port", str(port), "--discovery-interface", "127.0.0.1", *registry)
        started.append(node)
        return node

    yield start
    left = [p for node in started for p in stop_node(node)]
    assert not left, f"processes left behind by the cluster's nodes: {left}"


async def node_ids(client) -> set[str]:
    return {n["id"] for n in (await client.verb("nodes"))["nodes"]}


async def apps_of(client) -> set[str]:
    return set((await client.list())["apps"])


@pytest.mark.e2e
async def test_discovery_deploy_sync_on_join_and_undeploy(cluster, tmp_path):
    with trio.fail_after(60):
        a, b = await cluster(), await cluster()
        async with connect(a.address, timeout=20) as ca, connect(b.address, timeout=20) as cb:
            # (how soon: bench/timing.py)
            await wait_until(lambda: _count(ca, 2), "A sees 2 nodes", timeout=10, interval=0.1)
            await wait_until(lambda: _count(cb, 2), "B sees 2 nodes", timeout=10, interval=0.1)

            app = echo_app(tmp_path / "apps", "echo")
            result = await ca.deploy(app / "manifest.json")
            assert result["app"] == "echo"
            assert list(result["peers"].values()) == ["deployed"]
            assert "echo" in await apps_of(cb)
            assert await cb.call("echo", "echo", {"via": "b"}) == {"via": "b"}
            assert await cb.call("echo", "count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]
            # B ran them itself: idle nodes keep their requests.
            assert (await cb.info("echo"))["pool"]["done"] == 2
            installed = list((tmp_path / "state1" / "apps").iterdir())
            assert [p.name.split("-")[0] for p in installed] == ["echo"]

            c = await cluster()                          # a late joiner syncs the apps
            async with connect(c.address, timeout=20) as cc:
                await wait_until(lambda: _has(cc, "echo"), "C has synced echo", timeout=10, interval=0.1)
                assert await cc.call("echo", "echo", 7) == 7
                await wait_until(lambda: _count(ca, 3), "A sees 3 nodes", timeout=10, interval=0.1)

                clients = (ca, cb, cc)
                pulls = [await _pulls(client) for client in clients]
                result = await ca.undeploy("echo", drain=1)
                assert sorted(result["peers"].values()) == ["undeployed", "undeployed"]
                for client in clients:
                    assert "echo" not in await apps_of(client)
                # No re-sync: two report rounds later nobody has pulled echo back, nor tried to.
                await _report_rounds(clients)
                assert [await _pulls(client) for client in clients] == pulls
                for client in clients:
                    assert "echo" not in await apps_of(client)


async def _pulls(client) -> tuple[int, list[str]]:
    """The apps ``client``'s node has pulled from peers (a count) or failed to."""
    view = await client.verb("nodes")
    return view["stats"]["synced"], sorted(view["sync_failed"])


async def _report_rounds(clients, rounds: int = 2) -> None:
    """Until each node (of ``clients``) has heard a load report from every peer,
    ``rounds`` times over: what a node pulls, it pulls on hearing a report, so this is
    how long to give something that must not be pulled (rather than a fixed sleep)."""
    for _ in range(rounds):
        since = trio.current_time()
        for client in clients:
            await wait_until(partial(_heard_every_peer_since, client, since),
                             "a node hears a report from every peer", timeout=10, interval=0.1)


async def _heard_every_peer_since(client, since: float) -> bool:
    """``client``'s node has heard from each of its peers since ``since`` (this test's
    trio clock).  The node gives each peer's age, a duration, so the two processes'
    clocks need not agree; the call's own latency only makes the check stricter."""
    elapsed = trio.current_time() - since
    return all(v["self"] or not v.get("linked", True) or v["age"] < elapsed
               for v in (await client.verb("nodes"))["nodes"])


async def _count(client, n: int) -> bool:
    return len(await node_ids(client)) == n


async def _routable(client, app: str, n: int) -> bool:
    """``n`` nodes, each connected and serving ``app``, as ``client``'s node sees them."""
    nodes = (await client.verb("nodes"))["nodes"]
    return sum(1 for v in nodes if v["connected"] and v["apps"].get(app, {}).get("state")
               == "running") == n


async def _running_on(client, app: str) -> bool:
    """``client``'s own node is running a job of ``app``."""
    me = next(v for v in (await client.verb("nodes"))["nodes"] if v["self"])
    return me["apps"].get(app, {}).get("running", 0) >= 1


async def _has(client, app: str) -> bool:
    return app in await apps_of(client)


async def _shared_and_warm(ca, cb, app: str) -> None:
    """B has synced ``app``, A routes to B, and both pools have a slave, so a burst
    measures balancing, not spawning."""
    await wait_until(lambda: _has(cb, app), "B has synced the app", timeout=10, interval=0.1)
    await wait_until(lambda: _routable(ca, app, 2), "A routes to B", timeout=10, interval=0.1)
    await ca.call(app, "echo", 0)
    await cb.call(app, "echo", 0)


@pytest.mark.e2e
async def test_saturated_node_offloads_then_survives_peer_death(cluster, tmp_path):
    app = echo_app(tmp_path / "apps", "slow", **{"pool-limit": 1, "queue-limit": 50})
    with trio.fail_after(60):
        a = await cluster(app)
        b = await cluster()
        async with connect(a.address, timeout=30) as ca, connect(b.address, timeout=30) as cb:
            await _shared_and_warm(ca, cb, "slow")

            results = []

            async def one(i: int) -> None:
                results.append(await ca.call("slow", "sleep", 0.4))

            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
            assert len(results) == 8
            done_b = (await cb.info("slow"))["pool"]["done"]
            view = await ca.verb("nodes")
            assert view["stats"]["forwarded"] >= 1 and done_b >= 2, (view["stats"], done_b)

            b_slaves = b.descendants()
            b.proc.kill()                            # SIGKILL: no bye, the link just drops
            b.proc.wait(10)
            results.clear()
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
            assert len(results) == 4                 # served locally, even mid-failure
            await wait_until(lambda: _count(ca, 1), "A has dropped B", timeout=6, interval=0.1)
            gone, alive = psutil.wait_procs(b_slaves, timeout=10)
            assert not alive, alive                  # B's slaves died with it


@pytest.mark.e2e
async def test_native_server_requests_are_balanced_across_the_cluster(cluster, tmp_path):
    app = echo_app(tmp_path / "apps", "nslow", **{"pool-limit": 1, "queue-limit": 50})
    manifest = json.loads((app / "manifest.json").read_text())
    manifest["drivers"] = {"rpc": {"type": "native-server", "emit": "sleep",
                                   "endpoint": "tcp://127.0.0.1:0"}}
    (app / "manifest.json").write_text(json.dumps(manifest))
    with trio.fail_after(60):
        a = await cluster(app)
        b = await cluster()
        async with connect(a.address, timeout=30) as ca, connect(b.address, timeout=30) as cb:
            await _shared_and_warm(ca, cb, "nslow")
            endpoint = (await ca.info("nslow"))["drivers"]["rpc"]["endpoint"]
            results = []
            async with RpcClient(endpoint, timeout=30) as native:
                async def one() -> None:
                    results.append(await native.call("", "", 0.4))

                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(one)
            assert results == [{"slept": 0.4}] * 8
            done_b = (await cb.info("nslow"))["pool"]["done"]
            stats = (await ca.verb("nodes"))["stats"]
            driver = (await ca.info("nslow"))["drivers"]["rpc"]
            assert stats["forwarded"] >= 1 and done_b >= 2, (stats, done_b)
            assert driver["submitted"] == driver["done"] == 8 and driver["errors"] == 0, driver


@pytest.mark.e2e
async def test_nodes_cli_and_errors_only_when_no_node_can_serve(cluster, tmp_path):
    app = echo_app(tmp_path / "apps", "echo", **{"pool-limit": 1, "queue-limit": 1})
    with trio.fail_after(45):
        a = await cluster(app)
        b = await cluster()
        async with connect(b.address, timeout=20) as cb, connect(a.address, timeout=20) as ca:
            await wait_until(lambda: _has(cb, "echo"), "B has synced", timeout=10, interval=0.1)
            await wait_until(lambda: _count(cb, 2), "B sees A", timeout=10, interval=0.1)
            await wait_until(lambda: _routable(ca, "echo", 2), "A routes to B", timeout=10, interval=0.1)
            with pytest.raises(AppNotFound):
                await ca.call("nope", "echo", 1)
            await ca.call("echo", "echo", 0)       # a slave each, so queue-limit counts
            await cb.call("echo", "echo", 0)
            served, refused = [], []

            async def one() -> None:
                try:
                    served.append(await ca.call("echo", "sleep", 1.5))
                except QueueFull as exc:
                    refused.append(str(exc))

            async with trio.open_nursery() as nursery:
                for _ in range(7):
                    nursery.start_soon(one)
            # Each node holds one running + one queued: 4 served (every node is tried
            # before refusing), the rest refused naming every node tried.
            assert len(served) >= 4 and refused and len(served) + len(refused) == 7, \
                (served, refused, await ca.verb("nodes"))
            assert all("no node of cluster" in r and r.count("QueueFull") >= 3 for r in refused), refused

            # A busy with a long job of its own: calls entering A run on B, streams
            # relayed chunk by chunk.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(ca.call, "echo", "sleep", 4, timeout=20))
                await wait_until(lambda: _running_on(ca, "echo"), "A runs its sleep", timeout=10,
                                 interval=0.05)
                before = (await cb.info("echo"))["pool"]["done"]
                assert await ca.call("echo", "count", {"n": 3}) == [{"i": 0}, {"i": 1}, {"i": 2}]
                chunks = [c async for c in ca.stream("echo", "count", {"n": 2})]
                assert chunks == [{"i": 0}, {"i": 1}]
                assert await ca.call("echo", "echo", "hop") == "hop"
                assert (await cb.info("echo"))["pool"]["done"] == before + 3
        out = await trio.run_process([sys.executable, "-m", "engine", "nodes", "--node", a.address],
                                     capture_stdout=True, capture_stderr=True, check=False)
        text = out.stdout.decode()
        assert out.returncode == 0, out.stderr.decode()
        assert text.startswith("cluster t-") and "2 node(s)" in text, text
        assert text.count("  echo\tv1@") == 2 and text.count("\trunning\tqueue") == 2, text
        assert "catalog: echo v1@" in text and "(this node)" in text, text
        assert "DIVERGED" not in text, text


@pytest.mark.e2e
async def test_nodes_verb_on_a_node_outside_any_cluster(tmp_path):
    from engine.node.node import Node as EngineNode

    node = EngineNode(control="tcp://127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        async with connect(node.control_address, timeout=5) as client:
            with pytest.raises(BadMessage, match="not in a cluster"):
                await client.verb("nodes")
        nursery.cancel_scope.cancel()


# -- in process: bundles and sealed messages -------------------------------------------

def test_bundle_checks_paths_size_and_digest(tmp_path):
    files = {"app.py": b"x = 1\n", "lib/util.py": b"y = 2\n"}
    good = {"name": "echo", "manifest": {"args": "app.py"}, "files": files,
            "digest": digest_of({"args": "app.py"}, files)}
    assert check_bundle(good) is good
    folder = write_bundle(good, tmp_path)
    assert (folder / "lib" / "util.py").read_bytes() == b"y = 2\n"
    assert json.loads((folder / "manifest.json").read_text()) == {"args": "app.py"}
    for rel in ("../evil.py", "/etc/passwd", "a/../../b", "manifest.json", "a\\b"):
        bad = dict(good, files={rel: b""})
        bad["digest"] = digest_of(bad["manifest"], bad["files"])
        with pytest.raises(BundleError):
            check_bundle(bad)
    with pytest.raises(BundleError, match="digest"):
        check_bundle(dict(good, files={"app.py": b"tampered"}))
    with pytest.raises(BundleError, match="exceeds"):
        check_bundle(good, limit=5)
    with pytest.raises(BundleError):
        check_bundle(dict(good, name="../x"))


def test_messages_are_sealed_with_the_secret(tmp_path):
    def make(secret, name="c", key=""):
        return Cluster(None, ClusterOptions(name=name, key=key, secret=secret,
                                            insecure=secret is None, state_dir=tmp_path))

    ours, theirs = make("s3cret-of-some-length"), make("another-secret-of-length")
    msg = ours.seal({"app": "echo"})
    assert make("s3cret-of-some-length").open(msg) == {"app": "echo"}
    with pytest.raises(BadMessage, match="signature"):
        theirs.open(msg)
    with pytest.raises(BadMessage, match="signature"):
        ours.open(dict(msg, body={"app": "evil"}))
    with pytest.raises(BadMessage, match="not a message"):
        make(None, key="k").open(make(None).seal(1))
    assert make(None).open(make(None).seal([1, 2])) == [1, 2]


@pytest.mark.e2e
async def test_cluster_wide_changes_need_the_callers_grant(cluster, tmp_path, monkeypatch):
    """#13 defect 2: a node signed cluster-wide changes on any caller's behalf, so one
    call with a node's token stopped an app everywhere.  Now the caller signs them: a
    client holding the node's token but not the cluster's secret changes nothing, a
    grant is refused if wrong, stale or replayed, and the app keeps running everywhere."""
    from engine.cluster.catalog import sign_grant
    from transport.errors import Unauthorized
    import time

    app = echo_app(tmp_path / "apps", "echo")
    with trio.fail_after(60):
        a, b = await cluster(app), await cluster()
        async with connect(a.address, timeout=20) as ca, connect(b.address, timeout=20) as cb:
            await wait_until(lambda: _has(cb, "echo"), "B has synced echo", timeout=10, interval=0.1)
            later = echo_app(tmp_path / "apps", "later")
            monkeypatch.delenv("ENGINE_CLUSTER_SECRET")          # the client's, not the nodes'
            with pytest.raises(Unauthorized, match="signed by the caller"):
                await ca.undeploy("echo")
            with pytest.raises(Unauthorized, match="signed by the caller"):
                await ca.deploy(later / "manifest.json")
            with pytest.raises(Unauthorized):
                await cb.undeploy("echo", cluster_secret="another cluster's secret, long enough")
            stale = sign_grant(CLUSTER_SECRET.encode(), "undeploy", "echo", at=time.time() - 120)
            with pytest.raises(Unauthorized, match="clocks"):
                await ca.verb("undeploy", {"app": "echo", "grant": stale.to_wire()})
            wrong_app = sign_grant(CLUSTER_SECRET.encode(), "undeploy", "later", at=time.time())
            with pytest.raises(Unauthorized):
                await ca.verb("undeploy", {"app": "echo", "grant": wrong_app.to_wire()})
            for client in (ca, cb):
                assert await client.call("echo", "echo", "still") == "still"
                assert "later" not in await apps_of(client)

            grant = sign_grant(CLUSTER_SECRET.encode(), "undeploy", "echo", at=time.time()).to_wire()
            result = await cb.verb("undeploy", {"app": "echo", "grant": grant})
            assert list(result["peers"].values()) == ["undeployed"]
            with pytest.raises(Unauthorized, match="used before"):
                await ca.verb("undeploy", {"app": "echo", "grant": grant})   # (on B: taken)
            for client in (ca, cb):
                assert "echo" not in await apps_of(client)


@pytest.mark.e2e
async def test_an_etcd_cluster_reaches_the_nodes_beyond_each_sample(tmp_path, monkeypatch, etcd_server):
    """With etcd a node links to a sample of its peers (here 1): membership, deploys and
    undeploys still reach every node, through the registry (the bench's 30-node run
    found deploys reaching only the linked half)."""
    monkeypatch.setenv("ENGINE_CLUSTER_SECRET", CLUSTER_SECRET)
    monkeypatch.setenv("ENGINE_CLUSTER_SAMPLE", "1")
    name = f"s-{uuid.uuid4().hex[:8]}"
    nodes: list[NodeProcess] = []
    try:
        with trio.fail_after(90):
            for i in range(4):
                nodes.append(await start_node_process(
                    (), tmp_path / f"node{i}.log", tmp_path, "--cluster", name,
                    "--state-dir", str(tmp_path / f"state{i}"),
                    "--cluster-registry", f"etcd://{etcd_server}"))
            async with AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(connect(n.address, timeout=20))
                           for n in nodes]
                for c in clients:
                    await wait_until(lambda c=c: _count(c, 4), "every node lists all 4",
                                     timeout=15, interval=0.1)
                view = await clients[0].verb("nodes")
                assert sum(1 for n in view["nodes"] if n["linked"]) == 2     # itself + 1
                app = echo_app(tmp_path / "apps", "echo")
                await clients[0].deploy(app / "manifest.json")
                for c in clients:
                    await wait_until(lambda c=c: _runs(c, "echo"), "echo running everywhere",
                                     timeout=20, interval=0.1)
                    assert await c.call("echo", "echo", 1) == 1
                await clients[1].undeploy("echo")
                for c in clients:
                    await wait_until(lambda c=c: _gone(c, "echo"), "echo stopped everywhere",
                                     timeout=20, interval=0.1)
    finally:
        left = [p for node in nodes for p in stop_node(node)]
        assert not left, left


async def _runs(client, app: str) -> bool:
    return (await client.list())["apps"].get(app, {}).get("state") == "running"


async def _gone(client, app: str) -> bool:
    return app not in await apps_of(client)


@pytest.mark.e2e
async def test_a_deploy_grant_names_its_content(cluster, tmp_path):
    """A grant captured off the wire (control frames are authenticated, not encrypted)
    cannot deploy other content under its app's name: it is signed over the digest."""
    import time

    from engine.cluster.bundle import make_bundle
    from engine.cluster.catalog import sign_grant
    from engine.manifest import load_manifest
    from transport.errors import Unauthorized

    meant = echo_app(tmp_path / "meant", "echo")
    other = echo_app(tmp_path / "other", "echo")
    (other / "app.py").write_text((other / "app.py").read_text() + "\n# other content\n")
    digest = make_bundle(load_manifest(meant), "echo")["digest"]
    grant = sign_grant(CLUSTER_SECRET.encode(), "deploy", "echo", at=time.time(), digest=digest)
    with trio.fail_after(60):
        a = await cluster()
        async with connect(a.address, timeout=20) as ca:
            with pytest.raises(Unauthorized, match="signed for content"):
                await ca.verb("deploy", {"path": str(other / "manifest.json"),
                                         "grant": grant.to_wire()})
            assert "echo" not in await apps_of(ca)
            # (the misused grant is spent; the caller signs again for what it meant)
            again = sign_grant(CLUSTER_SECRET.encode(), "deploy", "echo", at=time.time(),
                               digest=digest)
            result = await ca.verb("deploy", {"path": str(meant / "manifest.json"),
                                              "grant": again.to_wire()})
            assert result["digest"] == digest
