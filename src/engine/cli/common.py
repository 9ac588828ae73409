"""What every command of ``python -m engine`` is made of, and the helpers they share.

A command is a :class:`Command`: a name, a help line and a *setup* function that adds
its arguments to the subparser it is given and returns the ``async def run(args) ->
int`` that carries it out.  Write one with :func:`command`::

    @command("top", "show every app's load, refreshed")
    def top_command(p):
        node_options(p)                     # the usual --node/--timeout
        p.add_argument("--interval", type=float, default=1.0)
        async def run(args):
            async with connect_node(args) as node:
                ...
            return EXIT_OK
        return run

and list it in :data:`engine.cli.commands.COMMANDS`: the command line is that table,
and nothing else adds to it.
"""
from __future__ import annotations

import argparse
import base64
import json
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple

if TYPE_CHECKING:
    from engine.client.node_client import NodeClient

Runner = Callable[[argparse.Namespace], Awaitable[int]]
Setup = Callable[[argparse.ArgumentParser], Runner]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class Command(NamedTuple):
    name: str
    help: str
    setup: Setup


def command(name: str, help: str) -> Callable[[Setup], Command]:
    """Make the decorated setup function a :class:`Command` (it registers nothing)."""
    def make(setup: Setup) -> Command:
        return Command(name, help, setup)
    return make


def node_options(p: argparse.ArgumentParser, *, timeout: float | None = 30.0) -> None:
    from engine.client import DEFAULT_NODE

    p.add_argument("--node", default=DEFAULT_NODE, metavar="ADDR",
                   help=f"the node's control address (default {DEFAULT_NODE})")
    p.add_argument("--timeout", type=float, default=timeout, metavar="S",
                   help="seconds to wait for the reply (per chunk when streaming)")
    p.add_argument("--token-file", metavar="PATH",
                   help="the node's token (default: ENGINE_NODE_TOKEN, ENGINE_TOKEN_FILE, or "
                        "the node's own file, found on its host; docs/security.md)")


def connect_node(args: argparse.Namespace) -> AbstractAsyncContextManager[NodeClient]:
    """``async with connect_node(args) as node``: a client of the node at ``--node``,
    with its token (``--token-file``, or found as engine.client.tokens says)."""
    from engine.client import connect

    wait = 5.0 if args.timeout is None else min(5.0, args.timeout)
    return connect(args.node, timeout=args.timeout, connect_timeout=wait,
                   token_file=args.token_file)


def to_json(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False, indent=indent,
                      sort_keys=indent is not None)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def parse_json_arg(text: str | None) -> Any:
    """A payload given on the command line, as JSON (None: null)."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: payload is not JSON ({exc}); quote strings: '\"hi\"'")
