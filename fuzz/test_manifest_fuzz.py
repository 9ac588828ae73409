"""Fuzz manifest loading (engine/manifest.py and every driver's ``parse_options``).

A manifest arrives from a file an operator wrote, from ``deploy`` (a dict over the
control endpoint) and from a cluster peer's bundle, so whatever JSON-ish value it is,
loading it ends in exactly one of two ways:

- a valid :class:`AppManifest`: frozen, its values within the documented ranges, and
  parsing its own ``raw`` again gives the same manifest;
- a :class:`ManifestError` whose message names the source file and a field path that
  leads into the value that was given (the last segment may be a key that is missing:
  a required option), and says what was expected.

Never another exception: a ``TypeError`` from a driver's options, an ``OSError`` from a
path too long to look at, a ``RecursionError`` from JSON nested too deep would each
reach the operator as a traceback (or, on a node loading a folder of apps, stop the
load of the apps after it).

The values are drawn "plausible" (the keys the parsers know, values near their
ranges) and arbitrary, mixed, so both the deep paths and the type checks are reached.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings, strategies as st

from engine.drivers import registry
from engine.errors import ManifestError
from engine.manifest import MANIFEST_FILE, AppManifest, load_manifest, parse_manifest

# -- strategies ---------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-3, 70_000) | st.integers()
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)

# Strings a path or a name may be: ordinary, escaping, absolute, long, odd.
paths = st.sampled_from(["app.py", "pkg", "missing.py", "../app.py", "/etc/hostname", "local:///etc",
                         "local://rel", "ftp://x/y", "", ".", "~/x", "~nosuchuser/x", "a\x00b",
                         "x" * 300, "/" + "d/" * 40]) | st.text(max_size=20)
numbers = st.integers(-2, 5_000) | st.floats(-1.0, 1e9) | st.sampled_from([0, 1, 1e308, -0.0, True, 2**70])


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Usually ``strategy``, sometimes any JSON value at all."""
    return st.one_of(strategy, strategy, json_values)


resource_limits = st.fixed_dictionaries({}, optional={
    "cpuset": maybe(st.fixed_dictionaries({}, optional={
        "cpuset.cpus": maybe(st.sampled_from(["0", "0-1", "1,3", "3-1", "0-99999", "", "a", 0, -1])),
        "cpuset.mems": maybe(st.sampled_from(["0", "0-1", 0]))})),
    "memory": maybe(st.sampled_from(["512M", "2G", "1 KiB", "0", "-1M", "12Q", 1 << 20, 0, -1, 1.5])),
    "cpu-time": maybe(numbers), "open-files": maybe(numbers), "bogus": json_values,
})

engine_section = st.fixed_dictionaries({}, optional={
    "pool-limit": maybe(numbers), "queue-limit": maybe(numbers), "heartbeat-timeout": maybe(numbers),
    "grow-threshold": maybe(numbers), "startup-timeout": maybe(numbers), "idle-timeout": maybe(numbers),
    "termination-timeout": maybe(numbers), "concurrency": maybe(numbers), "crashlog-limit": maybe(numbers),
    "backend": maybe(st.sampled_from(["process", "thread", "fork"])),
    "spawn": maybe(st.sampled_from(["zygote", "exec", "clone"])),
    "prefetch": maybe(st.sampled_from(["auto", "off", 0, 3, 1024, 1025, -1])),
    "resource-limits": maybe(resource_limits), "pool-limt": json_values,
})

# Option names and values the drivers know, so their parsers get past the first check.
OPTIONS = {
    "interval": numbers, "schedule": st.sampled_from(["*/5 * * * *", "* * * *", "61 * * * *", "@daily",
                                                      "99999999999999999999 * * * *"]),
    "timezone": st.sampled_from(["UTC", "Europe/Paris", "Mars/Olympus", "../../etc/passwd", "\x00",
                                 "a" * 300, ""]),
    "path": paths, "pattern": st.sampled_from(["*.txt", "a/*", ""]), "recursive": st.booleans(),
    "endpoint": st.sampled_from(["tcp://127.0.0.1:0", "tcp://127.0.0.1:99999", "127.0.0.1:9000",
                                 "ipc:///tmp/x.sock", "ipc://", "tcp://:", "ws://h:1/p", "nng+tcp://h:1",
                                 "tcp://[::1]:5", "x"]),
    "framing": st.sampled_from(["line", "length-prefixed", "morse"]), "max-frame": numbers,
    "publish": st.booleans(), "max-pending": numbers,
}
driver_types = st.sampled_from([*registry.known_types(), "no-such-driver", ""])
driver_entry = st.builds(
    lambda type_, emit, options: {**({"type": type_} if type_ is not None else {}),
                                  **({"emit": emit} if emit is not None else {}), **options},
    st.none() | driver_types | json_values,
    st.none() | st.sampled_from(["go", ""]) | json_values,
    st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: maybe(OPTIONS[k]) for k in keys})),
)
driver_names = st.sampled_from(["tick", "a.b", "x-1", "_bad", "", "bad name", "z" * 70])
drivers = st.dictionaries(driver_names, maybe(driver_entry), max_size=3)

