"""App, Node and the control endpoint with a fake pool and fake drivers (no slaves).

The real pool and subprocesses are covered by tests/test_node_e2e.py; here the
lifetimes, error paths and verbs are checked fast and deterministically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import trio

from engine.app import App
from engine.client import connect
from engine.drivers import registry
from engine.errors import AppNotFound, DriverError, ManifestError, ShuttingDown
from engine.manifest import load_manifest
from engine.node.node import Node, find_manifests
from support import wait_until
from transport.errors import BadMessage, HandlerError, UnknownEvent


class FakeJob:
    """An :class:`engine.pool.base.JobHandle` that knows its outcome at once."""

    def __init__(self, event, payload):
        self.event, self.payload = event, payload
        self.streaming = event == "count"
        self.done = False
        self.cancelled = False
        self.polled = 0

    def cancel(self):
        self.cancelled = True

    def poll(self):
        self.polled += 1
        return False

    # The callback side of engine.pool.job.Job (the control endpoint answers through it):
    # this fake knows its outcome at once.
    @property
    def error(self):
        if self.event in ("echo", "count"):
            return None
        return HandlerError(f"no handler for {self.event}", type="UnknownEvent")

    def result_nowait(self):
        if self.error is not None:
            raise self.error
        return self.payload

    def add_reply_callback(self, fn):
        fn(self)

    async def __aiter__(self):
        await trio.sleep(0)
        if self.event == "echo":
            self.done = True
            yield self.payload
        elif self.event == "count":
            for i in range(self.payload["n"]):
                yield {"i": i}
            self.done = True
        else:
            self.done = True
            raise HandlerError(f"no handler for {self.event}", type="UnknownEvent")

    async def result(self):
        return [c async for c in self] if self.streaming else [c async for c in self][0]


class FakePool:
    instances: list["FakePool"] = []

    def __init__(self, manifest):
        self.name = manifest.name
        self.running = False
        self.exited = trio.Event()
        self.drained_with = None
        self.submitted = 0
        FakePool.instances.append(self)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        self.running = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.running = False
            self.exited.set()

    def use_zygote(self, zygote):  # engine.pool.base.Pool: the node offers its zygote
        pass

    def submit(self, event, payload, chunks=None):
        self.submitted += 1
        return FakeJob(event, payload)

    async def drain(self, timeout):
        self.drained_with = timeout

    def info(self):
        return {"state": "running", "slaves": 0, "submitted": self.submitted}

    def crashlog(self):
        return ["line 1", "line 2"]


@dataclass(frozen=True)
class NoOptions:
    fail: bool


class FakeDriver:
    started: list[str] = []

    @classmethod
    def parse_options(cls, raw, ctx):
        if set(raw) - {"fail"}:
            raise ctx.error(sorted(set(raw) - {"fail"})[0], "a known option (fail)")
        return NoOptions(bool(raw.get("fail")))

    def __init__(self, spec):
        self.spec = spec

    async def run(self, app, *, task_status=trio.TASK_STATUS_IGNORED):
        if self.spec.options.fail:
            raise DriverError("port 1 is taken")
        FakeDriver.started.append(self.spec.name)
        task_status.started()
        await trio.sleep_forever()

    def info(self):
        return {"fired": 0}


@pytest.fixture(autouse=True)
def fakes():
    registry.register("test-node-fake")(FakeDriver)
    FakePool.instances.clear()
    FakeDriver.started.clear()
    yield
    registry._DRIVERS.pop("test-node-fake", None)


def make_app(root, name, manifest):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "app.py").write_text("")
    (folder / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return folder


def fake_app(manifest):
    return App(manifest, pool_factory=FakePool)


# -- App ----------------------------------------------------------------------------------

@pytest.mark.e2e
async def test_app_starts_pool_and_drivers_then_stops(tmp_path):
    folder = make_app(tmp_path, "a", {"drivers": {"tick": {"type": "test-node-fake", "emit": "t"}}})
    app = fake_app(load_manifest(folder))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(app.run) is app
            assert app.state == "running" and app.pool.running
            assert FakeDriver.started == ["tick"]
            info = app.info()
            assert info["drivers"]["tick"] == {"type": "test-node-fake", "emit": "t", "fired": 0}
            assert info["pool"]["state"] == "running"
            await app.stop(1.5)
            assert app.pool.drained_with == 1.5
            assert app.state == "stopped"
        assert app.pool.exited.is_set()
    with pytest.raises(ShuttingDown):
        app.submit("echo", 1)


@pytest.mark.e2e
async def test_driver_failure_fails_start_and_leaves_nothing_running(tmp_path):
    folder = make_app(tmp_path, "a", {"drivers": {
        "ok": {"type": "test-node-fake"}, "bad": {"type": "test-node-fake", "fail": True}}})
    app = fake_app(load_manifest(folder))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with pytest.raises(DriverError) as info:
                await nursery.start(app.run)
            assert "drivers.bad (test-node-fake)" in str(info.value) and "port 1 is taken" in str(info.value)
            assert app.pool.exited.is_set() and not app.pool.running
            assert app.state == "stopped"


# -- Node ----------------------------------------------------------------------------------

def test_find_manifests_ignores_folders_without_one(tmp_path):
    make_app(tmp_path / "apps", "one", {})
    make_app(tmp_path / "apps", "two", {})
    (tmp_path / "apps" / "mesh").mkdir()          # like examples/mesh: no manifest.json
    single = make_app(tmp_path, "single", {})
    found, missing = find_manifests([tmp_path / "apps", single, tmp_path / "nowhere",
                                     tmp_path / "apps" / "mesh"])
    assert found == [tmp_path / "apps" / "one" / "manifest.json",
                     tmp_path / "apps" / "two" / "manifest.json",
                     single / "manifest.json"]
    assert [p for p, _ in missing] == [str(tmp_path / "nowhere"), str(tmp_path / "apps" / "mesh")]


@pytest.mark.e2e
async def test_node_hosts_good_apps_and_reports_bad_ones(tmp_path):
    root = tmp_path / "apps"
    make_app(root, "good", {})
    make_app(root, "typo", {"engine": {"pool-limit": -1}})
    make_app(root, "nodriver", {"drivers": {"d": {"type": "test-node-fake", "fail": True}}})
    node = Node(control=None, app_factory=fake_app)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert await node.load_apps([root]) == ["good"]
            rejected = node.list()["rejected"]
            assert "engine.pool-limit: expected a positive integer, got -1" in \
                rejected[str(root / "typo" / "manifest.json")]
            assert "port 1 is taken" in rejected[str(root / "nodriver" / "manifest.json")]
            assert list(node.apps) == ["good"]
            # the same name twice is refused, the first keeps running
            with pytest.raises(ManifestError, match="not already deployed"):
                await node.deploy(root / "good")
            # deploy under another name, then undeploy it
            other = await node.deploy(root / "good", name="good2")
            assert set(node.apps) == {"good", "good2"}
            await node.undeploy("good2", 0.5)
            assert set(node.apps) == {"good"} and other.pool.drained_with == 0.5
            with pytest.raises(AppNotFound):
                await node.undeploy("good2")
            await node.shutdown()
        assert node.state == "stopped"
        assert all(p.exited.is_set() for p in FakePool.instances)


@pytest.mark.e2e
async def test_app_failing_after_start_is_dropped_not_the_node(tmp_path):
    make_app(tmp_path, "a", {})
    make_app(tmp_path, "b", {})
    node = Node(control=None, app_factory=fake_app)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await node.load_apps([tmp_path])
            app_a = node.apps["a"]
            app_a._scope.cancel()            # as if its pool crashed out
            await wait_until(lambda: list(node.apps) == ["b"], "the node drops app a", timeout=4)
            assert app_a.state == "stopped" and node.state == "running"
            await node.shutdown()


# -- control endpoint over real RpcServer/RpcClient ------------------------------------------

@pytest.mark.e2e
async def test_control_verbs_and_app_calls(tmp_path):
    make_app(tmp_path / "apps", "echo", {})
    node = Node(control="tcp://127.0.0.1:0", app_factory=fake_app)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await node.load_apps([tmp_path / "apps"])
            async with connect(node.control_address, timeout=5) as c:
                assert await c.call("echo", "echo", {"x": [1, 2]}) == {"x": [1, 2]}
                assert [x async for x in c.stream("echo", "count", {"n": 3})] == [
                    {"i": 0}, {"i": 1}, {"i": 2}]
                assert await c.call("echo", "count", {"n": 2}) == [{"i": 0}, {"i": 1}]
                with pytest.raises(HandlerError):
                    await c.call("echo", "nope")
                with pytest.raises(AppNotFound):
                    await c.call("missing", "echo")
                with pytest.raises(UnknownEvent):
                    await c.verb("frobnicate")
                with pytest.raises(BadMessage):
                    await c.verb("info", 42)
                assert (await c.list())["apps"]["echo"]["state"] == "running"
                assert (await c.info("echo"))["pool"]["submitted"] == 4
                assert (await c.info())["pid"] > 0
                assert await c.crashlog("echo") == ["line 1", "line 2"]
                make_app(tmp_path, "later", {})
                assert (await c.deploy(tmp_path / "later"))["app"] == "later"
                deployed = await c.deploy({"name": "inline"}, base_dir=tmp_path / "later")
                assert deployed["app"] == "inline"
                with pytest.raises(HandlerError) as info:
                    await c.deploy({"engine": {"pool-limit": 0}}, base_dir=tmp_path / "later")
                assert info.value.type == "ManifestError" and "engine.pool-limit" in str(info.value)
                assert await c.undeploy("later", drain=0.1) == {"app": "later", "state": "stopped"}
                assert set((await c.list())["apps"]) == {"echo", "inline"}
            await node.shutdown()


async def test_the_control_handler_answers_from_its_nodes_own_table():
    from engine.node.control import ClusterControlHandler, ControlHandler
    from transport.rpc import Deferred, Request

    async def ping(node, args):
        return ("pong", node, args)

    class Host:
        def __init__(self):
            self.submitted = []

        def get(self, name):
            assert name == "app"
            host = self

            class _App:
                def submit(self, event, payload, chunks=None):
                    host.submitted.append((event, payload, chunks))
                    return FakeJob(event, payload)
            return _App()

    class Cluster:
        served: list = []

        async def serve(self, app, event, payload):
            self.served.append((app, event, payload))
            return "from the cluster"

    host = Host()
    handler = ControlHandler(host, {"ping": ping})
    assert await handler(Request(1, "", "ping", 7, peer=1, sealed=True)) == ("pong", host, 7)
    with pytest.raises(UnknownEvent, match=r"no node verb 'list' \(verbs: ping\)"):
        handler(Request(2, "", "list", None, peer=1, sealed=True))
    assert isinstance(handler(Request(3, "app", "echo", 1, peer=1, sealed=True)), Deferred)   # answered by the job

    cluster = Cluster()
    clustered = ClusterControlHandler(host, {"ping": ping}, cluster)
    assert await clustered(Request(4, "app", "echo", 2, peer=1, sealed=True)) == "from the cluster"
    assert cluster.served == [("app", "echo", 2)]
    chunked = clustered(Request(5, "app", "upload", 3, peer=1, chunks=object(), sealed=True))
    assert isinstance(chunked, Deferred) and host.submitted[-1][0] == "upload"  # runs where its chunks are
    assert await clustered(Request(6, "", "ping", 8, peer=1, sealed=True)) == ("pong", host, 8)


def test_a_request_without_the_token_runs_nothing_but_the_open_verbs():
    """Requests that came unsealed (no token: docs/security.md) are refused before
    anything runs, app calls and mutating verbs alike, on a plain node and a clustered
    one; only the open verbs are answered, and only where the node gives some."""
    from engine.node.control import ClusterControlHandler, ControlHandler
    from transport.errors import Unauthorized
    from transport.rpc import Request

    ran = []

    async def verb(node, args):
        ran.append(args)
        return "ran"

    class Host:
        def get(self, name):
            ran.append(name)
            raise AssertionError("an unsealed app call reached the app")

    class Cluster:
        async def serve(self, app, event, payload):
            raise AssertionError("an unsealed app call reached the cluster")

    verbs = {"list": verb, "deploy": verb}
    loopback = ControlHandler(Host(), verbs, open_verbs=frozenset({"list"}), address="tcp://127.0.0.1:1")
    beyond = ControlHandler(Host(), verbs, address="tcp://0.0.0.0:1")
    clustered = ClusterControlHandler(Host(), verbs, Cluster(), open_verbs=frozenset({"list"}))
    for handler in (loopback, beyond, clustered):
        for target, event in (("", "deploy"), ("app", "echo"), ("", "nope")):
            with pytest.raises(Unauthorized, match="needs this node's token.*docs/security.md"):
                handler(Request(1, target, event, None, peer=1))
        with pytest.raises(Unauthorized):   # a chunked call too
            handler(Request(2, "app", "up", None, peer=1, chunks=object()))
    with pytest.raises(Unauthorized, match="not loopback: every request needs it"):
        beyond(Request(3, "", "list", None, peer=1))
    assert ran == []
    assert trio.run(lambda: loopback(Request(4, "", "list", 1, peer=1))) == "ran"
    assert trio.run(lambda: clustered(Request(5, "", "list", 2, peer=1))) == "ran"
    assert ran == [1, 2]


def test_reply_later_hands_the_rpc_server_the_jobs_own_poll_and_cancel():
    """The Deferred polls and cancels through the job (engine.pool.base.JobHandle), and
    is settled from the job's reply callback: a value, or the job's error."""
    from engine.node.control import reply_later
    from transport.rpc.handlers import FAILED, RESOLVED

    settled = []
    job = FakeJob("echo", 5)
    deferred = reply_later(job)
    deferred.bind(lambda conn, sid, how, value: settled.append((how, value)), None, 1)
    assert settled == [(RESOLVED, 5)]
    assert deferred.poll() is False and job.polled == 1
    deferred.on_cancel()
    assert job.cancelled

    failed = reply_later(FakeJob("nope", None))
    failed.bind(lambda conn, sid, how, value: settled.append((how, value)), None, 2)
    how, error = settled[-1]
    assert how == FAILED and isinstance(error, HandlerError) and error.type == "UnknownEvent"


async def test_a_stream_left_early_cancels_its_job_and_a_failing_cancel_is_logged(caplog):
    """The caller leaves a streamed reply after one chunk: the job is cancelled; if that
    cancel raises, the error is logged (not raised over why the stream ended, nor lost)."""
    from engine.node.control import answer
    from transport.rpc import Stream

    class BadCancel(FakeJob):
        def cancel(self):
            super().cancel()
            raise RuntimeError("the pool is gone")

    for job in (FakeJob("count", {"n": 5}), BadCancel("count", {"n": 5})):
        reply = await answer(job)
        assert isinstance(reply, Stream)
        chunks = reply.items.__aiter__()
        assert await chunks.__anext__() == {"i": 0}
        await chunks.aclose()
        assert job.cancelled and not job.done
    assert any("cancelling" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.e2e
async def test_connect_to_nothing_is_unreachable():
    from transport.errors import Unreachable

    with trio.fail_after(5):
        with pytest.raises(Unreachable):
            async with connect("tcp://127.0.0.1:1", connect_timeout=0.3):
                pass


# -- CLI table --------------------------------------------------------------------------------

def test_cli_is_the_table_it_is_given(capsys):
    from engine.cli import commands as cli
    from engine.cli.common import command

    @command("test-hello", "say hello")
    def hello_command(p):
        p.add_argument("who")

        async def run(args):
            print(f"hello {args.who}")
            return 7
        return run

    assert hello_command.name == "test-hello" and "test-hello" not in cli.COMMANDS  # made, not registered
    assert cli.main(["test-hello", "world"], commands={**cli.COMMANDS, "test-hello": hello_command}) == 7
    assert capsys.readouterr().out == "hello world\n"
    assert list(cli.COMMANDS) == ["run", "call", "list", "info", "deploy", "reload", "undeploy", "crashlog",
                                  "top", "schedule", "nodes"]
    with pytest.raises(TypeError):
        cli.COMMANDS["test-hello"] = hello_command  # type: ignore[index]  (the table is fixed)
    with pytest.raises(SystemExit):
        cli.main(["test-hello", "world"])     # not in the table the CLI has
    assert "invalid choice: 'test-hello'" in capsys.readouterr().err


def test_run_takes_the_cluster_options():
    from engine.cli.commands import build_parser

    args = build_parser().parse_args(["run", "apps", "--cluster", "c", "--state-dir", "/tmp/s",
                                      "--discovery-port", "4000"])
    assert (args.paths, args.cluster, args.state_dir, args.discovery_port) == (["apps"], "c", "/tmp/s", 4000)


@pytest.mark.e2e
def test_cli_prints_errors_and_exits_non_zero(capsys):
    from engine.cli import commands as cli

    code = cli.main(["list", "--node", "tcp://127.0.0.1:1", "--timeout", "1"])
    assert code == cli.EXIT_ERROR
    assert "Unreachable" in capsys.readouterr().err


class SlowStartApp:
    """An app that is still starting when it is undeployed (as when a cluster's catalog
    says it was undeployed while the node loads it from its command line)."""

    def __init__(self, manifest):
        self.manifest, self.name = manifest, manifest.name
        self.state, self.node = "starting", None
        self.stop_asked = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await self.stop_asked.wait()          # never started
        self.state = "stopped"

    async def stop(self, timeout=None):
        self.stop_asked.set()


async def test_an_app_undeployed_while_it_starts_fails_its_deploy_not_the_node(tmp_path, autojump_clock):
    """#13: the node crashed ("child exited without calling task_status.started()")."""
    folder = make_app(tmp_path, "slow", {})
    node = Node(control=None, app_factory=SlowStartApp)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)

        async def undeploy_when_listed():
            while "slow" not in node.apps:
                await trio.sleep(0.01)
            await node.undeploy("slow")

        nursery.start_soon(undeploy_when_listed)
        assert await node.load_apps([folder]) == []
        assert "was stopped while it started" in node.list()["rejected"][str(folder / "manifest.json")]
        assert node.state == "running" and "slow" not in node.apps
        await node.shutdown()
