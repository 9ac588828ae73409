"""What a Requester or Subscriber tells the mesh of its links (the monitor's graph).

Every ``hello_interval`` the component's beacon is brought up to date with its links'
counts (:func:`~transport.mesh.peers.links_of`: (peer id, requests sent to it, or
events received from it)), so its next hello carries them.  Counting itself is a plain
int increment on the link where a request is dispatched or an event taken; this task
only reads the counters, once per interval.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import trio

from transport.mesh.discovery import Discovery
from transport.mesh.peers import links_of

Counts = Callable[[], Iterable[tuple[str, int]]]


def tell_links(discovery: Discovery | None, counts: Counts) -> bool:
    """Put ``counts()`` in ``discovery.me``'s links; False when there is no beacon to
    change (not started, or drained: ``me`` is None) or nothing changed."""
    if discovery is None or discovery.me is None:
        return False
    links = links_of(counts())
    if links == discovery.me.links:
        return False
    discovery.me = replace(discovery.me, links=links)
    return True


async def keep_links_told(discovery: Discovery, counts: Counts, interval: float) -> None:
    """Forever: every ``interval`` seconds, :func:`tell_links`."""
    while True:
        await trio.sleep(interval)
        tell_links(discovery, counts)
