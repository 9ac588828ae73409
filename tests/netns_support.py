"""Hosts for multi-host tests: network namespaces joined by a Linux bridge.

:func:`three_hosts` makes one namespace per "host", each with a veth whose other end is
a port of a bridge living in a namespace of its own, so the root namespace (the
machine's real network) is never touched.  Each host has ``10.S.0.N/24``, multicast on
and ``lo`` up, and a folder of its own for what a real host keeps in its home (its
nodes' token files: ``XDG_CONFIG_HOME``), so that nodes on different "hosts" share
nothing but the wire.

A *partition* (:meth:`Hosts.partition`) takes the host's bridge port down: its packets
are dropped silently in both directions, so its TCP connections hang (nothing resets
them), which is what a real partition does; :meth:`Hosts.heal` brings the port back.

Needs root and iproute2 (:func:`why_skip` says why not); everything made is removed in
``finally``, whatever happened.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def why_skip() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"etprobe{os.getpid()}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    r = ip("link", "add", f"etbr{os.getpid() % 100_000}", "type", "bridge", check=False)
    if r.returncode != 0:
        return f"cannot create a bridge here: {r.stderr.strip()}"
    ip("link", "del", f"etbr{os.getpid() % 100_000}", check=False)
    return None


@dataclass(frozen=True)
class Host:
    label: str          # "a", "b", "c"
    ns: str             # its network namespace
    ip: str             # its address on the bridge's subnet
    bridge_port: str    # its veth's other end, a port of the bridge (in the bridge's namespace)
    home: Path          # its XDG_CONFIG_HOME: where its nodes keep their token files

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run on this host (``ip netns exec`` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "XDG_CONFIG_HOME": str(self.home)}


@dataclass(frozen=True)
class Hosts:
    bridge_ns: str
    hosts: tuple[Host, ...]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def partition(self, host: Host) -> None:
        """Cut ``host`` off: its bridge port goes down, so every packet to or from it is
        dropped (its own interface stays up, without carrier: nothing fails fast)."""
        ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "down")

    def heal(self, host: Host) -> None:
        ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "up")

    def heal_all(self) -> None:
        for host in self.hosts:
            self.heal(host)


@contextmanager
def three_hosts(workdir: Path, *, labels: Sequence[str] = ("a", "b", "c")) -> Iterator[Hosts]:
    """The hosts of this module's docstring, removed on exit."""
    tag = f"{os.getpid() % 100_000}"
    subnet = 10 + os.getpid() % 200
    bridge_ns = f"etbr{tag}"
    made: list[str] = []
    try:
        ip("netns", "add", bridge_ns)
        made.append(bridge_ns)
        # No multicast snooping: without an IGMP querier on this "LAN" the bridge could
        # stop flooding the beacons' group; a plain hub is what the tests want.
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        hosts = []
        for n, label in enumerate(labels, start=1):
            ns = f"eth{label}{tag}"
            ip("netns", "add", ns)
            made.append(ns)
            dev, port = f"eth0", f"p{label}"
            ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port,
               "netns", bridge_ns)
            ip("-n", bridge_ns, "link", "set", port, "master", "br0")
            ip("-n", bridge_ns, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"10.{subnet}.0.{n}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up", "multicast", "on")
            ip("-n", ns, "link", "set", "lo", "up")
            home = workdir / f"host-{label}"
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            hosts.append(Host(label, ns, f"10.{subnet}.0.{n}", port, home))
        yield Hosts(bridge_ns, tuple(hosts))
    finally:
        for ns in reversed(made):
            ip("netns", "del", ns, check=False)   # its veths go with it


@contextmanager
def lone_host() -> Iterator[str]:
    """A network namespace with only its loopback, up: a host of its own whose ports
    (the seed manifests' fixed 9100 and 9200) nothing else holds.  Its name; removed on
    exit."""
    ns = f"etlone{os.getpid() % 100_000}"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        ip("netns", "del", ns, check=False)
