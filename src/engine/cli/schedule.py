"""``python -m engine schedule APP DRIVER --in S | --at ISO [JSON]``: a manual-scheduler
driver's event for later, through the node's ``schedule`` verb
(:mod:`engine.drivers.scheduler`)."""
from __future__ import annotations

import argparse
from typing import Any

from engine.cli.common import EXIT_OK, Runner, command, connect_node, node_options, parse_json_arg, to_json


@command("schedule", "schedule a manual-scheduler driver's event for later")
def schedule_command(p: argparse.ArgumentParser) -> Runner:
    node_options(p)
    p.add_argument("app")
    p.add_argument("driver")
    # The payload may follow the time (`--in 5 '{"k": 1}'`, the documented form):
    # on Python < 3.12 argparse hands an optional positional an empty match when it
    # sits after an option, so the time options collect it themselves.
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--in", dest="in_", nargs="+", metavar=("S", "JSON"), help="seconds from now")
    when.add_argument("--at", nargs="+", metavar=("ISO", "JSON"),
                      help="an ISO-8601 time (naive = the node's local time)")
    p.add_argument("payload", nargs="?", help="JSON payload (default null)")

    async def run(args: argparse.Namespace) -> int:
        given = args.in_ if args.in_ is not None else args.at
        texts = given[1:] + ([args.payload] if args.payload is not None else [])
        if len(texts) > 1:
            raise SystemExit("error: schedule takes one JSON payload, got "
                             + " ".join(repr(t) for t in texts))
        when: dict[str, Any]
        if args.in_ is not None:
            try:
                when = {"in": float(given[0])}
            except ValueError:
                raise SystemExit(f"error: --in expects seconds, got {given[0]!r}") from None
        else:
            when = {"at": given[0]}
        payload = parse_json_arg(texts[0] if texts else None)
        async with connect_node(args) as client:
            reply = await client.verb("schedule", {"app": args.app, "driver": args.driver,
                                                   "payload": payload, **when})
        print(to_json(reply))
        return EXIT_OK
    return run
