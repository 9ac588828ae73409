"""A cluster's secret: where it comes from, and the error of a cluster that must not start.

Kept apart from the service so that a client (``engine.client``, the CLI) can find the
secret to sign its grants with without importing the cluster's machinery.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping


class ClusterConfigError(ValueError):
    """A cluster that must not start as configured (no secret without ``--insecure``,
    a bad registry address): the node says why and exits."""



def read_secret_file(path: str | Path) -> str:
    """A cluster secret kept in a file (one line; the file should be readable by its
    owner only, as for tokens)."""
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise ClusterConfigError(f"cluster secret file {p}: {exc.strerror or exc}") from None
    if p.stat().st_mode & 0o077:
        raise ClusterConfigError(f"cluster secret file {p} may be read by others: chmod 600 {p}")
    if not text:
        raise ClusterConfigError(f"cluster secret file {p} is empty")
    return text


def secret_from(env: Mapping[str, str]) -> str | None:
    """ENGINE_CLUSTER_SECRET, else the file ENGINE_CLUSTER_SECRET_FILE names."""
    if env.get("ENGINE_CLUSTER_SECRET"):
        return env["ENGINE_CLUSTER_SECRET"]
    if env.get("ENGINE_CLUSTER_SECRET_FILE"):
        return read_secret_file(env["ENGINE_CLUSTER_SECRET_FILE"])
    return None
