"""A real node (`python -m engine run`) on loopback, real slaves, driven through the
CLI and engine.client. Each test starts its own node on a port nng picks (read back
from the node's log) and ends every process it started."""
from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import trio

from engine.client import connect
from engine.errors import AppNotFound, QueueFull
from support import slave_pids, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo"


@pytest.fixture
def apps_dir(tmp_path):
    apps = tmp_path / "apps"
    apps.mkdir()
    shutil.copytree(ECHO, apps / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    # faster idle retirement and drain for the tests
    manifest = json.loads((apps / "echo" / "manifest.json").read_text())
    manifest["engine"].update({"pool-limit": 4, "termination-timeout": 10})
    (apps / "echo" / "manifest.json").write_text(json.dumps(manifest))
    return apps


# -- tests ------------------------------------------------------------------------------------

async def test_echo_and_streaming_through_the_cli(apps_dir, start_node):
    node = await start_node(apps_dir)
    assert "started app echo" in node.stderr

    done = await node.cli("call", "echo", "echo", '{"hello": [1, 2, "three"]}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"hello": [1, 2, "three"]}

    done = await node.cli("call", "echo", "count", '{"n": 4}')
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in done.stdout.decode().splitlines()] == [{"i": i} for i in range(4)]

    done = await node.cli("call", "echo", "no-such-event")
    assert done.returncode != 0
    assert b"UnknownEvent" in done.stderr

    done = await node.cli("call", "nosuchapp", "echo", "1")
    assert done.returncode != 0
    assert b"no app named 'nosuchapp'" in done.stderr

    done = await node.cli("list")
    assert done.returncode == 0 and done.stdout.startswith(b"echo\trunning\t")

    done = await node.cli("info", "echo")
    assert done.returncode == 0, done.stderr
    assert re.search(rb"slaves [1-4]/4 .*done \d+ +failed 1", done.stdout), done.stdout
    done = await node.cli("info", "echo", "--json")
    assert json.loads(done.stdout)["pool"]["failed"] == 1


async def test_client_calls_streams_and_pool_growth(apps_dir, start_node):
    node = await start_node(apps_dir)
    with trio.fail_after(50):
        async with connect(node.address, timeout=30) as c:
            assert await c.call("echo", "echo", {"x": b"bytes too"}) == {"x": b"bytes too"}
            chunks = [chunk async for chunk in c.stream("echo", "count", {"n": 5, "delay": 0.01})]
            assert chunks == [{"i": i} for i in range(5)]
            assert await c.call("echo", "count", {"n": 2}) == [{"i": 0}, {"i": 1}]

            # A burst of slow jobs grows the pool to its limit (4), never above: the
            # pool's own count of slaves started says so, not a sample of its size.
            results = []

            async def one(i):
                results.append(await c.call("echo", "sleep", 1.0))

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(one, i)
            assert len(results) == 10
            info = await c.info("echo")
            assert info["pool"]["spawned"] == 4 and info["pool"]["crashes"] == 0, info
            assert info["pool"]["done"] >= 13
            assert info["pool"]["latency_ms"]["p50"] is not None
            assert len(slave_pids(node)) <= 4


async def test_bad_manifest_is_reported_and_the_good_app_serves(apps_dir, start_node):
    bad = apps_dir / "broken"
    bad.mkdir()
    (bad / "app.py").write_text("")
    (bad / "manifest.json").write_text(json.dumps({"engine": {"pool-limit": -1}}))
    (apps_dir / "notes").mkdir()               # no manifest.json: not an app, ignored
    node = await start_node(apps_dir)
    assert "engine.pool-limit: expected a positive integer, got -1" in node.stderr
    with trio.fail_after(30):
        async with connect(node.address, timeout=20) as c:
            assert await c.call("echo", "echo", "still here") == "still here"
            listing = await c.list()
            assert list(listing["apps"]) == ["echo"]
            (why,) = [v for k, v in listing["rejected"].items() if k.endswith("broken/manifest.json")]
            assert "engine.pool-limit" in why
            assert not any("notes" in k for k in listing["rejected"])


async def test_one_zygote_forks_the_slaves_of_every_app(apps_dir, start_node):
    shutil.copytree(apps_dir / "echo", apps_dir / "echo2")
    manifest = json.loads((apps_dir / "echo2" / "manifest.json").read_text())
    manifest["engine"]["spawn"] = "exec"
    shutil.copytree(apps_dir / "echo", apps_dir / "echo3")
    (apps_dir / "echo3" / "manifest.json").write_text(json.dumps(manifest))
    node = await start_node(apps_dir)
    with trio.fail_after(30):
        async with connect(node.address, timeout=20) as c:
            pids, zygotes = {}, {}
            for app in ("echo", "echo2", "echo3"):
                assert await c.call(app, "echo", app) == app
                pool = (await c.info(app))["pool"]
                ((pids[app],), zygotes[app]) = [s["pid"] for s in pool["slaves"]], pool["zygote"]
    (zygote,) = [p for p in node.descendants() if "engine.worker.zygote" in " ".join(p.cmdline())]
    assert zygotes == {"echo": zygote.pid, "echo2": zygote.pid, "echo3": None}
    forked = {p.pid for p in zygote.children()}
    assert pids["echo"] in forked and pids["echo2"] in forked
    assert psutil.Process(pids["echo3"]).ppid() == node.proc.pid  # "exec": a plain start


async def test_deploy_and_undeploy_at_runtime(apps_dir, start_node, tmp_path):
    node = await start_node(apps_dir)
    other = tmp_path / "more" / "echo2"
    shutil.copytree(ECHO, other, ignore=shutil.ignore_patterns("__pycache__"))

    done = await node.cli("deploy", str(other))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["app"] == "echo2"
    done = await node.cli("call", "echo2", "echo", '"hi"')
    assert done.returncode == 0 and json.loads(done.stdout) == "hi"

    # a bad manifest deployed at runtime: rejected with its field path, nothing started
    bad = tmp_path / "more" / "bad"
    shutil.copytree(ECHO, bad, ignore=shutil.ignore_patterns("__pycache__"))
    (bad / "manifest.json").write_text(json.dumps({"engine": {"backend": "fork"}}))
    done = await node.cli("deploy", str(bad))
    assert done.returncode != 0 and b"engine.backend" in done.stderr

    done = await node.cli("undeploy", "echo2")
    assert done.returncode == 0, done.stderr
    with trio.fail_after(30):
        async with connect(node.address, timeout=20) as c:
            with pytest.raises(AppNotFound):
                await c.call("echo2", "echo", 1)
            assert set((await c.list())["apps"]) == {"echo"}
            assert await c.call("echo", "echo", 2) == 2

            # deploy a manifest given as data; its tiny queue refuses a burst at once
            tiny = {"name": "tiny", "engine": {"pool-limit": 1, "queue-limit": 1}}
            assert (await c.deploy(tiny, base_dir=other))["app"] == "tiny"
            outcomes = []

            async def one():
                try:
                    outcomes.append(await c.call("tiny", "sleep", 0.5))
                except QueueFull as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
            assert len(outcomes) == 4
            refused = [o for o in outcomes if isinstance(o, QueueFull)]
            assert refused and len(refused) < 4, outcomes
            assert "queue" in str(refused[0]).lower()


async def test_sigterm_drains_in_flight_jobs_and_leaves_no_process(apps_dir, start_node):
    node = await start_node(apps_dir)
    with trio.fail_after(50):
        async with connect(node.address, timeout=30) as c:
            assert await c.call("echo", "echo", 1) == 1
            slow = []

            async def in_flight():
                slow.append(await c.call("echo", "sleep", 1.5))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)

                async def running():
                    return slave_pids(node) and (await c.info("echo"))["pool"]["running"] > 0
                await wait_until(running, "the slow call runs in a slave", timeout=30, interval=0.05)
                children = node.descendants()
                assert children
                node.proc.send_signal(signal.SIGTERM)
            assert slow == [{"slept": 1.5}]       # drained, not cut off
        assert await node.wait_exit(30) == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left behind: {alive}"
    assert "node stopped" in node.stderr


