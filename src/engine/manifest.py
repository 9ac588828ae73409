"""App manifests: JSON in, frozen typed objects out.

SKELETON written by the lead so other modules can import the types; the manifest
helper owns this file and fills in parsing (keep these names and fields).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ManifestError


@dataclass(frozen=True)
class ResourceLimits:
    cpus: frozenset[int] | None = None      # resource-limits.cpuset.cpuset.cpus, applied via CPU affinity
    memory_bytes: int | None = None          # RLIMIT_AS
    cpu_seconds: int | None = None           # RLIMIT_CPU
    open_files: int | None = None            # RLIMIT_NOFILE


@dataclass(frozen=True)
class EngineConfig:
    pool_limit: int = 10
    queue_limit: int = 100
    heartbeat_timeout: float = 30.0          # seconds
    grow_threshold: int = 1                  # queued jobs per slave before another is spawned
    startup_timeout: float = 10.0
    idle_timeout: float = 600.0
    termination_timeout: float = 5.0
    backend: str = "process"                 # "process" | "thread"
    concurrency: int = 1                     # jobs one slave may run at once
    crashlog_limit: int = 100                # lines kept from a dead slave's output
    resource_limits: ResourceLimits = field(default_factory=ResourceLimits)


@dataclass(frozen=True)
class DriverSpec:
    name: str            # the key under "drivers"/"tasks"
    type: str            # canonical driver type, e.g. "recurring-timer"
    emit: str            # event name the driver's jobs carry
    options: Any         # the driver class's parsed, frozen options


@dataclass(frozen=True)
class PubsubConfig:
    endpoint: str | None = None   # None: the node picks one


@dataclass(frozen=True)
class AppManifest:
    name: str
    source: Path                   # the manifest file
    type: str                      # language plugin: "python"
    entry: Path                    # the app module to import in each slave
    engine: EngineConfig
    drivers: tuple[DriverSpec, ...]
    pubsub: PubsubConfig | None = None
    version: int = 1
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def load_manifest(path: str | Path, *, name: str | None = None) -> AppManifest:
    raise NotImplementedError


def parse_manifest(data: Any, *, source: Path, name: str | None = None) -> AppManifest:
    raise NotImplementedError


__all__ = ["AppManifest", "DriverSpec", "EngineConfig", "ManifestError", "PubsubConfig",
           "ResourceLimits", "load_manifest", "parse_manifest"]
