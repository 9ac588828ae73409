"""``"type": "python"``: ``python -m engine.worker`` imports the app module (the default)."""
from __future__ import annotations

import json
import sys
from typing import ClassVar

from engine.languages.base import SOCKET, Launch, LanguagePlugin, SlaveCommand
from engine.pool.spawn import KILL_WITH_PARENT


class PythonPlugin(LanguagePlugin):
    name: ClassVar[str] = "python"
    default_args: ClassVar[str] = "app.py"
    transports: ClassVar[tuple[str, ...]] = (SOCKET,)
    forkable: ClassVar[bool] = True
    takes_arguments: ClassVar[bool] = False
    runs_in_node: ClassVar[bool] = True
    in_app_folder: ClassVar[bool] = False     # the node's (the worker finds the app's modules)

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def command(self, launch: Launch) -> SlaveCommand:
        # KILL_WITH_PARENT: the pool starts it from trio's thread (engine.pool.spawn).
        return SlaveCommand(
            [self.python, "-m", "engine.worker", *worker_args(launch), "--fd", str(launch.link_fd),
             KILL_WITH_PARENT],
            {"PYTHONUNBUFFERED": "1"})


def worker_args(launch: Launch) -> list[str]:
    """``engine.worker``'s arguments but ``--fd`` (a zygote-forked slave gets these)."""
    limits = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v)
              for k, v in launch.limits.items() if v}
    args = ["--app", launch.app, "--entry", str(launch.entry),
            "--concurrency", str(launch.concurrency),
            "--heartbeat", f"{launch.heartbeat:.3f}", "--parent-pid", str(launch.parent_pid)]
    if launch.death_fd is not None:
        args += ["--death-fd", str(launch.death_fd)]
    if limits:
        args += ["--limits", json.dumps(limits)]
    return args
