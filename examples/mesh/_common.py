"""Shared flags for the mesh examples: discovery comes from MESH_* env vars
(see docs/mesh.md), so the examples need no configuration on a LAN."""
import argparse

from transport import DiscoveryConfig


def args(description: str, interval: float):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--namespace", default="", help="e.g. rnd")
    ap.add_argument("--count", type=int, default=0, help="stop after this many (0: run forever)")
    ap.add_argument("--interval", type=float, default=interval, help="seconds between sends")
    ap.add_argument("--secret", default=None, help="shared secret of a private mesh")
    ns = ap.parse_args()
    ns.discovery = DiscoveryConfig.from_env()
    return ns
