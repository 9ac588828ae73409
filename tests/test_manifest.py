"""Manifest parsing: both seed shapes, defaults, and errors that name file + field path."""
from __future__ import annotations

import json
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path

import pytest

from engine.drivers import registry
from engine.errors import ManifestError
from engine.manifest import (
    AppManifest,
    EngineConfig,
    ResourceLimits,
    load_manifest,
    parse_manifest,
)


@dataclass(frozen=True)
class FakeOptions:
    interval: float


class FakeTimer:
    """A stand-in driver type: validates one option the way real drivers do."""

    @classmethod
    def parse_options(cls, raw, ctx):
        unknown = set(raw) - {"interval"}
        if unknown:
            raise ctx.error(sorted(unknown)[0], "a known option (interval)")
        interval = raw.get("interval", 1000)
        if not isinstance(interval, int) or interval <= 0:
            raise ctx.error("interval", "a positive number of milliseconds", interval)
        return FakeOptions(interval / 1000)

    def __init__(self, spec):
        self.spec = spec


@pytest.fixture
def fake_driver():
    registry.register("test-fake-timer", "test-fake-alias")(FakeTimer)
    yield FakeTimer
    registry._DRIVERS.pop("test-fake-timer", None)
    registry._ALIASES.pop("test-fake-alias", None)


@pytest.fixture
def app_dir(tmp_path):
    folder = tmp_path / "myapp"
    folder.mkdir()
    (folder / "app.py").write_text("")
    return folder


def write(folder: Path, data) -> Path:
    path = folder / "manifest.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def error_of(folder: Path, data) -> ManifestError:
    path = write(folder, data)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    err = info.value
    assert err.file == str(path)
    assert str(path) in str(err)
    return err


# -- the good shapes ----------------------------------------------------------------------

def test_minimal_manifest_takes_every_default(app_dir):
    m = load_manifest(write(app_dir, {}))
    assert isinstance(m, AppManifest)
    assert m.name == "myapp"                       # the folder's name
    assert m.type == "python"
    assert m.entry == app_dir / "app.py"
    assert m.engine == EngineConfig()
    assert m.drivers == ()
    assert m.pubsub is None
    assert m.source == (app_dir / "manifest.json").absolute()
    with pytest.raises(FrozenInstanceError):
        m.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("value", ["auto", 0, 1, 16, 1024])
def test_prefetch_is_auto_by_default_or_a_fixed_number(app_dir, value):
    assert load_manifest(write(app_dir, {})).engine.prefetch == "auto"
    assert load_manifest(write(app_dir, {"engine": {"prefetch": value}})).engine.prefetch == value


def test_load_accepts_the_folder(app_dir):
    write(app_dir, {"name": "named"})
    assert load_manifest(app_dir).name == "named"
    assert load_manifest(app_dir, name="override").name == "override"


def test_drivers_shape_from_the_cocaine_seed(app_dir, fake_driver):
    m = load_manifest(write(app_dir, {
        "type": "python",
        "engine": {
            "heartbeat-timeout": 60, "pool-limit": 20, "queue-limit": 5,
            "resource-limits": {"cpuset": {"cpuset.cpus": "0-3", "cpuset.mems": "1"}},
        },
        "drivers": {
            "ultimate-aggregator": {"emit": "aggregate", "type": "test-fake-timer", "interval": 60000},
            "other": {"emit": "tick", "type": "test-fake-alias"},
        },
    }))
    assert m.engine.heartbeat_timeout == 60.0     # seconds
    assert m.engine.pool_limit == 20 and m.engine.queue_limit == 5
    assert m.engine.resource_limits.cpus == frozenset({0, 1, 2, 3})
    assert m.engine.resource_limits.mems == "1"
    agg, other = m.drivers
    assert (agg.name, agg.type, agg.emit, agg.options) == (
        "ultimate-aggregator", "test-fake-timer", "aggregate", FakeOptions(60.0))
    assert other.type == "test-fake-timer"        # alias resolved to the canonical type
    assert other.options == FakeOptions(1.0)


def test_tasks_shape_event_name_is_the_key(app_dir, fake_driver):
    m = load_manifest(write(app_dir, {
        "type": "python", "version": 1, "description": "the older shape",
        "engine": {"backend": "process"},
        "pubsub": {"endpoint": "tcp://127.0.0.1:9200"},
        "tasks": {"aggregate": {"interval": 500, "type": "test-fake-timer"}},
    }))
    (task,) = m.drivers
    assert (task.name, task.emit, task.options) == ("aggregate", "aggregate", FakeOptions(0.5))
    assert m.pubsub.endpoint == "tcp://127.0.0.1:9200"
    assert m.version == 1


