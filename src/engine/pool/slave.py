"""The trio shell around one slave process (node side).

``SlaveProcess.open()`` makes a Unix socketpair, starts the slave its language plugin
says (``python -m engine.worker`` for Python: engine/languages/) with one end (inherited,
or as its stdin and stdout) and yields the :class:`EnvelopeChannel` over the other;
:meth:`pump` hands its frames to a callback until the process has exited.  Leaving the context
(normally or by cancellation) always ends the process and reaps it: TERMINATE,
then SIGTERM, then SIGKILL of its whole process group, each after a bounded wait.

The slave's stdout and stderr (one pipe) are read continuously, so a chatty
slave never blocks on a full pipe, and the last ``crashlog_limit`` lines are kept; as
they arrive they are logged on ``engine.app.APP``, rate-limited (engine/pool/output_log.py).

Each task here (the link's writer, the output reader, the exit watcher) is a boundary:
what fails in it is this slave's failure, never its pool's (docs/architecture.md,
"Faults").  It is noted in :attr:`SlaveProcess.fault` and the process is killed, so
its pool reaps it, fails its jobs and replaces it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from transport.channel import EnvelopeChannel
from transport.codec import Envelope, Kind, encode_envelope, join_frame
from transport.errors import Closed
from transport.streams import FramedStream, from_socket, socketpair

from engine.languages import SOCKET, STDIO, Launch, LanguagePlugin
from engine.languages.python import PythonPlugin, worker_args
from engine.manifest import EngineConfig
from engine.pool.output_log import OutputGate
from engine.protocol.output_lines import parse_line
from engine.pool.spawn import ChildProcess, start_child
from engine.pool.zygote_client import ForkedSlave, Zygote

log = logging.getLogger(__name__)

MAX_LINE = 2000      # characters kept of one output line
EXIT_GRACE = 0.05    # s to collect frames still in flight after the process exited
SIGTERM_WAIT = 2.0   # s between SIGTERM and SIGKILL


class SlaveProcess:
    def __init__(self, *, app: str, entry: Path, config: EngineConfig,
                 death_fd: int | None = None, python: str = sys.executable,
                 zygote: Zygote | None = None, plugin: LanguagePlugin | None = None,
                 args: tuple[str, ...] = (), base_dir: Path | None = None) -> None:
        self.app = app
        self.entry = entry
        self.args = args
        self.base_dir = base_dir if base_dir is not None else entry.parent
        self.config = config
        self.death_fd = death_fd
        self.python = python
        self.plugin = plugin if plugin is not None else PythonPlugin(python)
        self.transport = config.transport or self.plugin.transports[0]
        # forks the slave when ready (a Python slave on a socket); else the plugin's command
        self.zygote = zygote if self.plugin.forkable and self.transport == SOCKET else None
        self.forked = False
        self.pid: int | None = None
        self.returncode: int | None = None
        self.output: deque[str] = deque(maxlen=max(1, config.crashlog_limit))
        self._gate = OutputGate(config.log_output)
        self._app_log = logging.getLogger(f"engine.app.{app}")
        self.exited = trio.Event()
        self._proc: ChildProcess | ForkedSlave | None = None
        self._chan: EnvelopeChannel | None = None
        self._recv_scope: trio.CancelScope | None = None
        self._output_done = trio.Event()
        # (kind, reason) of the first failure of this slave's own tasks (its link's
        # writer, its output reader, its exit watcher): its pool reports it and fails
        # the slave's jobs with the reason.
        self.fault: tuple[str, str] | None = None

    def launch(self, link_fd: int, parent_pid: int, death_fd: int | None) -> Launch:
        """What its plugin makes the slave's command of: ``parent_pid`` and ``death_fd``
        (the read end of a pipe that closes when the node dies) are its parent's."""
        cfg = self.config
        return Launch(app=self.app, entry=self.entry, args=self.args, base_dir=self.base_dir,
                      transport=self.transport, link_fd=link_fd,
                      heartbeat=cfg.heartbeat_timeout / 3, concurrency=cfg.concurrency,
                      parent_pid=parent_pid, death_fd=death_fd,
                      limits={k: v for k, v in asdict(cfg.resource_limits).items() if v})

    @asynccontextmanager
    async def open(self) -> AsyncIterator[EnvelopeChannel]:
        ours, theirs = socketpair()
        stream = from_socket(ours)
        # strict: a slave that sends a frame that does not decode is broken (an answer in
        # it would be lost): the pump raises CodecError and the pool kills it.
        chan = EnvelopeChannel(stream, strict=True)
        self._chan = chan
        try:
            # PYTHONUNBUFFERED: output reaches the crashlog at once; ENGINE_APP: handlers
            # that schedule events (engine.drivers.scheduler.schedule) know their app.
            extra = {"PYTHONUNBUFFERED": "1", "ENGINE_APP": self.app}
            link = theirs.fileno()
            death = (self.death_fd,) if self.death_fd is not None else ()
            try:
                proc: ChildProcess | ForkedSlave | None = await self._fork(link, extra)
                if proc is None:  # a session of its own (no ^C from the tty), output piped
                    cmd = self.plugin.command(self.launch(link, os.getpid(), self.death_fd))
                    env = {**os.environ, **extra, **cmd.env}
                    cwd = self.base_dir if self.plugin.in_app_folder else None
                    if self.transport == STDIO:
                        proc = start_child(cmd.argv, env=env, pass_fds=death, capture_output=True,
                                           stdio_fd=link, cwd=cwd)
                    else:
                        proc = start_child(cmd.argv, env=env, pass_fds=(link, *death),
                                           capture_output=True, cwd=cwd)
                self._proc = proc
            finally:
                theirs.close()  # the child has its copy; ours must go so EOF means "slave gone"
            self.pid = proc.pid
            assert proc.stdout is not None, "started with stdout=PIPE"
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_output, proc.stdout)
                    nursery.start_soon(self._wait_exit, proc)
                    await nursery.start(self._write, chan)
                    yield chan
                    # The slave exited or closed its link, and the link's EOF often
                    # comes before the exit is seen: wait a moment for both, and for
                    # the last words of a dying slave to reach the crashlog.
                    with trio.move_on_after(1.0):
                        await self.exited.wait()
                        await self._output_done.wait()
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop(proc, stream)
        finally:
            chan.close()

    async def _fork(self, link_fd: int, env: dict[str, str]) -> ForkedSlave | None:
        """The slave forked by the pool's zygote, or None: start it the plain way."""
        zygote = self.zygote
        if zygote is None:
            return None
        # Still importing (a pool's first slaves): waiting for it is about as quick
        # as a plain start, and a burst then forks instead of starting eight pythons.
        await zygote.settled.wait()
        if not zygote.ready:
            return None
        assert zygote.pid is not None, "a ready zygote has said its pid"
        try:
            proc = await zygote.spawn(worker_args(self.launch(link_fd, zygote.pid, zygote.death_fd)),
                                      dict(os.environ, **env), link_fd)
        except OSError as exc:
            log.info("%s: %s; starting the slave the plain way", self.app, exc)
            return None
        self.forked = True
        return proc

    async def pump(self, on_frame: Callable[[list[Envelope]], None]) -> None:
        """Hand every frame from the slave to ``on_frame`` until it has exited and
        nothing is left.  One cancel scope for the whole life (not one per frame):
        the exit watcher cancels it, then frames the slave sent just before dying are
        still collected for a short grace period.  Raises what ``on_frame`` raises,
        and :class:`CodecError` when the link's framing is lost (garbage on it): the
        caller's to handle, as this slave's failure."""
        assert self._chan is not None
        receive = self._chan.receive
        if not self.exited.is_set():
            with trio.CancelScope() as scope:
                self._recv_scope = scope
                try:
                    while True:
                        on_frame(await receive())
                except Closed:
                    return
                finally:
                    self._recv_scope = None
        # Exited: frames it sent just before dying may still be on their way.
        while True:
            frame = None
            with trio.move_on_after(EXIT_GRACE):
                try:
                    frame = await receive()
                except Closed:
                    return
            if frame is None:  # nothing within the grace period
                return
            on_frame(frame)

    def poll(self) -> list[Envelope]:
        """What the slave has sent already, without waiting (the pump sees the rest)."""
        return self._chan.poll() if self._chan is not None else []

    def hold(self) -> None:
        if self._chan is not None:
            self._chan.hold()

    def release(self) -> None:
        if self._chan is not None:
            self._chan.release()

    def send(self, kind: int, sid: int, body: Any = None) -> None:
        """Queue one envelope for the slave; raises :class:`BadMessage` (nothing
        queued) for one that cannot go, over the link's limit: its job's failure."""
        if self._chan is not None:
            try:
                self._chan.send_or_refuse(kind, sid, body)
            except Closed:
                pass  # the process is going away; its jobs fail through the session

    def kill(self) -> None:
        """SIGKILL the slave's process group now (hung slave, startup timeout)."""
        if self._proc is not None and self._proc.returncode is None:
            self._signal(self._proc, signal.SIGKILL)

    # -- internals -----------------------------------------------------------------
    def _failed(self, kind: str, reason: str) -> None:
        """One of this slave's tasks failed: note it (the first) and kill the slave,
        whose pool then reaps and replaces it."""
        log.error("%s: slave %s: %s", self.app, self.pid, reason, exc_info=True)
        if self.fault is None:
            self.fault = (kind, reason)
        self.kill()

    async def _write(self, chan: EnvelopeChannel, *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The link's writer.  It ends quietly when the slave is gone (its end of the
        link closed: the pump sees that too); any other failure leaves a slave that
        cannot be told anything, which is killed."""
        try:
            await chan.run_writer(task_status=task_status)
        except Exception as exc:
            self._failed("link-error", f"its link failed while written: {type(exc).__name__}: {exc}")

    async def _wait_exit(self, proc: ChildProcess | ForkedSlave) -> None:
        try:
            await proc.wait()
        except Exception as exc:
            self._failed("slave-watch", f"its exit could not be watched: {type(exc).__name__}: {exc}")
        else:
            self.returncode = proc.returncode
            self.exited.set()
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    async def _pump_output(self, stream: trio.abc.ReceiveStream) -> None:
        partial = b""
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    self._keep(line)
                if len(partial) > MAX_LINE * 4:
                    self._keep(partial)
                    partial = b""
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        except Exception as exc:  # unread, the pipe would fill and block the slave
            self._failed("slave-output", f"its output could not be read: {type(exc).__name__}: {exc}")
        finally:
            if partial:
                self._keep(partial)
            if dropped := self._gate.close():
                self._say_dropped(dropped)
            self._output_done.set()

    def _keep(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")[:MAX_LINE]
        level, message = parse_line(text)
        self.output.append(message)
        admitted, dropped = self._gate.admit(trio.current_time())
        if dropped < 0:
            self._app_log.warning("%s[%s] output over %g lines/s (engine.log-output): dropping "
                                  "lines from the log until it slows down (the crashlog keeps "
                                  "them)", self.app, self.pid, self._gate.rate)
        elif dropped:
            self._say_dropped(dropped)
        if admitted:
            self._app_log.log(level, "%s[%s] %s", self.app, self.pid, message)

    def _say_dropped(self, dropped: int) -> None:
        self._app_log.warning("%s[%s] %d line(s) of output were not logged (over %g lines/s)",
                              self.app, self.pid, dropped, self._gate.rate)

    async def _stop(self, proc: ChildProcess | ForkedSlave, stream: FramedStream) -> None:
        """TERMINATE, then SIGTERM, then SIGKILL; always reap. Runs shielded."""
        if proc.returncode is None:
            try:  # straight to the socket: the channel's writer task may be cancelled already
                stream.try_send_nowait(join_frame([encode_envelope(Kind.TERMINATE, 0, None)]))
            except Closed:
                pass
            # A SIGSTOPped slave would hear neither TERMINATE nor SIGTERM (a stopped
            # process keeps it pending) and cost the whole wait: wake it to go now.
            self._signal(proc, signal.SIGCONT)
            with trio.move_on_after(self.config.termination_timeout):
                await proc.wait()
        if proc.returncode is None:
            self._signal(proc, signal.SIGTERM)
            with trio.move_on_after(min(SIGTERM_WAIT, self.config.termination_timeout)):
                await proc.wait()
        if proc.returncode is None:
            self._signal(proc, signal.SIGKILL)
        if isinstance(proc, ForkedSlave):
            await proc.wait_killed()  # bounded even if its zygote is stuck
        else:
            await proc.wait()  # SIGKILL cannot be ignored: this is bounded
        self.returncode = proc.returncode
        if proc.stdout is not None:
            await proc.stdout.aclose()

    @staticmethod
    def _signal(proc: ChildProcess | ForkedSlave, sig: int) -> None:
        """Signal the slave's whole process group (it is its leader)."""
        if isinstance(proc, ForkedSlave):
            proc.signal_group(sig)
        else:
            _killpg(proc.pid, sig)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

