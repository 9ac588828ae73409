"""What every mesh component shares: identity, discovery, lifetime, the shared secret.

A component is run either as ``async with component:`` or ``await nursery.start(
component.run)``; either way it is ready (bound, announcing) when that returns and
stops, saying ``bye`` to its peers, when its scope is cancelled or the block ends.

Configuration comes from the environment by default, as cote's does (docs/mesh.md has
the table): ``MESH_ENVIRONMENT`` (or cote's ``COTE_ENV``), ``MESH_NAMESPACE``,
``MESH_KEY``, ``MESH_SECRET`` and the discovery variables of
:meth:`DiscoveryConfig.from_env`; an argument given explicitly wins.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from transport.mesh.discovery import Discovery, DiscoveryConfig
from transport.mesh.peers import Beacon
from transport.service import Service

if TYPE_CHECKING:
    from transport.mesh.sealing import FrameSigner

log = logging.getLogger(__name__)


def secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None or secret == b"" or secret == "":
        return None
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, bytes):
        return secret
    raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")


MAX_UNMATCHED_TYPES = 1000   # types remembered per component (each logged once)


def count_unmatched(counts: dict[str, int], kind: str, who: str, what: str) -> None:
    """Count one ``what`` (event, request) of type ``kind`` nothing handled, logging the
    first of each type (cote logs them): a typo'd type shows at once, a flood once."""
    if kind in counts:
        counts[kind] += 1
        return
    if len(counts) < MAX_UNMATCHED_TYPES:
        counts[kind] = 1
        log.warning("%s has no handler for %s %r (counted; logged once per type)", who, what, kind)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    out = tuple(value or ())
    if not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"{what} must be non-empty strings, got {value!r}")
    return out


class Component(Service):
    role = ""
    subset = ""          # (a Responder's, when it has one)

    def __init__(self, name: str, *, namespace: str | None = None, key: str | None = None,
                 environment: str | None = None,
                 secret: str | bytes | None = None, discovery: DiscoveryConfig | None = None,
                 bind: str = "127.0.0.1"):
        if not isinstance(name, str) or not name:
            raise ValueError("a component needs a non-empty name")
        env = os.environ
        namespace = env.get("MESH_NAMESPACE", "") if namespace is None else namespace
        key = env.get("MESH_KEY", "") if key is None else key
        if environment is None:
            environment = env.get("MESH_ENVIRONMENT", env.get("COTE_ENV", ""))
        if not all(isinstance(v, str) for v in (namespace, key, environment)):
            raise ValueError("namespace, key and environment must be strings")
        self.name = name
        self.namespace = namespace
        self.key = key
        self.environment = environment
        self.secret = secret_bytes(env.get("MESH_SECRET") if secret is None else secret)
        self.discovery_config = discovery or DiscoveryConfig.from_env()
        self.bind = bind
        self.id = uuid.uuid4().hex
        self.discovery: Discovery | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = trio.Event()

    # -- identity ---------------------------------------------------------------
    def advertised(self) -> tuple[str, ...]:
        return ()

    def beacon(self, endpoint: str = "") -> Beacon:
        return Beacon(id=self.id, name=self.name, role=self.role, namespace=self.namespace,
                      key=self.key, types=self.advertised(), endpoint=endpoint,
                      host=socket.gethostname(), pid=os.getpid(),
                      environment=self.environment, subset=self.subset)

    def guard(self, *, seals: bytes, opens: bytes = b"") -> FrameSigner | None:
        """With a secret, the FrameGuard of one data link (transport/mesh/sealing.py):
        it seals frames for ``seals`` and opens frames sealed for ``opens`` (each names
        what the frames are and whose, e.g. ``b"request:" + a responder's id``)."""
        if not self.secret:
            return None
        # Imported here: cryptography costs a process ~7 MB, worth it only with a secret.
        from transport.mesh.sealing import FrameSigner

        return FrameSigner(self.secret, seals, opens=opens,
                           max_skew=self.discovery_config.max_skew)

    def _readvertise(self) -> None:
        """What it advertises changed while it runs (a handler added after start): its
        peers hear the new beacon now, not at the next hello."""
        discovery = self.discovery
        if discovery is None or discovery.me is None:
            return                 # not started yet: the first beacon will say it
        discovery.me = replace(discovery.me, types=self.advertised())
        discovery.announce("hello")

    async def _start_discovery(self, nursery: trio.Nursery, endpoint: str = "") -> Discovery:
        self.discovery = Discovery(self.beacon(endpoint), self.discovery_config,
                                   secret=self.secret)
        await nursery.start(self.discovery.run)
        return self.discovery

    # -- lifetime ---------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Component] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await self._serve(nursery)
                self._ready.set()
                task_status.started(self)

    async def _serve(self, nursery: trio.Nursery) -> None:
        """Start the component's tasks in ``nursery``; return once it is ready."""
        raise NotImplementedError

    def close(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def peers(self) -> list[Beacon]:
        """The peers this component currently sees (same namespace and key)."""
        return self.discovery.peers() if self.discovery else []
