"""``python -m engine COMMAND ...``: run a node, or talk to a running one.

The command line is the table :data:`COMMANDS`, written out below: the node's own
commands are here, the others in their modules of :mod:`engine.cli` (``top``,
``schedule``, the cluster's ``nodes``).  To add a command, write it with
:func:`engine.cli.common.command` and list it in the table.
"""
from __future__ import annotations

import argparse
import sys
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import trio

from engine.cli.cluster import (add_cluster_options, add_grant_options, cluster_options,
                                grant_secret_arg, nodes_command, tls_options)
from engine.cli.common import (EXIT_ERROR, EXIT_OK, EXIT_USAGE, Command, Runner, command,
                               connect_node, node_options, parse_json_arg, to_json)
from engine.cli.schedule import schedule_command
from engine.cli.top import top_command

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "build_parser", "format_app_info",
           "main"]


# -- commands ----------------------------------------------------------------------------

@command("run", "host the apps under MANIFEST or DIR until SIGINT/SIGTERM")
def run_command(p: argparse.ArgumentParser) -> Runner:
    from engine.node.node import DEFAULT_CONTROL

    p.add_argument("paths", nargs="*", metavar="MANIFEST|DIR",
                   help="manifest files, app folders, or folders of app folders")
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="ADDR",
                   help=f"control endpoint to listen on (default {DEFAULT_CONTROL}; beyond "
                        "loopback only with a token given: --token-file or ENGINE_NODE_TOKEN)")
    p.add_argument("--token-file", metavar="PATH",
                   help="the control endpoint's token: read from PATH, made there (mode 0600) "
                        "if missing (default: ENGINE_TOKEN_FILE, ENGINE_NODE_TOKEN, else the "
                        "node's own file for its address, on loopback; docs/security.md)")
    p.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="stderr log lines: text, or one JSON object per line (for log shippers)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics (/metrics) and a dashboard (/) over HTTP on "
                        "HOST:PORT, e.g. 127.0.0.1:9301 (default: ENGINE_METRICS, else none). "
                        "No authentication: beyond loopback only behind a proxy "
                        "(docs/operations.md)")
    add_cluster_options(p)

    async def run(args: argparse.Namespace) -> int:
        import os

        from engine.cli.log_format import configure as configure_logging
        from engine.cluster.secret import ClusterConfigError
        from engine.node.auth import ControlAuth
        from engine.node.dashboard import AddressError, parse_address
        from engine.node.node import serve

        from transport.tls import TlsConfigError

        metrics = args.metrics if args.metrics is not None else os.environ.get("ENGINE_METRICS")
        try:
            options = cluster_options(args)
            tls = tls_options(args)
            if metrics:
                parse_address(metrics)
        except (ClusterConfigError, TlsConfigError, AddressError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        auth = ControlAuth.from_env(token_file=args.token_file)
        configure_logging(args.log_level, args.log_format)
        if options is None:
            return await serve(args.paths, control=args.control, auth=auth, tls=tls,
                               metrics=metrics or None)
        from engine.cluster.registry import RegistryError
        from engine.cluster.verbs import in_cluster
        from engine.faults import leaves

        try:
            return await serve(args.paths, control=args.control, cluster=in_cluster(options),
                               auth=auth, tls=tls, metrics=metrics or None)
        except* RegistryError as group:      # etcd unreachable at start: say so, no traceback
            for leaf in leaves(group):
                print(f"error: {leaf}", file=sys.stderr)
        return EXIT_ERROR
    return run




@command("call", "call APP's EVENT; print the reply, one JSON line per chunk")
def call_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("app")
    p.add_argument("event")
    p.add_argument("payload", nargs="?", metavar="JSON", help="the payload as JSON (default null)")
    p.add_argument("--upload", metavar="FILE",
                   help="send FILE ('-': stdin) as the request's chunks, 64 KiB each "
                        "(a chunked request: the handler reads them as its second argument)")
    node_options(p)

    async def run(args: argparse.Namespace) -> int:
        payload = parse_json_arg(args.payload)
        async with connect_node(args) as node:
            if args.upload is not None:
                reply = await node.call(args.app, args.event, payload, timeout=args.timeout,
                                        chunks=_file_chunks(args.upload))
                print(to_json(reply), flush=True)
                return EXIT_OK
            async for chunk in node.stream(args.app, args.event, payload, timeout=args.timeout):
                print(to_json(chunk), flush=True)
        return EXIT_OK
    return run


def _file_chunks(path: str, size: int = 64 * 1024) -> Iterator[bytes]:
    with (open(sys.stdin.fileno(), "rb", closefd=False) if path == "-" else open(path, "rb")) as f:
        while block := f.read(size):
            yield block


@command("list", "list the node's apps and the manifests it rejected")
def list_command(p: argparse.ArgumentParser) -> Runner:
    node_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            listing = await node.list()
        if args.json:
            print(to_json(listing, indent=2))
            return EXIT_OK
        for name, app in listing.get("apps", {}).items():
            print(f"{name}\t{app.get('state')}\t{app.get('manifest')}")
        for path, reason in listing.get("rejected", {}).items():
            print(f"rejected\t{path}\t{reason}")
        return EXIT_OK
    return run


@command("info", "show an app's pool (slaves, queue, done/failed, latency) and drivers")
def info_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("app", nargs="?", help="the app (default: the node itself)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    node_options(p)

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            info = await node.info(args.app)
        if args.json or not args.app:
            print(to_json(info, indent=2))
        else:
            print(format_app_info(info))
        return EXIT_OK
    return run


def _ms(value: Any) -> str:
    """A latency for people: ``12.5 ms``, or ``-`` before the first sample."""
    return "-" if value is None else f"{value} ms"


def format_app_info(info: dict) -> str:
    """A few readable lines; fields another pool version may lack are left out."""
    pool, limits = info.get("pool", {}), info.get("limits", {})
    slaves = pool.get("slaves", [])
    lat = pool.get("latency_ms") or {}
    language = f"  ({info['language']})" if info.get("language", "python") != "python" else ""
    lines = [f"{info.get('name')}  {info.get('state')}  up {info.get('uptime', 0):.0f}s  "
             f"{info.get('manifest')}{language}"]
    if pool.get("reason"):
        lines.append(f"  {pool.get('state')}: {pool['reason']}")
    lines.append(
        f"  slaves {len(slaves)}/{limits.get('pool-limit', '?')}  "
        f"queue {pool.get('queue', '?')}/{limits.get('queue-limit', '?')}  "
        f"running {pool.get('running', '?')}  done {pool.get('done', '?')}  "
        f"failed {pool.get('failed', '?')}  crashes {pool.get('crashes', '?')}  "
        f"latency p50 {_ms(lat.get('p50'))} p99 {_ms(lat.get('p99'))}")
    prefetch = pool.get("prefetch")
    if prefetch:
        times = ", ".join(f"{event} {ms} ms" for event, ms in prefetch.get("service_ms", {}).items())
        lines.append(f"  prefetch {prefetch.get('mode')} (up to {prefetch.get('max')}; "
                     f"{pool.get('prefetched', 0)} queued on slaves now)"
                     + (f"  service: {times}" if times else ""))
    if pool.get("zygote"):
        lines.append(f"  zygote pid {pool['zygote']} (forks new slaves)")
    for s in slaves:
        lines.append(f"  slave {s.get('id')} pid {s.get('pid')} {s.get('state')} jobs {s.get('jobs')}")
    for name, d in info.get("drivers", {}).items():
        extra = {k: v for k, v in d.items() if k not in ("type", "emit")}
        lines.append(f"  driver {name}: {d.get('type')} -> {d.get('emit')}"
                     + (f"  {to_json(extra)}" if extra else ""))
    return "\n".join(lines)


@command("deploy", "start the app of MANIFEST (a file or app folder) on a running node")
def deploy_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--name", help="host it under this name instead")
    node_options(p, timeout=60.0)
    add_grant_options(p)

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            print(to_json(await node.deploy(args.manifest, name=args.name,
                                            cluster_secret=grant_secret_arg(args))))
        return EXIT_OK
    return run


@command("reload", "redeploy APP from its manifest file as it is now, losing no request")
def reload_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("app")
    node_options(p, timeout=120.0)

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            print(to_json(await node.reload(args.app)))
        return EXIT_OK
    return run


@command("undeploy", "drain and stop APP on a running node")
def undeploy_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("app")
    p.add_argument("--drain", type=float, metavar="S",
                   help="seconds to let in-flight jobs finish (default: its termination-timeout)")
    node_options(p, timeout=120.0)
    add_grant_options(p)

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            print(to_json(await node.undeploy(args.app, drain=args.drain,
                                              cluster_secret=grant_secret_arg(args))))
        return EXIT_OK
    return run


@command("crashlog", "print the last output lines of APP's dead slaves")
def crashlog_command(p: argparse.ArgumentParser) -> Runner:
    p.add_argument("app")
    node_options(p)

    async def run(args: argparse.Namespace) -> int:
        async with connect_node(args) as node:
            for line in await node.crashlog(args.app):
                print(line)
        return EXIT_OK
    return run


# -- entry point ---------------------------------------------------------------------------

# The command line: every command, in the order `--help` lists them.
COMMANDS: Mapping[str, Command] = MappingProxyType({c.name: c for c in (
    run_command, call_command, list_command, info_command, deploy_command, reload_command,
    undeploy_command,
    crashlog_command, top_command, schedule_command, nodes_command)})


def build_parser(commands: Mapping[str, Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine", description="engine-trio: host apps, or talk to a node",
        epilog="also: `python -m engine monitor [--once] [--json] [--web PORT] ...` lists every "
               "mesh component it discovers and who talks to whom (the same as "
               "`python -m transport monitor`)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in commands.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.set_defaults(runner=cmd.setup(p))
    return parser


def main(argv: list[str] | None = None, commands: Mapping[str, Command] = COMMANDS) -> int:
    """Run the command ``argv`` names (default: the process's arguments); its exit code.
    ``commands``: the table to take it from."""
    from transport.errors import RemoteError, TransportError

    from engine.errors import EngineError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["monitor"]:
        # The mesh's Monitor, reachable from the engine's CLI too: one tool to learn.
        from transport.__main__ import main as transport_main

        return transport_main(argv)
    args = build_parser(commands).parse_args(argv)
    try:
        return trio.run(args.runner, args)
    except BaseException as exc:
        # Nurseries wrap what their bodies raise; look at the one error inside.
        inner = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, (RemoteError, TransportError, EngineError)):
            # the node's typed error (AppNotFound, HandlerError, timeout...) or a local one
            print(f"error: {inner}", file=sys.stderr)
            return EXIT_ERROR
        if isinstance(inner, KeyboardInterrupt):
            return 130
        if isinstance(inner, BrokenPipeError):  # `... | head`
            return EXIT_OK
        raise


if __name__ == "__main__":
    sys.exit(main())
