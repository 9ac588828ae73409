"""How a node joins a cluster: :class:`ClusterOptions`, checked when made.

From ``engine run``'s options and the environment (:meth:`ClusterOptions.from_env`);
a cluster that must not start as configured (no secret without ``--insecure``, a short
secret, a registry that is not ``etcd://``) is a :class:`ClusterConfigError` here,
before anything listens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transport.mesh.discovery import DiscoveryConfig

from engine.cluster.bundle import MAX_BUNDLE
from engine.cluster.secret import ClusterConfigError, secret_from

MIN_SECRET = 16


@dataclass(frozen=True)
class ClusterOptions:
    name: str
    key: str = ""
    secret: str | None = None
    insecure: bool = False                 # run without a secret: one host only, warned
    registry: str | None = None            # None: LAN beacons; "etcd://HOST:PORT"
    state_dir: Path | None = None          # catalog and apps received from peers
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    report_interval: float = 0.5           # seconds between load reports to each peer
    expiry: float = 3.0                    # a node silent this long is no longer routed to
    sample: int = 4                        # peers a node exchanges reports with (etcd)
    max_bundle: int = MAX_BUNDLE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ClusterConfigError("cluster name must be a non-empty string")
        if self.report_interval <= 0 or self.expiry <= self.report_interval:
            raise ClusterConfigError("need 0 < report_interval < expiry")
        if self.secret is None and not self.insecure:
            raise ClusterConfigError(
                f"cluster {self.name}: a cluster needs a secret (--cluster-secret-file PATH, "
                f"ENGINE_CLUSTER_SECRET): whoever can talk to its nodes without one can run "
                f"code on all of them.  To run without one on a single host, say --insecure")
        if self.secret is not None and len(self.secret) < MIN_SECRET:
            raise ClusterConfigError(f"cluster {self.name}: the secret must have at least "
                                     f"{MIN_SECRET} characters")
        if self.registry is not None and not self.registry.startswith("etcd://"):
            raise ClusterConfigError(f"cluster registry: expected etcd://HOST:PORT, got "
                                     f"{self.registry!r}")
        if self.sample < 1:
            raise ClusterConfigError("cluster sample must be at least 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> "ClusterOptions | None":
        """ENGINE_CLUSTER (the name; unset: no cluster), ENGINE_CLUSTER_KEY,
        ENGINE_CLUSTER_SECRET (or ENGINE_CLUSTER_SECRET_FILE), ENGINE_CLUSTER_INSECURE=1,
        ENGINE_CLUSTER_REGISTRY, ENGINE_STATE_DIR, and MESH_* for discovery."""
        env = os.environ if env is None else env
        kw: dict[str, Any] = {"name": env.get("ENGINE_CLUSTER", "")}
        if env.get("ENGINE_CLUSTER_KEY"):
            kw["key"] = env["ENGINE_CLUSTER_KEY"]
        secret = secret_from(env)
        if secret:
            kw["secret"] = secret
        if env.get("ENGINE_CLUSTER_INSECURE", "") not in ("", "0"):
            kw["insecure"] = True
        if env.get("ENGINE_CLUSTER_REGISTRY"):
            kw["registry"] = env["ENGINE_CLUSTER_REGISTRY"]
        if env.get("ENGINE_CLUSTER_SAMPLE"):
            try:
                kw["sample"] = int(env["ENGINE_CLUSTER_SAMPLE"])
            except ValueError:
                raise ClusterConfigError(f"ENGINE_CLUSTER_SAMPLE: expected a number of peers, "
                                         f"got {env['ENGINE_CLUSTER_SAMPLE']!r}") from None
        if env.get("ENGINE_STATE_DIR"):
            kw["state_dir"] = Path(env["ENGINE_STATE_DIR"])
        kw["discovery"] = DiscoveryConfig.from_env(env)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw) if kw["name"] else None