def test_every_engine_key(app_dir):
    m = load_manifest(write(app_dir, {"engine": {
        "pool-limit": 3, "queue-limit": 7, "heartbeat-timeout": 2.5, "grow-threshold": 2,
        "startup-timeout": 4, "idle-timeout": 0.5, "termination-timeout": 0,
        "backend": "process", "spawn": "exec", "concurrency": 8, "prefetch": 16,
        "crashlog-limit": 0, "resource-limits": {"cpuset": {"cpuset.cpus": "0-1,5,7-8"}, "memory": "512M",
                            "cpu-time": 30, "open-files": 256},
    }}))
    assert m.engine == EngineConfig(
        pool_limit=3, queue_limit=7, heartbeat_timeout=2.5, grow_threshold=2,
        startup_timeout=4.0, idle_timeout=0.5, termination_timeout=0.0, backend="process",
        spawn="exec", concurrency=8, prefetch=16, crashlog_limit=0,
        resource_limits=ResourceLimits(cpus=frozenset({0, 1, 5, 7, 8}), memory_bytes=512 << 20,
                                       cpu_seconds=30, open_files=256),
    )


def test_thread_backend_refuses_resource_limits_it_could_not_apply(app_dir):
    assert load_manifest(write(app_dir, {"engine": {"backend": "thread"}})).engine.backend == "thread"
    with pytest.raises(ManifestError) as err:
        load_manifest(write(app_dir, {"engine": {"backend": "thread",
                                                 "resource-limits": {"memory": "1G"}}}))
    assert "engine.resource-limits" in str(err.value) and "node's process" in str(err.value)


@pytest.mark.parametrize("memory, expected", [
    (1048576, 1 << 20), ("100", 100), ("64k", 64 << 10), ("2G", 2 << 30), ("3MiB", 3 << 20),
    ("1 GB", 1 << 30),
])
def test_memory_sizes(app_dir, memory, expected):
    m = load_manifest(write(app_dir, {"engine": {"resource-limits": {"memory": memory}}}))
    assert m.engine.resource_limits.memory_bytes == expected


def test_args_relative_absolute_and_local_scheme(app_dir, tmp_path):
    (app_dir / "pkg").mkdir()
    (app_dir / "pkg" / "__init__.py").write_text("")
    assert load_manifest(write(app_dir, {"args": "pkg/__init__.py"})).entry == app_dir / "pkg" / "__init__.py"
    assert load_manifest(write(app_dir, {"args": "pkg"})).entry == app_dir / "pkg"
    elsewhere = tmp_path / "elsewhere.py"
    elsewhere.write_text("")
    assert load_manifest(write(app_dir, {"args": f"local://{elsewhere}"})).entry == elsewhere
    assert load_manifest(write(app_dir, {"args": "../elsewhere.py"})).entry == elsewhere


def test_parse_manifest_from_data_and_relative_file_in_messages(app_dir, monkeypatch):
    monkeypatch.chdir(app_dir.parent)
    m = parse_manifest({"name": "x"}, source=Path("myapp/manifest.json"))
    assert m.entry == app_dir / "app.py"
    with pytest.raises(ManifestError) as info:
        parse_manifest({"engine": {"pool-limit": -1}}, source=Path("myapp/manifest.json"))
    assert str(info.value) == "myapp/manifest.json: engine.pool-limit: expected a positive integer, got -1"


# -- errors: each names the file and the field path --------------------------------------

