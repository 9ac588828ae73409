"""The cluster catalog on disk, so tombstones and versions survive a node's restart.

``STATE_DIR/catalog.msgpack`` holds the node's :class:`~engine.cluster.catalog.Catalog`
(its records' wire form), rewritten whole on every change through a temporary file
renamed over it: a crash leaves the old catalog or the new one, never half of one.  A
file that cannot be read is moved aside (``catalog.msgpack.bad``) and logged, and the
node starts from what its peers tell it: losing a local copy must never stop a node.
Plain blocking file I/O: the file is small and written on changes only.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

from engine.cluster.catalog import AppRecord, Catalog

log = logging.getLogger("engine.cluster")

CATALOG_FILE = "catalog.msgpack"


class CatalogFile:
    def __init__(self, state_dir: Path):
        self.path = state_dir / CATALOG_FILE

    def load(self) -> list[AppRecord]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return Catalog.records_from_wire(msgpack.unpackb(data, raw=False),
                                             where=str(self.path))
        except (ValueError, msgpack.UnpackException) as exc:
            aside = self.path.with_name(CATALOG_FILE + ".bad")
            os.replace(self.path, aside)
            log.error("cluster catalog %s unreadable (%s): moved to %s; starting from the peers'",
                      self.path, exc, aside)
            return []

    def save(self, catalog: Catalog) -> None:
        tmp = self.path.with_name(CATALOG_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(msgpack.packb(catalog.to_wire(), use_bin_type=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
