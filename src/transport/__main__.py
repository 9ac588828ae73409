"""``python -m transport monitor``: list every mesh component on the network, live."""
from __future__ import annotations

import argparse
import json
import sys

import trio

from transport.mesh.discovery import DiscoveryConfig
from transport.mesh.monitor import Monitor

COLUMNS = ("namespace", "role", "name", "types", "endpoint", "host", "pid", "last_seen")


def render(rows: list[dict]) -> str:
    table = [COLUMNS] + [tuple(",".join(r[c]) if c == "types" else str(r[c]) for c in COLUMNS)
                         for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + [f"{len(rows)} component(s)"])


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m transport")
    sub = ap.add_subparsers(dest="command", required=True)
    mon = sub.add_parser("monitor", help="list every discovered mesh component, live")
    mon.add_argument("--port", type=int, help="discovery UDP port (env MESH_PORT)")
    mon.add_argument("--group", help="multicast group; '' disables (env MESH_GROUP)")
    mon.add_argument("--broadcast", help="also beacon to this broadcast address")
    mon.add_argument("--interface", help="IPv4 address of the interface to use")
    mon.add_argument("--peers", help="comma-separated static peers host[:port] (env MESH_PEERS)")
    mon.add_argument("--secret", help="verify signed beacons with this shared secret")
    mon.add_argument("--once", action="store_true", help="listen --wait seconds, print, exit")
    mon.add_argument("--json", action="store_true", help="print JSON (implies --once)")
    mon.add_argument("--wait", type=float, default=1.5, help="seconds to listen with --once")
    mon.add_argument("--refresh", type=float, default=1.0, help="seconds between screens")
    return ap.parse_args(argv)


def config_from(args: argparse.Namespace) -> DiscoveryConfig:
    overrides = {}
    if args.port:
        overrides["port"] = args.port
    if args.group is not None:
        overrides["multicast_group"] = args.group or None
    if args.broadcast:
        overrides["broadcast"] = args.broadcast
    if args.interface:
        overrides["interface"] = args.interface
    if args.peers:
        overrides["peers"] = tuple(p for p in args.peers.split(",") if p)
    return DiscoveryConfig.from_env(**overrides)


async def monitor(args: argparse.Namespace) -> None:
    async with Monitor(discovery=config_from(args), secret=args.secret) as mon:
        if args.once or args.json:
            await trio.sleep(args.wait)
            rows = mon.rows()
            print(json.dumps(rows, indent=1) if args.json else render(rows), flush=True)
            return
        while True:
            sys.stdout.write("\x1b[H\x1b[2J" + render(mon.rows()) + "\n")
            sys.stdout.flush()
            await trio.sleep(args.refresh)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        trio.run(monitor, args)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
