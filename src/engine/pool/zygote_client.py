"""The node's end of its zygote (:mod:`engine.worker.zygote`), shared by its slave pools.

:class:`Zygote` starts the template process, forks slaves through it and turns its
exit reports into :class:`ForkedSlave` handles, which :class:`engine.pool.slave.SlaveProcess`
uses as it uses a ``trio.Process``: ``pid``, ``returncode``, ``wait()``, a signal to
the slave's process group, and its output as a trio stream.  Until the zygote has
said it is ready, or after it is gone, :attr:`Zygote.ready` is false and slaves are
started the plain way (``python -m engine.worker``): a zygote only ever makes
starting faster, never possible or not.
"""
from __future__ import annotations

import array
import itertools
import logging
import os
import signal
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import msgpack
import trio

from engine.pool.spawn import KILL_WITH_PARENT, start_child
from engine.worker.zygote_wire import MAX_MESSAGE

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0
SPAWN_TIMEOUT = 5.0   # a fork takes milliseconds; a zygote this slow is stuck
KILL_WAIT = 2.0       # for the zygote to report a SIGKILLed slave's exit
STOP_WAIT = 2.0


@asynccontextmanager
async def running_zygote(python: str) -> AsyncIterator[Zygote]:
    """A zygote served in the background while the body runs, and after it: its
    shielded scope is cancelled only once the body, and with it every slave the
    zygote forked, has ended (the zygote's end would end them early).  It watches a
    pipe of its own for the death of this process, as its slaves do.  The process
    starts at the first :meth:`Zygote.want`: a node hosting no process slaves has none."""
    death_r, death_w = os.pipe()
    zygote = Zygote(python, death_r)
    scope = trio.CancelScope(shield=True)

    async def serve() -> None:
        with scope:
            await zygote.wanted.wait()
            await zygote.run()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                yield zygote
            finally:
                scope.cancel()
    finally:
        os.close(death_r)
        os.close(death_w)


