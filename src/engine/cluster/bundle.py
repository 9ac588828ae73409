"""An app as bytes a peer can install: its manifest and the files of its folder.

Pure apart from reading and writing files (no trio; the cluster runs these in a worker
thread).  A bundle is ``{"name", "manifest", "files": {relative posix path: bytes},
"digest"}``; the digest covers the manifest (canonical JSON) and every file, so two nodes
holding the same app report the same digest, wherever the folder lives.  The manifest
file itself is not among ``files``: the receiver writes ``manifest`` as its
``manifest.json``, so a bundle rebuilt there has the same digest.

A bundle is *self-contained*, checked on both sides with the same rules, because a
bundle is code a peer will run:

- its entry (the manifest's ``args``) is a relative path to one of its files (or to a
  folder of them): never absolute, ``local://``, nor leading out with ``..``.  A
  receiver that took ``args: "/etc/x.py"`` would run *its own* file of that name;
- it carries only the app folder's own files: a symlink whose target lies outside the
  folder is refused (its content, a private key say, would be copied to every peer),
  one to a file inside ships as a copy of that file, one to a folder is refused (a
  bundle has no links, and following folder links invites loops), a dangling one is
  left out (there is nothing to ship, and the link is dead on this node too).

Every refusal is a :class:`BundleError` naming the app and the path.  What a node runs
from its *own* folders (``deploy`` of a path, whatever its ``args``) is its owner's
business: these rules are about what crosses to another node.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any, Mapping

from engine import languages
from engine.manifest import DEFAULT_ENTRY, MANIFEST_FILE, AppManifest

MAX_BUNDLE = 10 * 1024 * 1024     # bytes of files per app
MAX_FILES = 2000
SKIPPED = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache"}


class BundleError(ValueError):
    """An app that cannot be shared (too big, not self-contained), or a bundle that must
    not be installed."""


def digest_of(manifest: Any, files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    for rel in sorted(files):
        data = files[rel]
        h.update(b"\0%s\0%d\0" % (rel.encode(), len(data)))
        h.update(data)
    return h.hexdigest()


def _default_entry(manifest: Mapping[str, Any]) -> str:
    language = manifest.get("type", "python")
    if isinstance(language, str) and language in languages.names():
        return languages.get(language).default_args
    return DEFAULT_ENTRY


def bundle_entry(name: str, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> str:
    """The manifest's entry (``args``) as a path inside the bundle, or BundleError: a
    relative path, not leaving the folder, naming one of ``files`` or a folder of them."""
    args = manifest.get("args", _default_entry(manifest))
    what = f"app {name}: manifest args {args!r:.120}"
    if isinstance(args, list) and args:    # a program and its arguments (exec)
        args = args[0]
    if not isinstance(args, str) or not args or "\0" in args or "\\" in args:
        raise BundleError(f"{what}: expected a relative path to the app's entry")
    if "://" in args or args.startswith("/"):
        raise BundleError(f"{what}: a bundle's entry must be a path relative to the app folder "
                          "(an absolute or local:// entry would name a file of the receiving node)")
    rel = posixpath.normpath(args)
    if rel in (".", "..") or rel.startswith("../"):
        raise BundleError(f"{what}: leads outside the app folder; a bundle runs only its own files")
    if rel not in files and not any(f.startswith(rel + "/") for f in files):
        raise BundleError(f"{what}: the entry {rel!r} is not in the bundle")
    return rel


def make_bundle(manifest: AppManifest, name: str, *, limit: int = MAX_BUNDLE) -> dict[str, Any]:
    """Read the app's folder (the manifest's), bounded by ``limit`` bytes; BundleError
    if the app is not self-contained (module docstring)."""
    base = manifest.source.parent
    real_base = base.resolve()
    files: dict[str, bytes] = {}
    total = 0
    for root, dirs, names in os.walk(base):
        kept = []
        for dname in sorted(dirs):
            if dname in SKIPPED:
                continue
            path = Path(root) / dname
            if path.is_symlink():   # os.walk lists links to folders here, and does not enter them
                raise BundleError(_link_refusal(name, base, path, real_base))
            kept.append(dname)
        dirs[:] = kept
        for fname in sorted(names):
            path = Path(root) / fname
            if path == manifest.source:
                continue
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue        # dangling, or a loop of links: nothing to ship
                if not target.is_relative_to(real_base) or not target.is_file():
                    raise BundleError(_link_refusal(name, base, path, real_base))
            elif not path.is_file():
                continue            # a FIFO, a socket: not app content
            rel = path.relative_to(base).as_posix()
            size = path.stat().st_size
            total += size
            if total > limit or len(files) >= MAX_FILES:
                raise BundleError(f"app {name}: folder {base} holds more than {limit} bytes "
                                  f"or {MAX_FILES} files; too big to share with the cluster")
            files[rel] = path.read_bytes()
    raw = dict(manifest.raw)
    bundle_entry(name, raw, files)
    return {"name": name, "manifest": raw, "files": files, "digest": digest_of(raw, files)}


def _link_refusal(name: str, base: Path, link: Path, real_base: Path) -> str:
    rel = link.relative_to(base).as_posix()
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        target = Path(os.readlink(link))
    if not target.is_relative_to(real_base):
        return (f"app {name}: {rel!r} is a symlink to {target}, outside the app folder {base}; "
                "a bundle carries only the app's own files (copy what it needs into the folder)")
    return (f"app {name}: {rel!r} is a symlink to a folder; a bundle carries no links "
            "(make it a real folder, or leave it out of the app folder)")


def check_bundle(bundle: Any, *, limit: int = MAX_BUNDLE) -> dict[str, Any]:
    """Validate a received bundle (shape, safe paths, its entry inside it, size,
    digest); returns it."""
    if not isinstance(bundle, dict):
        raise BundleError("bundle must be a map")
    name, manifest, files = bundle.get("name"), bundle.get("manifest"), bundle.get("files")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or "\0" in name:
        raise BundleError(f"bundle name must be an app name, got {name!r:.60}")
    if not isinstance(manifest, dict) or not isinstance(files, dict):
        raise BundleError("bundle needs a 'manifest' map and a 'files' map")
    total = 0
    folders: set[str] = set()
    for rel, data in files.items():
        if not isinstance(rel, str) or not isinstance(data, bytes):
            raise BundleError("bundle files must map relative paths to bytes")
        # Split by hand: PurePosixPath drops "." and empty segments, so "app.py/." and
        # "a//b" would pass as other names of "app.py" and "a/b" (overwriting them).
        parts = tuple(rel.split("/"))
        if (not parts or rel.startswith("/") or "\\" in rel or "\0" in rel
                or any(p in ("..", ".", "") for p in parts)
                or parts[0] == MANIFEST_FILE):  # (the manifest's place, or a folder there)
            raise BundleError(f"app {name}: bundle file path not allowed: {rel!r:.80}")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        total += len(data)
    clash = folders.intersection(files)
    if clash:
        raise BundleError(f"app {name}: bundle file path {min(clash)!r:.80} is also a folder of others")
    if total > limit or len(files) > MAX_FILES:
        raise BundleError(f"bundle of {total} bytes / {len(files)} files exceeds the limit")
    bundle_entry(name, manifest, files)
    try:
        digest = digest_of(manifest, files)
    except (TypeError, ValueError, RecursionError) as exc:   # bytes in it, nested too deep...
        raise BundleError(f"app {name}: its manifest is not JSON ({exc})"[:300]) from None
    if bundle.get("digest") != digest:
        raise BundleError("bundle digest does not match its content")
    return bundle


def write_bundle(bundle: dict[str, Any], apps_dir: Path) -> Path:
    """Write a checked bundle under ``apps_dir/NAME-DIGEST``; returns that folder.
    Written to a temporary folder first and renamed, so a half-written app never exists;
    only regular files, each inside that folder (:func:`check_bundle` saw to it)."""
    target = apps_dir / f"{bundle['name']}-{bundle['digest'][:12]}"
    if (target / MANIFEST_FILE).is_file():
        return target        # the same content was installed before
    tmp = apps_dir / f".{target.name}.{os.getpid()}.tmp"
    if tmp.exists() or tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)   # left by a crash of an earlier process
    tmp.mkdir(parents=True)
    for rel, data in bundle["files"].items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (tmp / MANIFEST_FILE).write_text(json.dumps(bundle["manifest"], indent=2))
    if bundle["manifest"].get("type") == "exec":   # its program runs: files travel without modes
        entry = tmp / bundle_entry(bundle["name"], bundle["manifest"], bundle["files"])
        if entry.is_file():
            entry.chmod(0o755)
    try:
        os.replace(tmp, target)
    except OSError:          # target appeared meanwhile (installed concurrently): keep it
        shutil.rmtree(tmp, ignore_errors=True)
    return target
