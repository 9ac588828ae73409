"""What the fault tests share: an app whose handlers misbehave on request, a SlavePool
run in the test's own process over real slave processes, and the bookkeeping that
proves every accepted job got exactly one answer."""
from __future__ import annotations

import os
import signal
import textwrap
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import psutil
import trio

from engine.manifest import EngineConfig
from engine.pool.job import Job
from engine.pool.process import SlavePool
from transport.errors import RemoteError

# The handlers' sleeps are their work, on the real clock of a real slave process.
APP = """
import os, sys, time
import trio
from engine import on

def link_fd():
    return int(sys.argv[sys.argv.index("--fd") + 1])

@on("echo")
def echo(data):
    return data

@on("pid")
def pid(data):
    return os.getpid()

@on("work")
async def work(data):
    await trio.sleep(data["sleep"])
    return [os.getpid(), len(data.get("blob", b""))]

@on("garbage")
def garbage(how):
    # Write on the node link behind the runtime's back: a length prefix no frame has
    # ("prefix"), or a frame that is not msgpack ("frame").
    fd = link_fd()
    if how == "prefix":
        os.write(fd, b"\\xff\\xff\\xff\\xf0garbage")
    else:
        os.write(fd, b"\\x00\\x00\\x00\\x05\\xc1\\xc1\\xc1\\xc1\\xc1")
    time.sleep(0.05)
    return "written"

@on("big")
def big(mib):
    return b"x" * (mib << 20)

@on("bigstream")
def bigstream(mib):
    yield "small first"
    yield b"x" * (mib << 20)
    yield "never sent"

@on("size")
def size(data):
    return len(data)

@on("hog")
def hog(mib):
    block = bytearray(mib << 20)
    return len(block)
"""


@asynccontextmanager
async def running_pool(tmp_path: Path, source: str = APP, **cfg: Any) -> AsyncIterator[SlavePool]:
    """A SlavePool of the app ``source`` in this process, cancelled on the way out."""
    entry = tmp_path / "app.py"
    entry.write_text(textwrap.dedent(source))
    cfg.setdefault("heartbeat_timeout", 10.0)
    cfg.setdefault("startup_timeout", 20.0)
    cfg.setdefault("termination_timeout", 2.0)
    pool = SlavePool("fault-app", entry, EngineConfig(**cfg))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Ledger:
    """Every job accepted, and how it was answered: ``answers[job_id]`` counts the done
    callbacks (must end at exactly 1), ``outcomes`` the value or the error's type."""
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    answers: dict[int, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)

    def submit(self, pool: SlavePool, event: str, payload: Any) -> Job | None:
        try:
            job = pool.submit(event, payload)
        except RemoteError as exc:   # refused at once: not accepted, so owed nothing
            self.refused[type(exc).__name__] = self.refused.get(type(exc).__name__, 0) + 1
            return None
        self.accepted += 1
        self.answers[job.id] = 0

        def answered(j: Job) -> None:
            self.answers[j.id] += 1

        job.add_done_callback(answered)
        return job

    async def settle(self, job: Job) -> Any:
        """The job's answer (its value, or the RemoteError it failed with), counted."""
        try:
            value = await job.result()
        except RemoteError as exc:
            self.outcomes[type(exc).__name__] = self.outcomes.get(type(exc).__name__, 0) + 1
            return exc
        self.outcomes["value"] = self.outcomes.get("value", 0) + 1
        return value

    def check(self) -> None:
        wrong = {jid: n for jid, n in self.answers.items() if n != 1}
        assert not wrong, f"jobs not answered exactly once: {wrong}"
        assert sum(self.outcomes.values()) == self.accepted, (self.outcomes, self.accepted)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def live_slaves(pool: SlavePool) -> list[int]:
    return [s["pid"] for s in pool.info()["slaves"]
            if s["pid"] is not None and s["state"] == "ready"]


def running_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
