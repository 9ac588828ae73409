"""Real multi-host discovery: two network namespaces joined by a veth pair, so the
multicast beacons really leave one interface and arrive on another.  Needs root and
iproute2; skipped with the reason otherwise.  The namespaces are removed in finally."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netns_support import ip, why_skip

pytestmark = [pytest.mark.netns, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parent.parent

RESPONDER = """
import trio
from transport import DiscoveryConfig, Responder
async def main():
    rep = Responder("far-rep", responds_to=["where"], bind="0.0.0.0",
                    discovery=DiscoveryConfig.from_env())
    @rep.on("where")
    async def where(req):
        return {"pid": __import__("os").getpid(), "got": req["val"]}
    async with rep:
        print("ready", rep.address, flush=True)
        await trio.sleep(20)
trio.run(main)
"""

REQUESTER = """
import trio
from transport import DiscoveryConfig, Requester
async def main():
    async with Requester("far-req", requests=["where"],
                         discovery=DiscoveryConfig.from_env()) as rq:
        res = await rq.send({"type": "where", "val": 42}, timeout=10)
        print("answer", res["got"], rq.links[next(iter(rq.links))].beacon.endpoint, flush=True)
trio.run(main)
"""


@pytest.fixture
def two_hosts():
    reason = why_skip()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100_000
    a, b = f"eta{tag}", f"etb{tag}"
    subnet = 10 + tag % 200
    addr_a, addr_b = f"10.{subnet}.77.1", f"10.{subnet}.77.2"
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        ip("link", "set", f"va{tag}", "netns", a)
        ip("link", "set", f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", addr_a), (b, f"vb{tag}", addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up", "multicast", "on")
            ip("-n", ns, "link", "set", "lo", "up")
        yield (a, addr_a), (b, addr_b)
    finally:
        for ns in (a, b):
            ip("netns", "del", ns, check=False)  # deletes the veth pair with them
        ip("link", "del", f"va{tag}", check=False)


def _spawn(ns: str, code: str, interface: str, port: int, extra: dict) -> subprocess.Popen:
    env = dict(os.environ, MESH_PORT=str(port), MESH_INTERFACE=interface,
               PYTHONPATH=str(ROOT / "src"), **extra)
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                             textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("mode", ["multicast", "static-peers"])
def test_discovery_across_network_namespaces(two_hosts, mode):
    (ns_a, addr_a), (ns_b, addr_b) = two_hosts
    port = 47000 + os.getpid() % 1000
    procs = []
    extra = {}
    if mode == "static-peers":
        # No multicast, no useful broadcast: the requester knows one address (the container
        # recipe in docs/mesh.md); the responder learns the requester from its hello.
        extra = {"MESH_GROUP": "", "MESH_PEERS": f"{addr_a}:{port}",
                 "MESH_BROADCAST": "127.255.255.255"}
    try:
        rep = _spawn(ns_a, RESPONDER, addr_a, port, extra)
        procs.append(rep)
        assert rep.stdout.readline().startswith("ready tcp://0.0.0.0:")
        req = _spawn(ns_b, REQUESTER, addr_b, port, extra)
        procs.append(req)
        out = req.communicate(timeout=20)[0]
        assert req.returncode == 0, out
        # The wildcard-bound endpoint was rewritten to the address the beacon came from.
        assert f"answer 42 tcp://{addr_a}:" in out, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
