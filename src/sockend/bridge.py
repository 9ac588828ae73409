"""What Sockend needs from the mesh, per namespace, and the adapter to the real one.

A *mesh* opens one :class:`NamespaceLink` per namespace (an async context manager);
the link forwards requests to that namespace's Responders, yields the events its
Publishers send, and publishes what browsers emit without an ack.
:class:`TransportMesh` is the real thing: a Requester, a Subscriber (subscribed to
everything, ``**``) named ``sockend`` and a Publisher named ``sockend-browsers`` in
that namespace.  The Subscriber drops what that Publisher (of this Sockend or of
another) sent: browsers' events go to the mesh, never back out to browsers, so a page
cannot broadcast to every other page.  Tests may pass any object with the same shape.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Protocol

from transport.mesh.discovery import DiscoveryConfig
from transport.mesh.pubsub import Publisher, Subscriber
from transport.mesh.requester import Requester


class NamespaceLink(Protocol):
    async def request(self, request: dict[str, Any], timeout: float, *, chunks: Any = None) -> Any:
        """The answer of a Responder advertising ``request["type"]``; raises RemoteError.
        ``chunks``: an upload's chunks (an async iterable), for a chunked request."""

    async def next_events(self) -> list[tuple[str, Any]]:
        """The next published events (at least one), as (topic, data); never the
        events browsers published through :meth:`publish`."""

    def publish(self, topic: str, data: Any) -> None:
        """Publish a browser's event (one it sent without an ack) in the namespace."""

    def responder_types(self) -> list[str]:
        """Event types the namespace's Responders currently advertise."""


class Mesh(Protocol):
    def open(self, namespace: str) -> AsyncContextManager[NamespaceLink]: ...


class TransportLink:
    def __init__(self, requester: Requester, subscriber: Subscriber, publisher: Publisher):
        self.requester = requester
        self.subscriber = subscriber
        self.publisher = publisher

    async def request(self, request: dict[str, Any], timeout: float, *, chunks: Any = None) -> Any:
        return await self.requester.send(request, timeout=timeout, chunks=chunks)

    async def next_events(self) -> list[tuple[str, Any]]:
        while True:
            own = self.publisher.name
            events = [(e.topic, e.data) for e in await self.subscriber.receive_many()
                      if e.publisher != own]
            if events:
                return events

    def publish(self, topic: str, data: Any) -> None:
        self.publisher.publish(topic, data)

    def responder_types(self) -> list[str]:
        return sorted({t for b in self.requester.peers() if b.role == "responder" for t in b.types})

    def info(self) -> dict[str, Any]:
        return {"requester": dict(self.requester.stats), "subscriber": dict(self.subscriber.stats),
                "responders": sum(1 for b in self.requester.peers() if b.role == "responder"),
                "publishers": sum(1 for b in self.subscriber.peers() if b.role == "publisher")}


class TransportMesh:
    """Bridge to the real mesh.  ``key``, ``environment``, ``secret``, ``discovery`` and
    ``bind`` mean what they mean for every mesh component (transport/mesh/component.py;
    None: from the environment, as there)."""

    def __init__(self, *, name: str = "sockend", key: str | None = None,
                 environment: str | None = None, secret: str | bytes | None = None,
                 discovery: DiscoveryConfig | None = None, bind: str = "127.0.0.1",
                 event_buffer: int = 10_000):
        self.name = name
        self.key = key
        self.environment = environment
        self.secret = secret
        self.discovery = discovery
        self.bind = bind
        self.event_buffer = event_buffer

    @asynccontextmanager
    async def open(self, namespace: str) -> AsyncIterator[TransportLink]:
        kw: dict[str, Any] = dict(namespace=namespace, key=self.key, secret=self.secret,
                                  environment=self.environment, discovery=self.discovery,
                                  bind=self.bind)
        async with Requester(self.name, **kw) as requester, \
                Subscriber(self.name, subscribes_to=("**",), buffer=self.event_buffer, **kw) as sub, \
                Publisher(f"{self.name}-browsers", **kw) as pub:
            yield TransportLink(requester, sub, pub)
