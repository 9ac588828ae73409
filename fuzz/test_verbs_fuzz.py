"""Fuzz the control verbs' arguments (engine/node/verbs.py, the manual scheduler's
``schedule``, a cluster member's verbs in engine/cluster/verbs.py), through the node's
control handler (engine/node/control.py), against a fake node.

A verb's ``args`` is whatever a caller put in its REQUEST (any msgpack value), so for
any args, with the token or without it:

- the handler answers with a value msgpack can carry back, or raises a typed error the
  caller can act on: a ``RemoteError`` subclass with its code (``bad-message``,
  ``app-not-found``, ``unknown-event``, ``unauthorized``, ``queue-full``...), or the
  engine's documented ``ManifestError`` (deploy) and ``BundleError`` (a peer's bundle),
  which reach the caller by type name; never a ``TypeError``, ``AttributeError``,
  ``OverflowError`` out of the verb's own code;
- without the token only the open (read-only) verbs run;
- the verb hands the node only what the node's API takes (the fake asserts the types:
  an app name is a str, a drain a non-negative number or None, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import example, given, strategies as st

from engine.cluster.apps import ClusterApps
from engine.cluster.bundle import BundleError, check_bundle
from engine.cluster.catalog import AppRecord, Catalog
from engine.cluster.verbs import cluster_verbs
from engine.drivers.options import DriverSpec
from engine.drivers.scheduler import ManualScheduler, SchedulerOptions
from engine.errors import AppNotFound, ManifestError
from engine.manifest import MANIFEST_FILE, AppManifest, parse_manifest
from engine.node.control import ControlHandler
from engine.node.verbs import base_verbs
from transport.errors import BadMessage, RemoteError, Unauthorized, UnknownEvent
from transport.rpc.handlers import Request

SECRET = b"the verbs fuzzer's cluster secret"

OPEN = frozenset({"list", "info", "nodes"})
TYPED = (RemoteError, ManifestError, BundleError)


class FakeJob:
    """An accepted job that answers at once (what ``answer`` and ``reply_later`` read of
    a JobHandle)."""

    streaming = False
    done = True
    error = None

    def __init__(self, value: Any) -> None:
        self.value = value

    def add_reply_callback(self, callback: Any) -> None:
        callback(self)

    def result_nowait(self) -> Any:
        return self.value

    def poll(self) -> bool:
        return True

    def __aiter__(self) -> Any:
        async def one() -> Any:
            yield self.value
        return one()

    def cancel(self) -> None:
        pass


class FakeApp:
    def __init__(self, name: str, base_dir: Path) -> None:
        self.name = name
        self.state = "running"
        self.manifest = parse_manifest({"args": "app.py"}, source=base_dir / MANIFEST_FILE, name=name)
        self.drivers = {"later": ManualScheduler(DriverSpec("later", "manual-scheduler", "later",
                                                            SchedulerOptions(max_pending=3)))}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state}

    def crashlog(self) -> list[str]:
        return ["line"]

    def submit(self, event: str, payload: Any, chunks: Any = None) -> FakeJob:
        assert isinstance(event, str)
        if event != "echo":
            raise UnknownEvent(f"no event {event!r}")
        return FakeJob(payload)


class FakeNode:
    """The NodeApi a verb may use, asserting it is handed what that API takes."""

    def __init__(self, base_dir: Path) -> None:
        self.apps: dict[str, FakeApp] = {"echo": FakeApp("echo", base_dir)}
        self.base_dir = base_dir

    def get(self, name: str) -> FakeApp:
        assert isinstance(name, str), f"get({name!r})"
        if name not in self.apps:
            raise AppNotFound(f"no app {name!r}")
        return self.apps[name]

    def list(self) -> dict[str, Any]:
        return {"apps": {n: {"state": a.state} for n, a in self.apps.items()}, "rejected": {}}

    def info(self) -> dict[str, Any]:
        return {"pid": 1, **self.list()}

    async def deploy(self, manifest: Any, *, name: str | None = None) -> FakeApp:
        # The verb parses the manifest first (engine.node.verbs.deploy_manifest).
        assert isinstance(manifest, AppManifest), f"deploy({manifest!r})"
        assert name is None
        return FakeApp(manifest.name, self.base_dir)

    async def undeploy(self, name: str, timeout: float | None = None) -> None:
        self.get(name)
        assert timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                   and 0 <= timeout < float("inf")), f"undeploy(timeout={timeout!r})"


class FuzzApps(ClusterApps):
    """The real catalog, grants and merging; installing and deploying stop at the checks
    (nothing is written or run: the fuzz is about the verbs' arguments)."""

    async def install(self, bundle: Any) -> str:
        check_bundle(bundle, limit=self.max_bundle)
        return "deployed"

    async def deploy_here(self, manifest: Any, bundle: Any) -> Any:
        raise ManifestError(str(manifest.source), "", "a deployable app", "the fuzz deploys nothing")


class FakeForwarding:
    async def run_for_peer(self, origin: str, app: str, event: str, payload: Any) -> Any:
        assert isinstance(origin, str) and isinstance(app, str) and isinstance(event, str)
        raise AppNotFound(f"no app {app!r}")


class FakeCluster:
    """What the cluster verbs use of a Cluster; its messages' seal already checked (the
    fuzz is about the bodies inside them)."""

    class options:
        name = "fuzz"
        max_bundle = 1 << 20

    def __init__(self, node: Any) -> None:
        self.apps = FuzzApps(node, node_id="me", cluster="fuzz", secret=SECRET, max_bundle=1 << 20)
        self.forwarding = FakeForwarding()
        self.stats = {"messages_in": 0, "messages_out": 0}

    def open(self, msg: Any) -> Any:
        if not isinstance(msg, dict) or "body" not in msg:
            raise BadMessage("not a message of cluster fuzz")
        return msg["body"]

    def seal(self, body: Any) -> dict[str, Any]:
        return {"body": body}

    def heard(self, report: Any) -> None:
        pass

    def status_body(self) -> Any:
        from engine.cluster.balance import NodeReport
        return NodeReport(id="me", control="tcp://127.0.0.1:1").to_wire()

    def catalog_heard(self, body: Any, source: str) -> None:
        records = body.get("records") if isinstance(body, dict) else None
        try:
            self.apps.merge(Catalog.records_from_wire(records), source=source)
        except ValueError as exc:
            raise BadMessage(f"cluster.catalog: {exc}") from None

    def describe(self) -> dict[str, Any]:
        return {"nodes": []}

    def links(self) -> dict[str, Any]:
        return {}

    async def publish(self, record: Any) -> None:
        assert isinstance(record, AppRecord)

    async def to_peers(self, verb: str, args: Any, timeout: float) -> dict[str, str]:
        assert verb in ("cluster.deploy", "cluster.undeploy")
        return {}


# -- strategies: msgpack values, and the shapes the verbs look for -------------------------------

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=4))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
names = st.sampled_from(["echo", "nope", "", "later"]) | values
numbers = st.sampled_from([0, 1, -1, 0.5, 1e308, float("inf"), float("nan"), 2**63, True, "5"]) | values
plausible = st.fixed_dictionaries({}, optional={
    "app": names, "driver": names, "in": numbers, "at": st.sampled_from(
        ["2030-01-01T09:00:00+00:00", "9999-12-31T23:59:59", "0001-01-01T00:00:00+14:00", "soon", ""]) | values,
    "payload": values, "path": st.sampled_from(["/nowhere/manifest.json", ""]) | values,
    "manifest": st.fixed_dictionaries({}, optional={"args": st.just("app.py") | values, "name": names,
                                                    "engine": values}) | values,
    "base_dir": st.sampled_from(["/tmp", ""]) | values, "name": names, "drain": numbers,
    "event": names, "body": values,
})
# Nearly right, so the checks after the first ones are reached too.
nearly_right = st.one_of(
    st.fixed_dictionaries({"app": st.just("echo"), "driver": st.just("later")},
                          optional={"in": numbers, "at": values, "payload": values}),
    st.fixed_dictionaries({"app": st.just("echo")}, optional={"drain": numbers, "event": names,
                                                              "payload": values}),
    st.just("echo"),
)
args_strategy = st.one_of(nearly_right, nearly_right.map(lambda d: {"body": d}), plausible,
                          plausible.map(lambda d: {"body": d}), names, values)


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("verbs")
    (folder / "app.py").write_text("")
    return folder


