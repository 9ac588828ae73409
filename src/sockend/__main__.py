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
from sockend.hooks import BridgeHooks, load_hooks
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
    p.add_argument("--hooks", metavar="MODULE:NAME",
                   help="authentication, request and room hooks: a BridgeHooks subclass or instance "
                   "(package.module:Name or path/to/file.py:Name; sockend/hooks.py)")
    p.add_argument("--no-socketio", dest="socketio", action="store_false",
                   help="do not speak Socket.IO (only Sockend's own websocket protocol)")
    p.add_argument("--socketio-path", default="/socket.io/", help="the Socket.IO endpoint (default /socket.io/)")
    p.add_argument("--socketio-client", metavar="PATH",
                   help="socket.io.js to serve at /socket.io/socket.io.js (the file, or the "
                   "socket.io-client package); default: an installed node_modules/socket.io-client")
    p.add_argument("--ack", choices=("answer", "node"), default="answer",
                   help="what a Socket.IO ack carries: 'answer' (default): ack(answer) or "
                   "ack({error}); 'node': cote's ack(null, answer) or ack(error)")
    p.add_argument("--ping-interval", type=float, default=25.0, help="Socket.IO ping interval, s")
    p.add_argument("--ping-timeout", type=float, default=20.0, help="Socket.IO ping timeout, s")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> SockendConfig:
    """The server's config from the command line; ValueError names a bad option."""
    return SockendConfig(host=args.bind, port=args.port, static_dir=args.static,
                         namespaces=tuple(args.namespaces) if args.namespaces else None,
                         request_timeout=args.timeout, max_clients=args.max_clients,
                         max_connections=args.max_clients + 100,
                         allowed_origins=tuple(args.allowed_origins), socketio=args.socketio,
                         socketio_path=args.socketio_path, socketio_client=args.socketio_client,
                         ack_style=args.ack, ping_interval=args.ping_interval,
                         ping_timeout=args.ping_timeout)


async def serve(args: argparse.Namespace, config: SockendConfig, hooks: BridgeHooks | None = None) -> None:
    mesh = TransportMesh(key=args.key, environment=args.environment,
                         secret=os.environ.get("MESH_SECRET") or None,
                         discovery=DiscoveryConfig.from_env(), bind=args.mesh_bind)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Sockend(mesh, config, hooks=hooks).run)
        sio = f", socket.io at {config.socketio_path}" if config.socketio else ""
        print(f"sockend listening on http://{args.bind}:{server.port}/ "
              f"(ws://{args.bind}:{server.port}/<namespace>{sio})", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = make_config(args)
        hooks = load_hooks(args.hooks) if args.hooks else None
    except ValueError as exc:   # a bad option: said once, as argparse says its own
        print(f"python -m sockend: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        trio.run(serve, args, config, hooks)
    except* KeyboardInterrupt:   # Ctrl-C, bare or inside the nurseries' exception groups
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