@pytest.mark.parametrize("data, path, words", [
    ({"engine": {"pool-limit": -1}}, "engine.pool-limit", "positive integer"),
    ({"engine": {"pool-limit": True}}, "engine.pool-limit", "positive integer"),
    ({"engine": {"queue-limit": "5"}}, "engine.queue-limit", "positive integer"),
    ({"engine": {"heartbeat-timeout": 0}}, "engine.heartbeat-timeout", "seconds"),
    ({"engine": {"request-timeout": 0}}, "engine.request-timeout", "seconds, or null"),
    ({"engine": {"request-timeout": "5"}}, "engine.request-timeout", "seconds, or null"),
    ({"engine": {"idle-timeout": "10s"}}, "engine.idle-timeout", "seconds"),
    ({"engine": {"termination-timeout": -1}}, "engine.termination-timeout", "seconds"),
    ({"engine": {"backend": "fork"}}, "engine.backend", "process, thread"),
    ({"engine": {"spawn": "fork"}}, "engine.spawn", "zygote, exec"),
    ({"engine": {"concurrency": 0}}, "engine.concurrency", "positive integer"),
    ({"engine": {"crashlog-limit": -2}}, "engine.crashlog-limit", "non-negative"),
    ({"engine": {"prefetch": -1}}, "engine.prefetch", "0 to 1024"),
    ({"engine": {"prefetch": 5000}}, "engine.prefetch", "0 to 1024"),
    ({"engine": {"prefetch": True}}, "engine.prefetch", "0 to 1024"),
    ({"engine": {"prefetch": 2.5}}, "engine.prefetch", "0 to 1024"),
    ({"engine": {"prefetch": "fast"}}, "engine.prefetch", '"auto" or a whole number'),
    ({"engine": {"prefetch": 2000}}, "engine.prefetch", '"auto" or a whole number'),
    ({"engine": {"prefetch": "Auto"}}, "engine.prefetch", '"auto"'),
    ({"engine": {"prefetch": None}}, "engine.prefetch", '"auto"'),
    ({"engine": {"grow-threshold": 1.5}}, "engine.grow-threshold", "positive integer"),
    ({"engine": []}, "engine", "JSON object"),
    ({"engine": {"resource-limits": {"memory": "lots"}}}, "engine.resource-limits.memory", "512M"),
    ({"engine": {"resource-limits": {"memory": 0}}}, "engine.resource-limits.memory", "positive"),
    ({"engine": {"resource-limits": {"cpu-time": -5}}}, "engine.resource-limits.cpu-time", "positive"),
    ({"engine": {"resource-limits": {"open-files": "many"}}}, "engine.resource-limits.open-files", "positive"),
    ({"engine": {"resource-limits": {"cpuset": {"cpuset.cpus": "3-1"}}}},
     "engine.resource-limits.cpuset.cpuset.cpus", "CPU list"),
    ({"engine": {"resource-limits": {"cpuset": {"cpuset.cpus": "a,b"}}}},
     "engine.resource-limits.cpuset.cpuset.cpus", "CPU list"),
    ({"engine": {"resource-limits": {"cpuset": {"cpus": "0"}}}},
     "engine.resource-limits.cpuset.cpus", "cpuset.cpus"),
    ({"type": "whitespace"}, "type", "python"),
    ({"args": 5}, "args", "entry"),
    ({"args": "missing.py"}, "args", "existing"),
    ({"args": "local://relative/app.py"}, "args", "absolute"),
    ({"args": "http://example.com/app.py"}, "args", "no other schemes"),
    ({"name": "bad name!"}, "name", "app name"),
    ({"pubsub": {"endpoint": 9200}}, "pubsub.endpoint", "nng address"),
    ({"pubsub": {"endpiont": "tcp://x:1"}}, "pubsub.endpiont", "endpoint"),
    ({"version": "one"}, "version", "integer"),
    ({"drivers": [1]}, "drivers", "JSON object"),
    ({"drivers": {"d": "timer"}}, "drivers.d", "JSON object"),
    ({"drivers": {"d": {"emit": "x"}}}, "drivers.d.type", "driver type"),
    ({"drivers": {"d": {"type": "no-such-driver"}}}, "drivers.d.type", "one of"),
    ({"drivers": {"d": {"type": "test-fake-timer", "emit": ""}}}, "drivers.d.emit", "event name"),
    ({"drivers": {"d": {"type": "test-fake-timer", "interval": -1}}}, "drivers.d.interval", "milliseconds"),
    ({"tasks": {"t": {"type": "test-fake-timer", "intreval": 5}}}, "tasks.t.intreval", "interval"),
    ({"drivers": {}, "tasks": {}}, "tasks", "not both"),
])
def test_errors_name_the_file_and_field_path(app_dir, fake_driver, data, path, words):
    err = error_of(app_dir, data)
    assert err.path == path
    assert f": {path}: expected " in str(err)
    assert words in str(err)


@pytest.mark.parametrize("data, path, hint", [
    ({"engine": {"pool-limt": 3}}, "engine.pool-limt", "'pool-limit'"),
    ({"drivres": {}}, "drivres", "'drivers'"),
    ({"engine": {"resource-limits": {"memroy": 5}}}, "engine.resource-limits.memroy", "'memory'"),
    ({"zzz": 1}, "zzz", "a known key"),
])
def test_unknown_keys_are_rejected_with_a_hint(app_dir, data, path, hint):
    err = error_of(app_dir, data)
    assert err.path == path
    assert hint in str(err)


def test_bad_json_names_line_and_column(app_dir):
    err = error_of(app_dir, '{"engine": {"pool-limit": 3 "queue-limit": 1}}')
    assert err.path == ""
    assert "valid JSON" in str(err) and "line 1" in str(err)


def test_not_an_object(app_dir):
    err = error_of(app_dir, "[1, 2]")
    assert "expected a JSON object" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "nope" / "manifest.json")
    assert "nope/manifest.json" in str(info.value)
    assert "no such file" in str(info.value)


def test_folder_name_that_is_not_an_app_name(tmp_path):
    folder = tmp_path / "has space"
    folder.mkdir()
    (folder / "app.py").write_text("")
    err = error_of(folder, {})
    assert err.path.startswith("name")
    # an explicit name fixes it
    assert load_manifest(folder / "manifest.json", name="ok").name == "ok"


def test_request_timeout_is_seconds_or_null(tmp_path):
    (tmp_path / "app.py").write_text("")
    def engine(**raw):
        return parse_manifest({"type": "python", "args": "app.py", "engine": raw},
                              source=tmp_path / "manifest.json").engine
    assert engine().request_timeout is None
    assert engine(**{"request-timeout": None}).request_timeout is None
    assert engine(**{"request-timeout": 2.5}).request_timeout == 2.5