def handler_for(node: FakeNode) -> ControlHandler:
    verbs = dict(base_verbs())
    verbs.update(cluster_verbs(FakeCluster(node), base_verbs()))  # type: ignore[arg-type]
    return ControlHandler(node, verbs, open_verbs=OPEN, address="tcp://127.0.0.1:1")  # type: ignore[arg-type]


VERBS = sorted(set(base_verbs()) | {"cluster.status", "cluster.catalog", "cluster.fetch", "cluster.deploy",
                                    "cluster.undeploy", "cluster.run", "nope"})


@given(st.sampled_from(VERBS), args_strategy, st.booleans())
# Found by this fuzzer: OverflowError / ValueError out of the due time (scheduler.py)...
@example("schedule", {"app": "echo", "driver": "later", "in": float("inf")}, True)
@example("schedule", {"app": "echo", "driver": "later", "in": 1e308}, True)
@example("schedule", {"app": "echo", "driver": "later", "at": "9999-12-31T23:59:59-12:00"}, True)
# ... AttributeError on a bare name, an unchecked drain (cluster/verbs.py) ...
@example("cluster.undeploy", {"body": "echo"}, True)
@example("cluster.undeploy", {"body": {"app": "echo", "drain": -1}}, True)
# ... a drain of NaN or infinity handed to the node (node/verbs.py)
@example("undeploy", {"app": "echo", "drain": float("nan")}, True)
@example("undeploy", {"app": "echo", "drain": float("inf")}, True)
def test_a_verb_answers_or_raises_a_typed_error_for_any_args(app_dir, verb, args, sealed):
    node = FakeNode(app_dir)
    handler = handler_for(node)

    async def call() -> Any:
        out = handler(Request(1, "", verb, args, peer=1, sealed=sealed))
        return await out

    try:
        result = trio.run(call)
    except TYPED as exc:
        if not sealed and verb not in OPEN:
            assert isinstance(exc, Unauthorized), f"{verb} without the token: {exc!r}"
        return
    assert sealed or verb in OPEN, f"{verb} ran without the token"
    msgpack.packb(result, use_bin_type=True)  # the answer can reach the caller


@given(st.sampled_from(["echo", "nope", "Echo"]), st.text(max_size=6) | st.just("echo"), values, st.booleans())
def test_an_app_request_answers_or_raises_a_typed_error(app_dir, app, event, payload, sealed):
    """(Target "" is the node's verbs: the test above.)"""
    handler = handler_for(FakeNode(app_dir))
    try:
        out = handler(Request(1, app, event, payload, peer=1, sealed=sealed))
    except TYPED as exc:
        if not sealed:
            assert isinstance(exc, Unauthorized)
        return
    assert sealed, "an app request ran without the token"
    assert out.settled   # (FakeJob answers at once)