async def test_sigkilled_node_takes_its_slaves_with_it(apps_dir, start_node):
    node = await start_node(apps_dir)
    with trio.fail_after(50):
        async with connect(node.address, timeout=30) as c:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(c.call, "echo", "sleep", 0.5)
            pids = slave_pids(node)
            assert pids
        family = node.descendants()  # the slaves and the zygote that forked them
        zygotes = [p for p in family if "engine.worker.zygote" in " ".join(p.cmdline())]
        assert len(zygotes) == 1 and pids <= {p.pid for p in zygotes[0].children()}
        node.proc.kill()
        assert await node.wait_exit(10) == -signal.SIGKILL
        gone, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"outlived a SIGKILLed node: {alive}"


async def test_long_stream_arrives_whole(apps_dir, start_node):
    node = await start_node(apps_dir)
    with trio.fail_after(50):
        async with connect(node.address, timeout=10) as c:
            got = [chunk["i"] async for chunk in c.stream("echo", "count", {"n": 3000})]
    assert got == list(range(3000))


async def test_a_lone_large_request_reaches_the_slave_and_comes_back(apps_dir, start_node):
    # Client -> node -> slave and back, nothing else in flight: every hop writes the
    # frame straight to its socket, which takes only its start.
    node = await start_node(apps_dir)
    blob = b"x" * 4_000_000
    with trio.fail_after(30):
        async with connect(node.address, timeout=20) as c:
            assert await c.call("echo", "echo", blob) == blob


async def test_app_with_a_timer_driver_runs_it(apps_dir, start_node):
    from engine.drivers import registry

    if registry.get("recurring-timer") is None:
        pytest.skip("no recurring-timer driver registered yet (engine/drivers)")
    ticker = apps_dir / "ticker"
    shutil.copytree(ECHO, ticker, ignore=shutil.ignore_patterns("__pycache__"))
    (ticker / "manifest.json").write_text(json.dumps({
        "drivers": {"tick": {"type": "recurring-timer", "emit": "echo", "interval": 100}}}))
    node = await start_node(apps_dir)
    with trio.fail_after(40):
        async with connect(node.address, timeout=20) as c:
            async def ticked_three_times():
                info = await c.info("ticker")
                return info if info["pool"]["done"] >= 3 else None
            info = await wait_until(ticked_three_times, "the timer's jobs ran three times",
                                    timeout=40, interval=0.1)
            assert info["drivers"]["tick"]["type"] == "recurring-timer"
            assert info["drivers"]["tick"]["emit"] == "echo"
            # the timer's jobs share the pool with calls through the control endpoint
            assert await c.call("ticker", "echo", "manual") == "manual"
