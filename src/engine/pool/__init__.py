"""Slave pools: the jobs an app accepted, the policy that places them, and the two
backends that run them (slave processes, or threads in the node).

``from engine.pool import SlavePool`` (and ``ThreadPool``, ``Job``, and the seams
``Pool`` and ``JobOwner`` of :mod:`engine.pool.base`) still works; the names are
imported on first use so that importing one pure module (``engine.pool.policy``)
does not pull in the process backend.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"SlavePool": "process", "ThreadPool": "threads", "Job": "job",
            "JobOwner": "job", "Pool": "base"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.pool' has no attribute {name!r}")
    return getattr(importlib.import_module(f"engine.pool.{module}"), name)


if TYPE_CHECKING:
    from engine.pool.base import Pool  # noqa: F401
    from engine.pool.job import Job, JobOwner  # noqa: F401
    from engine.pool.process import SlavePool  # noqa: F401
    from engine.pool.threads import ThreadPool  # noqa: F401
