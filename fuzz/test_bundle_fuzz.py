"""Fuzz what a cluster node installs from a peer: app bundles (engine/cluster/bundle.py).

A bundle arrives as a msgpack value from a peer (sealed with the cluster's secret, but
a peer may be buggy, old, or the secret shared too widely), and installing it writes
files and then runs the app, so:

- ``check_bundle`` of any value returns the bundle or raises ``BundleError`` naming
  what is wrong, never another exception;
- a bundle it accepts is self-contained: ``write_bundle`` writes only regular files,
  each inside the app's new folder (no ``..``, no absolute path, nothing through a
  link), with exactly the bytes given, and the manifest's entry (``args``) is one of
  them or a folder of them, inside the folder;
- the files' paths are drawn to be hostile (``..``, absolute, ``\\``, NUL, ``.``,
  a file that is also another's folder, the manifest's own name), and the digest is
  computed right, so the checks past the digest's are reached.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import msgpack
import pytest
from hypothesis import event, example, given, strategies as st

from engine.cluster.bundle import BundleError, check_bundle, digest_of, write_bundle
from engine.manifest import MANIFEST_FILE

segments = st.sampled_from(["app.py", "pkg", "__init__.py", "..", ".", "", "a", "b.txt", ".env",
                            MANIFEST_FILE, "x\\y", "n\x00", "~", "é"])
paths = st.one_of(st.lists(segments, min_size=1, max_size=3).map("/".join),
                  st.lists(segments, min_size=1, max_size=2).map(lambda p: "/" + "/".join(p)),
                  st.text(max_size=12))
json_ish = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
                        | st.text(max_size=6) | st.binary(max_size=4),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
manifests = st.fixed_dictionaries({}, optional={
    "args": st.sampled_from(["app.py", "pkg", "pkg/", "./app.py", "../app.py", "/etc/passwd", "local:///x",
                             "a/../app.py", "", "missing.py"]) | json_ish,
    "name": st.text(max_size=5), "engine": json_ish, "drivers": json_ish,
}) | json_ish
names = st.sampled_from(["app", "a.b", "", ".hidden", "x/y", "n\x00", "..", "z" * 200]) | json_ish


@st.composite
def bundles(draw: st.DrawFn) -> object:
    """A bundle whose digest matches its content (so the path checks are what decide):
    nearly right (a good entry, good files, now and then one hostile path) or made of
    anything; and now and then a field replaced by anything."""
    if draw(st.booleans()):
        entry = draw(st.sampled_from(["app.py", "pkg/__init__.py", "pkg", "./app.py", "pkg/"]))
        files = {("app.py" if "app" in entry else "pkg/__init__.py"): b"from engine import on\n"}
        files.update(draw(st.dictionaries(st.lists(st.sampled_from(["a", "b.txt", "pkg", "x.py", "é", ".env"]),
                                                   min_size=1, max_size=3).map("/".join),
                                          st.binary(max_size=8), max_size=4)))
        if draw(st.integers(0, 2)) == 0:
            files[draw(paths)] = b"hostile"
        manifest: object = {"args": entry, **draw(st.fixed_dictionaries({}, optional={"engine": json_ish}))}
        name = draw(st.sampled_from(["app", "a.b"]))
    else:
        files = draw(st.dictionaries(paths, st.binary(max_size=8), max_size=5))
        manifest, name = draw(manifests), draw(names)
    bundle: dict[object, object] = {"name": name, "manifest": manifest, "files": files}
    try:
        bundle["digest"] = digest_of(manifest, files)
    except (TypeError, ValueError, RecursionError):
        bundle["digest"] = "0" * 64
    if draw(st.integers(0, 5)) == 0:
        bundle[draw(st.sampled_from(["name", "manifest", "files", "digest", "x"]))] = draw(json_ish)
    return bundle


@pytest.fixture(scope="module")
def counter() -> itertools.count:
    return itertools.count()


@given(st.one_of(bundles(), json_ish))
@example({"name": "app", "manifest": {"args": "app.py", "x": b"\x00"}, "files": {"app.py": b""},
          "digest": "0" * 64})          # a manifest JSON cannot carry (msgpack can): TypeError
@example({"name": "app", "manifest": {"args": "app.py"},   # another name of app.py, which overwrote it
          "files": {"app.py": b"good", "app.py/.": b"evil"},
          "digest": digest_of({"args": "app.py"}, {"app.py": b"good", "app.py/.": b"evil"})})
@example({"name": "app", "manifest": {"args": "app.py"},   # a folder where the manifest is written
          "files": {"app.py": b"", "manifest.json/x": b""},
          "digest": digest_of({"args": "app.py"}, {"app.py": b"", "manifest.json/x": b""})})
def test_a_bundle_is_refused_with_bundle_error_or_is_self_contained(tmp_path_factory, counter, bundle):
    if isinstance(bundle, dict):
        msgpack.packb(bundle, use_bin_type=True)   # (what a peer could have sent)
    try:
        checked = check_bundle(bundle, limit=1 << 16)
    except BundleError as exc:
        assert str(exc)
        event("refused")
        return
    event("accepted")
    apps = tmp_path_factory.mktemp(f"apps{next(counter)}")
    target = write_bundle(checked, apps)
    root = target.resolve()
    assert root.parent == apps.resolve()
    written: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert not path.is_symlink(), f"a link in the installed app: {path}"
            assert path.resolve().is_relative_to(root), f"written outside the app's folder: {path}"
        for name in filenames:
            path = Path(dirpath) / name
            written[path.relative_to(root).as_posix()] = path.read_bytes()
    assert sorted(os.listdir(apps)) == [target.name], "something written beside the app's folder"
    manifest_bytes = written.pop(MANIFEST_FILE)
    assert written == checked["files"] and manifest_bytes
    entry = checked["manifest"].get("args", "app.py")
    entry_path = (root / entry).resolve()
    assert entry_path.is_relative_to(root) and entry_path.exists(), f"entry {entry!r} not in the app"
