"""``"type": "exec"``: any executable that speaks the slave protocol.

``"args": ["./worker", "--flag"]``: the first item is the program, relative to the
manifest's folder; the rest are its arguments.  It learns everything else from the
launch contract's environment (docs/languages.md), and speaks on its stdin and stdout by
default (``"engine": {"transport": "stdio"}``), so a worker needs no socket code;
``"transport": "socket"`` hands it a socketpair end instead (``ENGINE_LINK=fd:N``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from engine.languages.base import SOCKET, STDIO, Launch, LanguagePlugin, SlaveCommand


class ExecPlugin(LanguagePlugin):
    name: ClassVar[str] = "exec"
    default_args: ClassVar[str] = "worker"
    transports: ClassVar[tuple[str, ...]] = (STDIO, SOCKET)

    def command(self, launch: Launch) -> SlaveCommand:
        return SlaveCommand(self.guarded([str(launch.entry), *launch.args], launch),
                            launch.contract_env())

    def entry_problem(self, entry: Path) -> str | None:
        if not entry.is_file() or not os.access(entry, os.X_OK):
            return "an executable file (chmod +x it)"
        return None
