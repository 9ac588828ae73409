"""What every mesh component shares: identity, discovery, lifetime, the shared secret.

A component is run either as ``async with component:`` or ``await nursery.start(
component.run)``; either way it is ready (bound, announcing) when that returns and
stops, saying ``bye`` to its peers, when its scope is cancelled or the block ends.
"""
from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING, Any

import trio

from transport.mesh.discovery import Discovery, DiscoveryConfig
from transport.mesh.peers import Beacon
from transport.service import Service

if TYPE_CHECKING:
    from transport.mesh.sealing import FrameSigner


def secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None or secret == b"" or secret == "":
        return None
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, bytes):
        return secret
    raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    out = tuple(value or ())
    if not all(isinstance(v, str) and v for v in out):
        raise ValueError(f"{what} must be non-empty strings, got {value!r}")
    return out


class Component(Service):
    role = ""

    def __init__(self, name: str, *, namespace: str = "", key: str = "",
                 secret: str | bytes | None = None, discovery: DiscoveryConfig | None = None,
                 bind: str = "127.0.0.1"):
        if not isinstance(name, str) or not name:
            raise ValueError("a component needs a non-empty name")
        if not isinstance(namespace, str) or not isinstance(key, str):
            raise ValueError("namespace and key must be strings")
        self.name = name
        self.namespace = namespace
        self.key = key
        self.secret = secret_bytes(secret)
        self.discovery_config = discovery or DiscoveryConfig()
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
                      host=socket.gethostname(), pid=os.getpid())

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
