"""filesystem-monitor: the pure inotify core on bytes, and the driver on a real tmp dir."""
import os
import struct

import pytest
import trio

from engine.drivers import inotify as ino
from engine.drivers.fsmonitor import FilesystemMonitor
from engine.drivers.registry import OptionContext
from engine.drivers.testing import FakeApp
from engine.errors import DriverError, ManifestError
from engine.manifest import DriverSpec
from support import wait_until


def raw(wd, mask, name="", cookie=0):
    name_b = name.encode()
    padded = name_b + b"\0" * (16 - len(name_b) % 16) if name_b else b""
    return struct.pack("iIII", wd, mask, cookie, len(padded)) + padded


def test_parse_events_handles_padding_and_empty_names():
    data = raw(1, ino.IN_CREATE, "a.txt") + raw(1, ino.IN_DELETE_SELF) + raw(2, ino.IN_CLOSE_WRITE, "x" * 16)
    assert ino.parse_events(data) == [
        ino.RawEvent(1, ino.IN_CREATE, 0, "a.txt"), ino.RawEvent(1, ino.IN_DELETE_SELF, 0, ""),
        ino.RawEvent(2, ino.IN_CLOSE_WRITE, 0, "x" * 16)]


def test_tracker_pairs_moves_and_coalesces_create_write():
    t = ino.ChangeTracker(recursive=True)
    t.watched(1, "/r")
    t.watched(2, "/r/sub")
    changes, watch, _ = t.feed(ino.parse_events(
        raw(1, ino.IN_CREATE, "a") + raw(1, ino.IN_CLOSE_WRITE, "a")
        + raw(1, ino.IN_MOVED_FROM, "a", cookie=7) + raw(2, ino.IN_MOVED_TO, "b", cookie=7)
        + raw(1, ino.IN_CREATE | ino.IN_ISDIR, "newdir") + raw(2, ino.IN_DELETE, "b")
        + raw(1, ino.IN_CLOSE_WRITE, "c") + raw(1, ino.IN_CLOSE_WRITE, "c")))
    assert changes == [ino.Change("created", "/r/a"), ino.Change("moved", "/r/sub/b", src="/r/a"),
                       ino.Change("deleted", "/r/sub/b"), ino.Change("modified", "/r/c")]
    assert watch == ["/r/newdir"]


def test_tracker_unpaired_moves_and_renamed_dirs():
    t = ino.ChangeTracker(recursive=True)
    t.watched(1, "/r")
    t.watched(2, "/r/d")
    t.watched(3, "/r/d/e")
    changes, _, _ = t.feed(ino.parse_events(
        raw(1, ino.IN_MOVED_FROM | ino.IN_ISDIR, "d", cookie=1) + raw(1, ino.IN_MOVED_TO | ino.IN_ISDIR, "z", cookie=1)
        + raw(1, ino.IN_MOVED_FROM, "gone", cookie=2) + raw(1, ino.IN_MOVED_TO, "came", cookie=3)))
    assert changes == [ino.Change("created", "/r/came")]
    assert t.dirs == {1: "/r", 2: "/r/z", 3: "/r/z/e"}
    flushed, unwatch = t.flush_moves()
    assert flushed == [ino.Change("deleted", "/r/gone")] and unwatch == []


def test_tracker_overflow_is_reported():
    t = ino.ChangeTracker(recursive=False)
    changes, _, _ = t.feed([ino.RawEvent(-1, ino.IN_Q_OVERFLOW, 0, "")])
    assert changes == [ino.Change("overflow", "")]


def make(tmp_path, **raw_opts):
    ctx = OptionContext(file="m.json", path="drivers.fs", base_dir=tmp_path)
    opts = FilesystemMonitor.parse_options(raw_opts, ctx)
    return FilesystemMonitor(DriverSpec("fs", "filesystem-monitor", "changed", opts))


async def test_monitor_reports_each_kind_of_change(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    app = FakeApp()
    driver = make(tmp_path, path=".", recursive=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        (tmp_path / "new.txt").write_text("hello")
        await wait_until(lambda: len(app.submitted) >= 1, "the new file is reported")
        with open(tmp_path / "old.txt", "a") as f:
            f.write("more")
        os.rename(tmp_path / "new.txt", tmp_path / "renamed.txt")
        os.unlink(tmp_path / "old.txt")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "deep.txt").write_text("d")
        await wait_until(lambda: len(app.submitted) >= 5, "five changes are reported")
        nursery.cancel_scope.cancel()
    seen = [(j.payload["kind"], j.payload["relative"]) for j in app.submitted]
    assert seen[:4] == [("created", "new.txt"), ("modified", "old.txt"),
                        ("moved", "renamed.txt"), ("deleted", "old.txt")]
    assert seen[4] == ("created", os.path.join("sub", "deep.txt"))
    assert app.submitted[2].payload["src"] == str(tmp_path / "new.txt")
    assert all(j.event == "changed" for j in app.submitted)
    assert driver.info()["ticks"] == len(app.submitted)


async def test_monitor_pattern_and_non_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    app = FakeApp()
    driver = make(tmp_path, path=str(tmp_path), pattern="*.csv")
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        (tmp_path / "skip.txt").write_text("x")
        (tmp_path / "sub" / "deep.csv").write_text("x")  # not recursive: unseen
        (tmp_path / "take.csv").write_text("x")
        # inotify reports in order: once take.csv is in, the two written before it have
        # been read too, and left out (a watch on sub/ would have reported deep.csv).
        await wait_until(lambda: app.submitted, "take.csv is reported")
        nursery.cancel_scope.cancel()
    assert [j.payload["relative"] for j in app.submitted] == ["take.csv"]


async def test_monitor_holds_when_pool_is_full_and_loses_nothing(tmp_path):
    release = trio.Event()
    async def slow(event, payload):
        await release.wait()
    app = FakeApp(slow, queue_limit=2)
    driver = make(tmp_path, path=".")
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run, app)
        for i in range(6):
            (tmp_path / f"f{i}").write_text("x")
        await wait_until(lambda: driver.stats.held >= 1, "the monitor holds a change back")
        assert len(app.submitted) == 2
        release.set()
        await wait_until(lambda: len(app.submitted) == 6, "all six files are reported")
        nursery.cancel_scope.cancel()
    assert sorted(j.payload["relative"] for j in app.submitted) == [f"f{i}" for i in range(6)]


async def test_missing_path_fails_to_start(tmp_path):
    driver = make(tmp_path, path="nope")
    async with trio.open_nursery() as nursery:
        with pytest.raises(DriverError, match="does not exist"):
            await nursery.start(driver.run, FakeApp())


def test_options_validated(tmp_path):
    ctx = OptionContext(file="m.json", path="drivers.fs", base_dir=tmp_path)
    for bad, field in [({}, "path"), ({"path": "."
                                       , "recursive": "yes"}, "recursive"), ({"path": 3}, "path")]:
        with pytest.raises(ManifestError) as info:
            FilesystemMonitor.parse_options(bad, ctx)
        assert info.value.path == f"drivers.fs.{field}"
