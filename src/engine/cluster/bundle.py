"""An app as bytes a peer can install: its manifest and the files of its folder.

Pure apart from reading and writing files (no trio; the cluster runs these in a worker
thread).  A bundle is ``{"name", "manifest", "files": {relative posix path: bytes},
"digest"}``; the digest covers the manifest (canonical JSON) and every file, so two nodes
holding the same app report the same digest, wherever the folder lives.  The manifest
file itself is not among ``files``: the receiver writes ``manifest`` as its
``manifest.json``, so a bundle rebuilt there has the same digest.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from engine.manifest import MANIFEST_FILE, AppManifest

MAX_BUNDLE = 10 * 1024 * 1024     # bytes of files per app
MAX_FILES = 2000
SKIPPED = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"}


class BundleError(ValueError):
    """An app that cannot be shared (too big), or a bundle that must not be installed."""


def digest_of(manifest: Any, files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    for rel in sorted(files):
        data = files[rel]
        h.update(b"\0%s\0%d\0" % (rel.encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def make_bundle(manifest: AppManifest, name: str, *, limit: int = MAX_BUNDLE) -> dict[str, Any]:
    """Read the app's folder (the manifest's), bounded by ``limit`` bytes."""
    base = manifest.source.parent
    files: dict[str, bytes] = {}
    total = 0
    for root, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED)
        for fname in sorted(names):
            path = Path(root) / fname
            if path == manifest.source or not path.is_file():
                continue
            rel = path.relative_to(base).as_posix()
            size = path.stat().st_size
            total += size
            if total > limit or len(files) >= MAX_FILES:
                raise BundleError(f"app {name}: folder {base} holds more than {limit} bytes "
                                  f"or {MAX_FILES} files; too big to share with the cluster")
            files[rel] = path.read_bytes()
    raw = dict(manifest.raw)
    return {"name": name, "manifest": raw, "files": files, "digest": digest_of(raw, files)}


def check_bundle(bundle: Any, *, limit: int = MAX_BUNDLE) -> dict[str, Any]:
    """Validate a received bundle (shape, safe paths, size, digest); returns it."""
    if not isinstance(bundle, dict):
        raise BundleError("bundle must be a map")
    name, manifest, files = bundle.get("name"), bundle.get("manifest"), bundle.get("files")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise BundleError(f"bundle name must be an app name, got {name!r:.60}")
    if not isinstance(manifest, dict) or not isinstance(files, dict):
        raise BundleError("bundle needs a 'manifest' map and a 'files' map")
    total = 0
    for rel, data in files.items():
        if not isinstance(rel, str) or not isinstance(data, bytes):
            raise BundleError("bundle files must map relative paths to bytes")
        parts = PurePosixPath(rel).parts
        if (not parts or rel.startswith("/") or "\\" in rel
                or any(p in ("..", ".", "") for p in parts) or rel == MANIFEST_FILE):
            raise BundleError(f"bundle file path not allowed: {rel!r:.80}")
        total += len(data)
    if total > limit or len(files) > MAX_FILES:
        raise BundleError(f"bundle of {total} bytes / {len(files)} files exceeds the limit")
    digest = digest_of(manifest, files)
    if bundle.get("digest") != digest:
        raise BundleError("bundle digest does not match its content")
    return bundle


def write_bundle(bundle: dict[str, Any], apps_dir: Path) -> Path:
    """Write a checked bundle under ``apps_dir/NAME-DIGEST``; returns that folder.
    Written to a temporary folder first and renamed, so a half-written app never exists."""
    target = apps_dir / f"{bundle['name']}-{bundle['digest'][:12]}"
    if (target / MANIFEST_FILE).is_file():
        return target        # the same content was installed before
    tmp = apps_dir / f".{target.name}.{os.getpid()}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for rel, data in bundle["files"].items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tmp / MANIFEST_FILE).write_text(json.dumps(bundle["manifest"], indent=2))
    try:
        os.replace(tmp, target)
    except OSError:          # target appeared meanwhile (installed concurrently): keep it
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return target