class ForkedSlave:
    """A slave forked by the zygote: what the node needs of a ``trio.Process``."""

    def __init__(self, zygote: Zygote, pid: int, output_fd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdout = trio.lowlevel.FdStream(output_fd)
        self._zygote = zygote
        self._exited = trio.Event()

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    def signal_group(self, sig: int) -> None:
        self._zygote.kill(self.pid, sig)

    async def wait_killed(self) -> None:
        """After SIGKILL: its exit, as the zygote reports it, within KILL_WAIT.  A
        zygote that does not report (stopped, stuck) must not hang the pool's
        shutdown: the slave's group is then killed from here (a slave not reported
        is not reaped, so its pid is not anybody else's yet) and taken as killed."""
        with trio.move_on_after(KILL_WAIT):
            await self._exited.wait()
            return
        log.warning("zygote did not report slave %d's exit: killing it directly", self.pid)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._exit(-signal.SIGKILL)

    def _exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()


class Zygote:
    """One zygote process, as its pool sees it: :meth:`run` starts and serves it,
    :meth:`spawn` forks a slave through it, and its exit reports settle the
    :class:`ForkedSlave` handles."""

    def __init__(self, python: str, death_fd: int | None) -> None:
        self.python = python
        self.death_fd = death_fd
        self.ready = False
        self.settled = trio.Event()              # set once ready, or once it never will be
        self.wanted = trio.Event()               # running_zygote starts it on this
        self.pid: int | None = None              # the zygote's: its slaves' parent
        self._raw: socket.socket | None = None   # for kill(), which must not await
        self._sock: trio.socket.SocketType | None = None
        self._ids = itertools.count(1)
        self._spawning: dict[int, tuple[trio.Event, list[dict[str, Any]]]] = {}
        self._children: dict[int, ForkedSlave] = {}

    def want(self) -> None:
        """A pool that forks through it is starting: start the process now, so it is
        ready (it takes about as long as one plain slave start) by the first spawn."""
        self.wanted.set()

    async def run(self) -> None:
        """Start the zygote and serve it until cancelled (or it dies: then slaves are
        started the plain way).  Always ends and reaps it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [self.python, "-m", "engine.worker.zygote", "--control-fd", str(theirs.fileno()),
               "--parent-pid", str(os.getpid())]
        fds = [theirs.fileno()]
        if self.death_fd is not None:
            cmd += ["--death-fd", str(self.death_fd)]
            fds.append(self.death_fd)
        try:
            # From this thread, so the node's death SIGKILLs it (engine.pool.spawn).
            proc = start_child([*cmd, KILL_WITH_PARENT], pass_fds=fds,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except OSError as exc:
            log.warning("no zygote (%s): slaves start the plain way", exc)
            ours.close()
            self.settled.set()
            return
        finally:
            theirs.close()
        self._raw = ours
        self._sock = sock = trio.socket.from_stdlib_socket(ours)
        try:
            with trio.move_on_after(READY_TIMEOUT):
                hello = await self._receive(sock)
                if hello is not None and hello.get("op") == "ready":
                    self.pid, self.ready = hello["pid"], True
            self.settled.set()
            if not self.ready:
                log.warning("the zygote did not start: slaves start the plain way")
            while self.ready:
                message = await self._receive(sock)
                if message is None:
                    log.warning("the zygote %s exited: slaves start the plain way", self.pid)
                    break
                self._on_message(message)
        finally:
            self.ready = False
            self.settled.set()
            sock.close()  # the zygote sees EOF and exits
            for slot in self._spawning.values():
                slot[0].set()  # a spawn still waiting gets no pid: it fails
            for child in self._children.values():
                # No status without the zygote: its slaves die with it (it SIGKILLs
                # them as it goes, and so does the kernel when it dies).
                child._exit(-signal.SIGKILL)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_WAIT):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    async def spawn(self, argv: list[str], env: dict[str, str], link_fd: int) -> ForkedSlave:
        """Fork a slave running ``engine.worker`` with ``argv`` (``--fd`` is added) over
        ``link_fd``, with ``env`` as its whole environment (the node's now, as a plain
        start would get it, not the zygote's from when it started).  Raises OSError if
        the zygote cannot (or is gone)."""
        if not self.ready or self._sock is None:
            raise OSError("the zygote is not running")
        out_r, out_w = os.pipe()
        spawn_id = next(self._ids)
        done = trio.Event()
        result: list[dict[str, Any]] = []
        self._spawning[spawn_id] = (done, result)
        try:
            try:
                data = msgpack.packb({"op": "spawn", "id": spawn_id, "argv": argv, "env": env})
                if len(data) > MAX_MESSAGE:
                    raise OSError(f"spawn request of {len(data)} bytes (the environment?)")
                await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [link_fd, out_w]))])
            finally:
                os.close(out_w)  # the zygote has its copy (or never will)
            with trio.move_on_after(SPAWN_TIMEOUT):
                await done.wait()  # a late answer finds no slot: its slave is killed
        except BaseException:
            os.close(out_r)
            raise
        finally:
            del self._spawning[spawn_id]
        if not result or result[0].get("op") != "spawned":
            os.close(out_r)
            why = result[0].get("error") if result else \
                ("no answer" if self.ready else "the zygote is gone")
            raise OSError(f"zygote could not fork a slave: {why}")
        child = self._children[result[0]["pid"]] = ForkedSlave(self, result[0]["pid"], out_r)
        return child

    def kill(self, pid: int, sig: int) -> None:
        """Signal a slave's process group through the zygote, which knows whether
        that pid is still its child (the node could hit a recycled pid).  Straight
        from here if the message cannot go now."""
        if self.ready and self._raw is not None:
            try:
                self._raw.send(msgpack.packb({"op": "kill", "pid": pid, "sig": int(sig)}))
                return
            except OSError:
                pass
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    async def _receive(sock: trio.socket.SocketType) -> dict[str, Any] | None:
        try:
            data = await sock.recv(1 << 16)
        except OSError:
            return None
        if not data:
            return None
        message = msgpack.unpackb(data)
        return message if isinstance(message, dict) else None  # garbage: as if it had gone

    def _on_message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("spawned", "failed"):
            slot = self._spawning.get(message["id"])
            if slot is not None:
                slot[1].append(message)
                slot[0].set()
            elif op == "spawned":  # its spawner was cancelled meanwhile: end the orphan
                self.kill(message["pid"], signal.SIGKILL)
        elif op == "exit":
            child = self._children.pop(message["pid"], None)
            if child is not None:
                child._exit(message["code"])
