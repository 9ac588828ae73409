"""``python -m sockend --port 5555 [--bind 127.0.0.1] [--static DIR]``: bridge browsers to
the mesh.  Discovery follows the MESH_* environment (transport/discovery.py), so the
same container recipe as the other components applies."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from transport.mesh.discovery import DiscoveryConfig

from sockend.bridge import TransportMesh
from sockend.server import Sockend, SockendConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sockend", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=5555, help="HTTP/websocket port (0: any free one)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--static", metavar="DIR", help="serve DIR's index.html and files over HTTP")
    p.add_argument("--namespace", action="append", dest="namespaces", metavar="NS",
                   help="allow only these namespaces ('' is the default one); repeatable")
    p.add_argument("--allow-origin", action="append", dest="allowed_origins", metavar="ORIGIN",
                   default=[], help="also accept websockets from pages of ORIGIN (https://app.example.com; "
                   "'*': any); repeatable.  Default: the same origin only (and non-browser clients)")
    p.add_argument("--key", default=os.environ.get("MESH_KEY", ""), help="mesh key")
    p.add_argument("--environment", default=None,
                   help="mesh environment (default: MESH_ENVIRONMENT or COTE_ENV, else none)")
    p.add_argument("--mesh-bind", default="127.0.0.1",
                   help="address the mesh data sockets use (0.0.0.0 for a LAN)")
    p.add_argument("--timeout", type=float, default=10.0, help="request timeout ceiling, s")
    p.add_argument("--max-clients", type=int, default=1000)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> SockendConfig:
    """The server's config from the command line; ValueError names a bad option."""
    return SockendConfig(host=args.bind, port=args.port, static_dir=args.static,
                         namespaces=tuple(args.namespaces) if args.namespaces else None,
                         request_timeout=args.timeout, max_clients=args.max_clients,
                         max_connections=args.max_clients + 100,
                         allowed_origins=tuple(args.allowed_origins))


async def serve(args: argparse.Namespace, config: SockendConfig) -> None:
    mesh = TransportMesh(key=args.key, environment=args.environment,
                         secret=os.environ.get("MESH_SECRET") or None,
                         discovery=DiscoveryConfig.from_env(), bind=args.mesh_bind)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Sockend(mesh, config).run)
        print(f"sockend listening on http://{args.bind}:{server.port}/ "
              f"(ws://{args.bind}:{server.port}/<namespace>)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = make_config(args)
    except ValueError as exc:   # a bad option: said once, as argparse says its own
        print(f"python -m sockend: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        trio.run(serve, args, config)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
