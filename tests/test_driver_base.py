"""The Driver seam: every registered type is a Driver, built from its spec alone, with
the base's info() fields; a new driver writes only what is its own."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from transport.errors import QueueFull

from engine.drivers import registry
from engine.drivers.base import Driver, DriverHost, DriverStats
from engine.drivers.native import NativeServer
from engine.drivers.options import DriverSpec, OptionContext
from engine.drivers.testing import FakeApp
from engine.manifest import DriverSpec as ManifestDriverSpec
from transport.rpc import RpcClient

# Valid options for every built-in type (parsed only: nothing binds or watches).
SAMPLE_OPTIONS: dict[str, dict[str, Any]] = {
    "recurring-timer": {"interval": 1000},
    "drifting-timer": {"interval": 1000},
    "cron": {"schedule": "*/5 * * * *"},
    "filesystem-monitor": {"path": "."},
    "nng-server": {"endpoint": "tcp://127.0.0.1:0"},
    "nng-sink": {"endpoint": "tcp://127.0.0.1:0"},
    "raw-socket-server": {"endpoint": "127.0.0.1:0"},
    "native-server": {},
    "native-sink": {"endpoint": "tcp://127.0.0.1:0"},
    "manual-scheduler": {},
    "mesh-responder": {},
    "mesh-subscriber": {"types": ["a.*"]},
    "mesh-publisher": {},
    "nng-subscriber": {"endpoint": "tcp://127.0.0.1:0"},
}
BASE_FIELDS = ["ticks", "submitted", "skipped", "done", "errors", "last_error", "held", "in_flight"]


def ctx(name: str) -> OptionContext:
    return OptionContext(file="m.json", path=f"drivers.{name}", base_dir=Path("."))


def build(type_name: str, emit: str = "ev") -> Driver[Any]:
    cls = registry.get(type_name)
    assert cls is not None
    options = registry.parse_options(type_name, SAMPLE_OPTIONS[registry.canonical(type_name)], ctx("d"))
    return cls(DriverSpec("d", registry.canonical(type_name), emit, options))


def test_every_builtin_type_is_a_driver_and_the_samples_cover_them_all():
    canonical = {registry.canonical(t) for t in registry.known_types() if not t.startswith("test-")}
    assert canonical == set(SAMPLE_OPTIONS)
    for type_name in registry.known_types():
        cls = registry.get(type_name)
        if type_name.startswith("test-"):
            continue  # other tests' stand-ins
        assert cls is not None and issubclass(cls, Driver), type_name
        assert cls.type_name == registry.canonical(type_name)


@pytest.mark.parametrize("type_name", sorted(SAMPLE_OPTIONS) + ["zeromq-server", "zeromq-sink"])
def test_info_starts_with_type_and_emit_and_ends_with_the_counters(type_name):
    driver = build(type_name, emit="go")
    assert driver.spec.emit == "go" and isinstance(driver.stats, DriverStats)
    info = driver.info()
    keys = list(info)
    assert keys[:2] == ["type", "emit"] and keys[-len(BASE_FIELDS):] == BASE_FIELDS
    assert info["type"] == registry.canonical(type_name) and info["emit"] == "go"
    assert {k: info[k] for k in BASE_FIELDS} == {**DriverStats().as_dict()}
    assert list(driver.details()) == keys[2:-len(BASE_FIELDS)]


def test_the_manifest_and_the_drivers_share_one_driver_spec():
    assert ManifestDriverSpec is DriverSpec


# -- a driver written against the base ---------------------------------------------------

@dataclass(frozen=True)
class EveryOptions:
    times: int


class Every(Driver[EveryOptions]):
    """Submits ``times`` events at start, skipping what the pool refuses."""

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> EveryOptions:
        if set(raw) - {"times"}:
            raise ctx.error("times", "the only option")
        return EveryOptions(int(raw.get("times", 1)))

    async def run(self, app: DriverHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for n in range(self.options.times):
            self.stats.ticks += 1
            self.submit_or_skip(app, n)
        task_status.started()

    def details(self) -> dict[str, Any]:
        return {"times": self.options.times}


@pytest.fixture
def every():
    registry.register("test-every", "test-every-alias")(Every)
    yield Every
    registry._DRIVERS.pop("test-every", None)
    registry._ALIASES.pop("test-every-alias", None)


async def test_a_new_driver_gets_spec_options_counters_and_info_from_the_base(every):
    options = registry.parse_options("test-every-alias", {"times": 3}, ctx("e"))
    driver = every(DriverSpec("e", "test-every", "tick", options))
    app = FakeApp(queue_limit=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
    assert [job.payload for job in app.submitted] == [0, 1]          # the third had no room
    assert [job.event for job in app.submitted] == ["tick", "tick"]
    assert driver.info() == {"type": "test-every", "emit": "tick", "times": 3, "ticks": 3, "submitted": 2,
                             "skipped": 1, "done": 0, "errors": 0, "last_error": None, "held": 0,
                             "in_flight": 2}


def test_a_driver_must_implement_run_and_parse_options():
    class NoRun(Driver[None]):
        @staticmethod
        def parse_options(raw: Any, ctx: OptionContext) -> None:
            return None

    with pytest.raises(TypeError, match="abstract"):
        NoRun(DriverSpec("x", "x", "x", None))  # type: ignore[abstract]


# -- the app's node, seen through the host protocol ---------------------------------------

class FakeCluster:
    def __init__(self, has_peers: bool) -> None:
        self.has_peers = has_peers
        self.served: list[tuple[str, str, Any]] = []

    async def serve(self, app: str, event: str, payload: Any) -> Any:
        self.served.append((app, event, payload))
        if payload == "full":
            raise QueueFull("no node had room")
        return {"served-by": "peer", "payload": payload}


class FakeNode:
    def __init__(self, cluster: FakeCluster | None) -> None:
        self.cluster = cluster


@pytest.mark.e2e   # the native-server listens on loopback
@pytest.mark.parametrize("has_peers", [True, False])
async def test_native_server_balances_through_the_cluster_of_its_apps_node(has_peers):
    cluster = FakeCluster(has_peers)
    app = FakeApp(name="web")
    app.node = FakeNode(cluster)
    driver = NativeServer(DriverSpec("n", "native-server", "work",
                                     NativeServer.parse_options({"endpoint": "tcp://127.0.0.1:0"}, ctx("n"))))
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(driver.run, app)
            async with RpcClient(address, timeout=10) as client:
                reply = await client.call("web", "ignored", 7)
                if has_peers:
                    assert reply == {"served-by": "peer", "payload": 7}
                    assert cluster.served == [("web", "work", 7)] and app.submitted == []
                    with pytest.raises(QueueFull):
                        await client.call("web", "ignored", "full")
                else:
                    assert reply == 7 and cluster.served == [] and len(app.submitted) == 1
            nursery.cancel_scope.cancel()
    stats = driver.info()
    assert stats["ticks"] == (2 if has_peers else 1)
    assert stats["skipped"] == (1 if has_peers else 0) and stats["done"] == 1
