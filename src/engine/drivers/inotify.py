"""Linux inotify, split into a pure core and a few syscalls.

:func:`parse_events` turns the bytes read from an inotify descriptor into
:class:`RawEvent`\\ s; :class:`ChangeTracker` turns those into file-level
:class:`Change`\\ s (created / modified / deleted / moved), keeps the watch
descriptor → directory map, pairs ``MOVED_FROM``/``MOVED_TO`` by cookie, and says
which directories need a new watch (recursive mode).  Neither does I/O, so both are
tested with plain bytes.  :class:`Inotify` is the thin syscall layer (ctypes, libc).

Why not a library: watchfiles (Rust notify) reports a rename as delete + add, and
runs its loop in a thread; reading inotify directly gives real "moved" events and
lets trio wait on the descriptor itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import struct
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# What we ask the kernel for.  CLOSE_WRITE (not MODIFY) marks a modification: one
# event per finished write instead of one per write(2) call.
WATCH_MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class RawEvent(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: str


def parse_events(data: bytes) -> list[RawEvent]:
    """Decode a buffer of ``struct inotify_event``s (names are NUL-padded)."""
    out = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        raw_name = data[offset:offset + length].split(b"\0", 1)[0]
        offset += length
        out.append(RawEvent(wd, mask, cookie, os.fsdecode(raw_name)))
    return out


@dataclass(frozen=True)
class Change:
    kind: str                 # "created" | "modified" | "deleted" | "moved" | "overflow"
    path: str                 # absolute path (the new one for "moved")
    src: str | None = None    # the old path of a "moved" file

    def payload(self, root: str) -> dict[str, str]:
        body = {"kind": self.kind, "path": self.path,
                "relative": os.path.relpath(self.path, root) if self.kind != "overflow" else "."}
        if self.src is not None:
            body["src"] = self.src
        return body


@dataclass
class ChangeTracker:
    """Pure translation of raw inotify events into file changes."""

    recursive: bool
    dirs: dict[int, str] = field(default_factory=dict)        # wd -> directory path
    pending_moves: dict[int, tuple[str, bool]] = field(default_factory=dict)  # cookie -> (old path, is_dir)

    def watched(self, wd: int, path: str) -> None:
        self.dirs[wd] = path

    def feed(self, events: list[RawEvent]) -> tuple[list[Change], list[str], list[int]]:
        """Returns (changes, directories to watch, watch descriptors to drop).

        A ``MOVED_FROM`` whose ``MOVED_TO`` has not arrived stays pending; call
        :meth:`flush_moves` once no more events are coming to report it as deleted.
        """
        changes: list[Change] = []
        watch: list[str] = []
        unwatch: list[int] = []
        for ev in events:
            if ev.mask & IN_Q_OVERFLOW:
                changes.append(Change("overflow", ""))
                continue
            if ev.mask & IN_IGNORED:
                self.dirs.pop(ev.wd, None)
                continue
            base = self.dirs.get(ev.wd)
            if base is None:
                continue  # a watch we already dropped
            path = os.path.join(base, ev.name) if ev.name else base
            is_dir = bool(ev.mask & IN_ISDIR)
            if ev.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                continue  # reported by the parent; IN_IGNORED follows for DELETE_SELF
            if ev.mask & IN_MOVED_FROM:
                self.pending_moves[ev.cookie] = (path, is_dir)
            elif ev.mask & IN_MOVED_TO:
                moved = self.pending_moves.pop(ev.cookie, None)
                if moved is None:                      # moved in from outside the tree
                    if is_dir:
                        if self.recursive:
                            watch.append(path)
                    else:
                        changes.append(Change("created", path))
                elif is_dir:
                    self._rename_dir(moved[0], path)
                else:
                    changes.append(Change("moved", path, src=moved[0]))
            elif ev.mask & IN_CREATE:
                if is_dir:
                    if self.recursive:
                        watch.append(path)
                else:
                    changes.append(Change("created", path))
            elif ev.mask & IN_DELETE:
                if not is_dir:
                    changes.append(Change("deleted", path))
            elif ev.mask & IN_CLOSE_WRITE and not is_dir:
                changes.append(Change("modified", path))
        return _coalesce(changes), watch, unwatch

    def flush_moves(self) -> tuple[list[Change], list[int]]:
        """Moves whose destination never came: the file left the watched tree."""
        changes: list[Change] = []
        unwatch: list[int] = []
        for old, is_dir in self.pending_moves.values():
            if is_dir:
                unwatch.extend(self._forget_dir(old))
            else:
                changes.append(Change("deleted", old))
        self.pending_moves.clear()
        return changes, unwatch

    def _rename_dir(self, old: str, new: str) -> None:
        prefix = old + os.sep
        for wd, path in list(self.dirs.items()):
            if path == old:
                self.dirs[wd] = new
            elif path.startswith(prefix):
                self.dirs[wd] = new + path[len(old):]

    def _forget_dir(self, old: str) -> list[int]:
        prefix = old + os.sep
        gone = [wd for wd, path in self.dirs.items() if path == old or path.startswith(prefix)]
        for wd in gone:
            del self.dirs[wd]
        return gone


def _coalesce(changes: list[Change]) -> list[Change]:
    """Within one read: a file created then written is one "created"; repeated
    "modified" of the same file is one."""
    out: list[Change] = []
    latest: dict[str, int] = {}
    for change in changes:
        i = latest.get(change.path)
        if change.kind == "modified" and i is not None and out[i].kind in ("created", "modified", "moved"):
            continue
        latest[change.path] = len(out)
        out.append(change)
    return out


def walk_dirs(root: str) -> Iterator[str]:
    yield root
    for dirpath, dirnames, _ in os.walk(root):
        for d in dirnames:
            yield os.path.join(dirpath, d)


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc, loaded once, on the first Inotify (not at import)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class Inotify:
    """The syscalls: one non-blocking inotify descriptor."""

    def __init__(self) -> None:
        self._libc = _libc()
        self.fd = self._check(self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return result

    def add_watch(self, path: str) -> int:
        return self._check(self._libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK),
                           f"inotify_add_watch({path})")

    def rm_watch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly if already gone

    def read(self) -> bytes | None:
        try:
            return os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
