"""``filesystem-monitor``: one job per created, modified, deleted or moved file.

Options: ``path`` (a directory, or one file; relative to the manifest's folder),
``pattern`` (a glob matched against the file name, or against the path relative to
``path`` when it contains a ``/``; default every file), ``recursive`` (watch
subdirectories too, including ones created later; default false).

The payload is ``{"kind", "path", "relative"}`` plus ``"src"`` (the old path) for
``moved``; ``kind`` ``overflow`` means the kernel queue overflowed and changes were lost
(rescan if that matters).  A file counts as ``modified`` when a writer closes it, not
on every write(2).  Backpressure: when the pool is full the driver stops reading,
the kernel queues events (``fs.inotify.max_queued_events``), and an ``overflow``
event reports anything lost beyond that.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from engine.errors import DriverError
from engine.drivers.base import Driver, DriverHost, run_job_quietly, submit_holding
from engine.drivers.inotify import Change, ChangeTracker, Inotify, parse_events, walk_dirs
from engine.drivers.options import DriverSpec, OptionContext, check_keys, opt_bool, opt_str
from engine.drivers.registry import register

# A rename arrives as MOVED_FROM then MOVED_TO; they can straddle two reads, so an
# unpaired MOVED_FROM waits this long for its partner before it counts as deleted.
MOVE_PAIRING_WINDOW = 0.02


@dataclass(frozen=True)
class FsMonitorOptions:
    path: Path
    pattern: str | None = None
    recursive: bool = False


@register("filesystem-monitor")
class FilesystemMonitor(Driver[FsMonitorOptions]):
    def __init__(self, spec: DriverSpec) -> None:
        super().__init__(spec)
        self.watches = 0
        self._root = ""                       # the watched directory (set by run)
        self._only_file: str | None = None    # watching one file: its path

    @staticmethod
    def parse_options(raw: Any, ctx: OptionContext) -> FsMonitorOptions:
        check_keys(raw, ctx, ["path", "pattern", "recursive"])
        text = opt_str(raw, ctx, "path")
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # ~user of no user here: no home to expand it to
            raise ctx.error("path", "a path (~user/... only for a user of this machine)", text) from None
        if not path.is_absolute():
            path = ctx.base_dir / path
        return FsMonitorOptions(path=path, pattern=opt_str(raw, ctx, "pattern", default=None),
                                recursive=opt_bool(raw, ctx, "recursive", default=False))

    def _wanted(self, change: Change) -> bool:
        if change.kind == "overflow":
            return True
        if self._only_file is not None:
            return change.path == self._only_file or change.src == self._only_file
        pattern = self.options.pattern
        if pattern is None:
            return True
        for path in (change.path, change.src):
            if path is None:
                continue
            subject = os.path.relpath(path, self._root) if "/" in pattern else os.path.basename(path)
            if fnmatch.fnmatchcase(subject, pattern):
                return True
        return False

    async def run(self, app: DriverHost, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        target = self.options.path
        if target.is_dir():
            self._root, self._only_file = str(target), None
        elif target.exists():   # one file: watch its folder, keep only that name
            self._root, self._only_file = str(target.parent), str(target)
        else:
            raise DriverError(f"path {str(target)!r} does not exist")
        try:
            inotify = Inotify()
        except OSError as exc:
            raise DriverError(f"cannot start inotify: {exc}") from None
        tracker = ChangeTracker(recursive=self.options.recursive and self._only_file is None)
        try:
            try:
                self._watch(inotify, tracker, self._root)
            except OSError as exc:
                raise DriverError(f"cannot watch {self._root!r}: {exc}") from None
            if tracker.recursive:
                for sub in list(walk_dirs(self._root))[1:]:
                    self._watch_quietly(inotify, tracker, sub)
            async with trio.open_nursery() as jobs:
                task_status.started()
                await self._loop(app, inotify, tracker, jobs)
        finally:
            trio.lowlevel.notify_closing(inotify.fd)
            inotify.close()

    def _watch(self, inotify: Inotify, tracker: ChangeTracker, path: str) -> None:
        tracker.watched(inotify.add_watch(path), path)
        self.watches = len(tracker.dirs)

    def _watch_quietly(self, inotify: Inotify, tracker: ChangeTracker, path: str) -> bool:
        try:
            self._watch(inotify, tracker, path)
            return True
        except OSError:
            return False  # gone already, or the watch limit: the rest still works

    async def _loop(self, app: DriverHost, inotify: Inotify, tracker: ChangeTracker, jobs: trio.Nursery) -> None:
        while True:
            data = inotify.read()
            if data is None:
                if tracker.pending_moves:
                    with trio.move_on_after(MOVE_PAIRING_WINDOW):
                        await trio.lowlevel.wait_readable(inotify.fd)
                        continue
                    changes, unwatch = tracker.flush_moves()
                    for wd in unwatch:
                        inotify.rm_watch(wd)
                    await self._emit(app, changes, jobs)
                    continue
                await trio.lowlevel.wait_readable(inotify.fd)
                continue
            changes, new_dirs, _ = tracker.feed(parse_events(data))
            for path in new_dirs:
                changes.extend(self._adopt_dir(inotify, tracker, path))
            await self._emit(app, changes, jobs)

    def _adopt_dir(self, inotify: Inotify, tracker: ChangeTracker, path: str) -> list[Change]:
        """A directory appeared (recursive mode): watch it and everything under it, and
        report files already inside, which were created before our watch existed."""
        found: list[Change] = []
        for sub in walk_dirs(path):
            if not self._watch_quietly(inotify, tracker, sub):
                continue
            try:
                names = os.listdir(sub)
            except OSError:
                continue
            for name in names:
                full = os.path.join(sub, name)
                if os.path.isfile(full):
                    found.append(Change("created", full))
        return found

    async def _emit(self, app: DriverHost, changes: list[Change], jobs: trio.Nursery) -> None:
        for change in changes:
            if not self._wanted(change):
                continue
            self.stats.ticks += 1
            payload = change.payload(self._root)
            if change.kind == "overflow":
                payload["path"] = self._root
            job = await submit_holding(app, self.spec.emit, payload, self.stats)
            jobs.start_soon(run_job_quietly, job, self.stats)

    def details(self) -> dict[str, Any]:
        return {"path": str(self.options.path), "pattern": self.options.pattern,
                "recursive": self.options.recursive, "watches": self.watches}
