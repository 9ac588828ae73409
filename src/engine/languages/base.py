"""What a language plugin is: how to start a slave for a manifest, and how it speaks.

A plugin is a small class (:class:`LanguagePlugin`); the pool asks it for the command
of each slave it starts (:meth:`LanguagePlugin.command`), given a :class:`Launch`: the
app, its entry and arguments, and the link the slave protocol runs on (an inherited
socketpair end, or the slave's stdin and stdout).  Everything else about a slave (its
output, its deadlines, its jobs, its death) is the pool's, the same for every language
(docs/languages.md).  Pure: no I/O but :meth:`LanguagePlugin.missing`, which looks at
the machine.
"""
from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Mapping

from engine.protocol.messages import PROTOCOL_VERSION

SOCKET, STDIO = "socket", "stdio"     # where the slave protocol runs
TRANSPORTS = (SOCKET, STDIO)


@dataclass(frozen=True)
class Launch:
    """One slave to start: what its plugin's command is made of."""
    app: str
    entry: Path                       # the manifest's first ``args`` item, resolved
    args: tuple[str, ...]             # the rest of ``args``, as written
    base_dir: Path                    # the manifest's folder (the slave's working directory)
    transport: str                    # SOCKET or STDIO
    link_fd: int                      # the slave's end of the link (its descriptor number
    #                                   with SOCKET; with STDIO it becomes stdin and stdout)
    heartbeat: float                  # seconds between two heartbeats
    concurrency: int
    parent_pid: int                   # the node (or the zygote that forks the slave)
    death_fd: int | None = None       # read end of a pipe that reaches EOF when the node dies
    limits: Mapping[str, object] = field(default_factory=dict)  # engine.resource-limits

    def contract_env(self) -> dict[str, str]:
        """The launch contract's variables (docs/languages.md), for any worker."""
        return {
            "ENGINE_APP": self.app,
            "ENGINE_LINK": STDIO if self.transport == STDIO else f"fd:{self.link_fd}",
            "ENGINE_HEARTBEAT": f"{self.heartbeat:.3f}",
            "ENGINE_CONCURRENCY": str(self.concurrency),
            "ENGINE_PROTOCOL": str(PROTOCOL_VERSION),
            "ENGINE_PARENT_PID": str(self.parent_pid),
        }


@dataclass(frozen=True)
class SlaveCommand:
    argv: list[str]
    env: dict[str, str]               # added to the node's environment


class LanguagePlugin(ABC):
    """One language: how its slaves start.  Subclass it, set the class attributes,
    write :meth:`command`; register it under ``[project.entry-points."engine.languages"]``
    (docs/languages.md has a whole example)."""

    name: ClassVar[str]                       # the manifest's ``type``
    default_args: ClassVar[str]               # ``args`` when the manifest has none
    transports: ClassVar[tuple[str, ...]] = (SOCKET, STDIO)  # the first is the default
    forkable: ClassVar[bool] = False          # its slaves may be forked by the Python zygote
    takes_arguments: ClassVar[bool] = True    # ``args`` may be a list (entry + arguments)
    runs_in_node: ClassVar[bool] = False      # may use ``backend: "thread"`` (Python only)
    in_app_folder: ClassVar[bool] = True      # the slave's working directory: the manifest's folder

    def entry_problem(self, entry: Path) -> str | None:
        """Why ``entry`` (the manifest's ``args``, resolved; it exists) cannot be this
        language's entry, as what was expected instead; None if it can."""
        return None

    def missing(self) -> str | None:
        """What this machine lacks to run the language (a runtime not on the PATH...),
        said so that a user knows what to install; None when nothing is missing."""
        return None

    @abstractmethod
    def command(self, launch: Launch) -> SlaveCommand:
        """The slave's command line and environment.  With ``launch.transport`` SOCKET
        the slave inherits ``launch.link_fd``; with STDIO that socket is its stdin and
        stdout.  Either way its stderr is the node's to read (log and crashlog)."""

    # -- helpers for plugins ------------------------------------------------------------
    @staticmethod
    def guarded(argv: list[str], launch: Launch) -> list[str]:
        """``argv`` behind the wrappers that make any program a well-behaved slave:
        killed with its node (``setpriv --pdeathsig KILL``: set before the program
        runs, so a SIGKILLed node leaves no orphan), under its resource limits
        (``prlimit``, ``taskset``).  Only where the tools exist (util-linux)."""
        out: list[str] = []
        if shutil.which("setpriv"):
            out += ["setpriv", "--pdeathsig", "KILL", "--"]
        limits = launch.limits
        rl = [f"--{opt}={limits[key]}" for key, opt in
              (("memory_bytes", "as"), ("cpu_seconds", "cpu"), ("open_files", "nofile"))
              if limits.get(key)]
        if rl and shutil.which("prlimit"):
            out += ["prlimit", *rl, "--"]
        cpus = limits.get("cpus")
        if cpus and shutil.which("taskset"):
            out += ["taskset", "-c", ",".join(str(c) for c in cpus)]  # type: ignore[attr-defined]
        return out + argv
