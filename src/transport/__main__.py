"""``python -m transport monitor``: list every mesh component on the network, live, and
who talks to whom (its connections); ``--web PORT`` also serves a page drawing them as a
graph (transport/mesh/monitor_web.py)."""
from __future__ import annotations

import argparse
import json
import sys

import trio

from transport.mesh.discovery import DiscoveryConfig
from transport.mesh.monitor import Monitor
from transport.mesh.monitor_web import serve_graph

COLUMNS = ("namespace", "role", "name", "types", "endpoint", "host", "pid", "last_seen")


UNITS = {"requester": "requests", "subscriber": "events"}


def render(rows: list[dict]) -> str:
    table = [COLUMNS] + [tuple(",".join(r[c]) if c == "types" else str(r[c]) for c in COLUMNS)
                         for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines + [f"{len(rows)} component(s)"] + connections(rows))


def connections(rows: list[dict]) -> list[str]:
    """``requester rq-1 -> responder rep-2  123 requests``: one line per link of a
    Requester or Subscriber (a peer the monitor does not see is named by its id)."""
    roles = {r["id"]: r["role"] for r in rows}
    pairs = []
    for r in rows:
        for link in r.get("links", ()):
            if r["role"] not in UNITS:
                continue
            to = link["to_name"]
            target = (f"{roles[link['to']]} {to}" if to is not None
                      else f"(not seen) {link['to'][:12]}")
            pairs.append((f"{r['role']} {r['name']} -> {target}",
                          f"{link['count']} {UNITS[r['role']]}"))
    if not pairs:
        return ["connections: none"]
    width = max(len(left) for left, _ in pairs)
    return ["connections:"] + [f"  {left.ljust(width)}  {right}" for left, right in pairs]


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
    mon.add_argument("--web", type=int, metavar="PORT",
                     help="also serve a live page drawing the graph of components and their "
                          "connections on this TCP port (0: any free one); no authentication")
    mon.add_argument("--web-host", default="127.0.0.1",
                     help="address to serve --web on (default 127.0.0.1: this host only)")
    args = ap.parse_args(argv)
    if args.web is not None:
        if args.once or args.json:
            ap.error("--web serves a live page: not with --once or --json")
        if not 0 <= args.web < 65536:
            ap.error(f"--web: port {args.web} out of range")
    return args


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


async def monitor(args: argparse.Namespace) -> int:
    async with Monitor(discovery=config_from(args), secret=args.secret) as mon:
        if args.once or args.json:
            await trio.sleep(args.wait)
            rows = mon.rows()
            print(json.dumps(rows, indent=1) if args.json else render(rows), flush=True)
            return 0
        if args.web is not None:
            async with trio.open_nursery() as nursery:
                try:
                    url = await nursery.start(serve_graph, mon.graph, args.web_host, args.web)
                except OSError as exc:
                    print(f"monitor: cannot serve --web on {args.web_host}:{args.web}: {exc}",
                          file=sys.stderr, flush=True)
                    return 2
                print(f"mesh monitor graph on {url} (GET / and /api/graph; no authentication)",
                      file=sys.stderr, flush=True)
                if sys.stdout.isatty():
                    nursery.start_soon(screens, mon, args.refresh)
            return 0
        await screens(mon, args.refresh)
    return 0


async def screens(mon: Monitor, refresh: float) -> None:
    """The live table, redrawn every ``refresh`` seconds."""
    while True:
        sys.stdout.write("\x1b[H\x1b[2J" + render(mon.rows()) + "\n")
        sys.stdout.flush()
        await trio.sleep(refresh)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return trio.run(monitor, args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