manifests = st.fixed_dictionaries({}, optional={
    "name": maybe(st.sampled_from(["app", "a.b-c_d", "-x", "", "x" * 65, "bad/name"])),
    "type": maybe(st.sampled_from(["python", "ruby"])),
    "args": maybe(paths),
    "engine": maybe(engine_section),
    "drivers": maybe(drivers),
    "tasks": maybe(drivers),
    "pubsub": maybe(st.fixed_dictionaries({}, optional={
        "endpoint": maybe(st.sampled_from(["tcp://127.0.0.1:0", "nowhere", None]))})),
    "version": maybe(st.sampled_from([1, 0, -1, 2.5])),
    "description": maybe(st.text(max_size=10)),
    "unknown-key": json_values,
})


# -- the properties -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An app folder: ``app.py``, a package ``pkg``; ``manifest.json`` is written by the tests."""
    folder = tmp_path_factory.mktemp("app")
    (folder / "app.py").write_text("from engine import on\n")
    (folder / "pkg").mkdir()
    (folder / "pkg" / "__init__.py").write_text("")
    return folder


def leads_into(value: object, path: str) -> bool:
    """Whether ``path`` (``engine.resource-limits.cpuset.cpuset.cpus``: keys may hold
    dots themselves) walks into ``value``; its last key may be missing (a required
    field), nothing before it may."""
    if not path:
        return True
    if not isinstance(value, dict):
        return "." not in path  # a field of a value that is not an object: named, absent
    for key in value:
        key = str(key)
        if path == key:
            return True
        if path.startswith(key + ".") and leads_into(value[key], path[len(key) + 1:]):
            return True
    return "." not in path


def check_error(err: ManifestError, data: object, source: Path) -> None:
    assert err.file == str(source) and str(err).startswith(f"{source}: "), str(err)
    assert isinstance(err.expected, str) and err.expected and err.expected in str(err)
    if isinstance(data, dict) and "" not in data:  # (an unknown key "" is named by its section)
        assert err.path, f"an error about a manifest object names no field: {err}"
    if err.path.startswith("name"):
        return  # the name: from the manifest, the caller, or the folder
    assert leads_into(data, err.path), f"{err.path!r} names no field of the manifest: {err}"


def check_manifest(manifest: AppManifest, source: Path) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        manifest.name = "other"  # type: ignore[misc]
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", manifest.name)
    assert manifest.entry.exists() and manifest.source == source.absolute()
    e = manifest.engine
    for n in (e.pool_limit, e.queue_limit, e.grow_threshold, e.concurrency):
        assert type(n) is int and n >= 1
    for t in (e.heartbeat_timeout, e.startup_timeout, e.idle_timeout):
        assert math.isfinite(t) and t > 0
    assert math.isfinite(e.termination_timeout) and e.termination_timeout >= 0
    assert e.backend in ("process", "thread") and e.spawn in ("zygote", "exec")
    assert e.prefetch == "auto" or (type(e.prefetch) is int and 0 <= e.prefetch <= 1024)
    assert type(e.crashlog_limit) is int and e.crashlog_limit >= 0
    assert all(registry.get(d.type) is not None and d.emit for d in manifest.drivers)
    assert len({d.name for d in manifest.drivers}) == len(manifest.drivers)
    assert parse_manifest(manifest.raw, source=source) == manifest  # its own raw: the same app


@given(st.one_of(manifests, manifests, json_values))
@example({"args": "x" * 300})                        # ENAMETOOLONG from path.exists()
@example({"args": "app.py", "drivers": {"w": {"type": "filesystem-monitor", "path": "~nosuchuser/x"}}})
@example({"args": "app.py", "drivers": {"c": {"type": "cron", "schedule": "* * * * *",
                                              "timezone": "a" * 300}}})
def test_a_manifest_is_valid_and_frozen_or_a_manifest_error_naming_its_field(app_dir, data):
    source = app_dir / MANIFEST_FILE
    try:
        manifest = parse_manifest(data, source=source)
    except ManifestError as err:
        check_error(err, data, source)
    else:
        check_manifest(manifest, source)


@given(st.one_of(manifests.map(json.dumps), json_values.map(lambda v: json.dumps(v)[:40]),
                 st.text(max_size=40), st.binary(max_size=40)))
@example("[" * 100_000)                          # nesting the JSON parser cannot follow
@example(b"\xff\xfe{}")                          # not UTF-8
def test_a_manifest_file_loads_or_raises_a_manifest_error_naming_the_file(app_dir, text):
    source = app_dir / MANIFEST_FILE
    if isinstance(text, bytes):
        source.write_bytes(text)
    else:
        source.write_text(text, encoding="utf-8")
    try:
        manifest = load_manifest(app_dir)
    except ManifestError as err:
        assert err.file == str(source) and str(err).startswith(f"{source}: "), str(err)
        assert err.expected
    else:
        check_manifest(manifest, source)


@given(st.text(max_size=20) | st.sampled_from(["app", "-x", "x" * 65]))
def test_a_name_given_by_the_caller_is_checked_like_the_manifests(app_dir, name):
    try:
        manifest = parse_manifest({"args": "app.py"}, source=app_dir / MANIFEST_FILE, name=name)
    except ManifestError as err:
        assert err.path == "name" and repr(name)[:40] in str(err)
    else:
        assert manifest.name == name
