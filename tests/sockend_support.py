"""Sockend's tests' common parts: a fake mesh (namespaces of handlers and event
channels, in the test's process) and a server running on it."""
from __future__ import annotations

import math
from collections import Counter
from contextlib import asynccontextmanager

import trio

from sockend import Sockend, SockendConfig
from transport import TimeoutError_


class FakeLink:
    def __init__(self, mesh, namespace, events):
        self.mesh, self.namespace, self.events = mesh, namespace, events

    async def request(self, request, timeout):
        handler = self.mesh.handlers.get((self.namespace, request["type"]))
        if handler is None:
            await trio.sleep(timeout)
            raise TimeoutError_(f"no responder for {request['type']!r}")
        return await handler(request)

    async def next_events(self):
        out = [await self.events.receive()]
        while True:
            try:
                out.append(self.events.receive_nowait())
            except trio.WouldBlock:
                return out

    def publish(self, topic, data):
        self.mesh.published.append((self.namespace, topic, data))

    def responder_types(self):
        return sorted(t for ns, t in self.mesh.handlers if ns == self.namespace)


class FakeMesh:
    def __init__(self):
        self.handlers, self.channels = {}, {}
        self.published = []     # (namespace, topic, data) browsers published
        self.opened, self.closed = Counter(), Counter()
        self.broken = False

    def on(self, namespace, type_):
        def register(fn):
            self.handlers[(namespace, type_)] = fn
            return fn
        return register

    @asynccontextmanager
    async def open(self, namespace):
        if self.broken:
            raise OSError("mesh down")
        send, recv = trio.open_memory_channel(math.inf)
        self.channels.setdefault(namespace, []).append(send)
        self.opened[namespace] += 1
        try:
            yield FakeLink(self, namespace, recv)
        finally:
            self.channels[namespace].remove(send)
            self.closed[namespace] += 1

    def publish(self, namespace, topic, data):
        for send in self.channels.get(namespace, []):
            send.send_nowait((topic, data))


@asynccontextmanager
async def running(mesh, hooks=None, **config):
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Sockend(mesh, SockendConfig(port=0, **config), hooks=hooks).run)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


