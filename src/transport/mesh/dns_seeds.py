"""DNS seeds: names re-resolved every ``dns_interval``, every address a beacon destination.

The trio shell over :class:`transport.mesh.seeds.SeedSet`.  A Kubernetes headless
service (``clusterIP: None``) answers its name with one A record per ready pod, so
``MESH_DNS_SEEDS=mysvc.myns.svc.cluster.local`` makes every pod of it a unicast
destination for hellos, as a static peer is, and the set follows the pods as they come
and go (docs/mesh.md, "Discovery without multicast: DNS seeds and Redis").

A name that does not resolve is one WARNING (and one INFO when it resolves again),
never a crash and never a line per try.  A failure that says nothing about the name (a
DNS server timing out, ``EAI_AGAIN``) keeps its last addresses; "no such name" (a
headless service whose pods are all gone) drops them.
"""
from __future__ import annotations

import logging
import socket
from typing import Callable, Iterable

import trio

from transport.mesh.seeds import Address, Change, Seed, SeedSet

RESOLVE_TIMEOUT = 5.0   # seconds one resolution may take (at most dns_interval)
# getaddrinfo's answers that mean "this name has no (IPv4) address": its last go.
_NO_SUCH_NAME = {socket.EAI_NONAME} | (
    {socket.EAI_NODATA} if hasattr(socket, "EAI_NODATA") else set())
log = logging.getLogger(__name__)


async def _resolve(host: str, port: int) -> list[str]:
    """The IPv4 addresses of ``host`` (a seam: tests answer for the DNS here)."""
    infos = await trio.socket.getaddrinfo(host, port, family=socket.AF_INET,
                                          type=socket.SOCK_DGRAM)
    return sorted({str(info[4][0]) for info in infos})


def _describe(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror) and exc.args:
        return f"{exc.args[-1]} (gaierror {exc.errno})"
    return f"{type(exc).__name__}: {exc}"


class DnsSeeds:
    """Re-resolve ``targets`` (``(host, port)``) every ``interval`` seconds and tell
    ``on_change`` which destinations each answer adds and removes."""

    def __init__(self, targets: Iterable[Address], interval: float,
                 on_change: Callable[[Change], None]) -> None:
        self.seeds = SeedSet.of(targets)
        self.interval = interval
        self.on_change = on_change
        self.first_attempt = trio.Event()   # every name tried once (the start-up line)
        self.stats = {"resolved": 0, "failed": 0}

    def targets(self) -> frozenset[Address]:
        return self.seeds.targets()

    def describe(self) -> str:
        return self.seeds.describe()

    def problems(self) -> list[str]:
        return self.seeds.problems()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await self.resolve_all()
            self.first_attempt.set()
            await trio.sleep(self.interval)

    async def resolve_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for seed in self.seeds.seeds:
                nursery.start_soon(self._resolve_one, seed)

    async def _resolve_one(self, seed: Seed) -> None:
        timeout = min(RESOLVE_TIMEOUT, self.interval)
        ips: list[str] = []
        error: str | None = None
        keep = False
        with trio.move_on_after(timeout) as scope:
            try:
                ips = await _resolve(seed.host, seed.port)
            except OSError as exc:   # socket.gaierror included
                error = _describe(exc)
                keep = exc.errno not in _NO_SUCH_NAME
        if scope.cancelled_caught:
            error, keep = f"no answer within {timeout:g} s", True
        elif error is None and not ips:
            error = "no IPv4 address"
        if error is None:
            self.stats["resolved"] += 1
            change = self.seeds.resolved(seed, ips)
        else:
            self.stats["failed"] += 1
            change = self.seeds.failed(seed, error, keep=keep)
        if change.warn:
            kept = len(seed.addresses)
            log.warning("discovery: dns seed %s does not resolve: %s; %s (tried again "
                        "every %g s, logged again only once it resolves)", seed.host, error,
                        f"beacons keep going to its {kept} last address(es)" if kept
                        else "it finds no peers until it resolves", self.interval)
        elif change.recovered:
            log.info("discovery: dns seed %s resolves again: %d address(es)", seed.host,
                     len(seed.addresses))
        if change.added or change.removed:
            log.debug("discovery: dns seed %s: +%s -%s", seed.host, sorted(change.added),
                      sorted(change.removed))
        self.on_change(change)
