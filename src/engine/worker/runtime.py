"""The slave runtime: ``python -m engine.worker --app NAME --entry PATH --fd N``.

One slave process hosts one app module and serves INVOKEs from its node over the
inherited end ``N`` of a Unix socketpair (docs/protocol.md).  What happens to jobs
(INVOKE validation, slots and prefetch, CANCEL, stream credit, TERMINATE) is decided
by the pure :class:`engine.protocol.slave_session.WorkerSession`; this module is its
trio shell: it runs the handlers, sends what the session says, and owns the process.
Lifetime rules:

- It dies with its node: ``PR_SET_PDEATHSIG`` (SIGKILL, which ends a stopped slave
  too: :func:`watch_parent`) plus a thread blocked on the read end of a pipe whose
  write end only the node holds (EOF = node gone); a check of its parent's pid covers
  the race where the node died before ``prctl`` ran.
- Heartbeats say "this process is alive", not "its jobs are quick": they come from a
  trio task and, while the trio thread is busy in a handler (a sync handler runs
  inline on it, for speed: no thread hop per job), from a watchdog thread
  (:class:`Watchdog`) that beats on its behalf as long as a job is running.  So a
  20-second sync job does not look hung under a 10-second heartbeat-timeout; what
  bounds a job's duration is the app's ``request-timeout`` (the node cancels the job,
  and kills the slave if its handler cannot stop).  A slave with no job running
  whose trio thread stops (wedged, or the process stopped) stops beating and is
  killed as hung.  The price of running inline stays: a sync handler blocks the
  slave's other jobs while it runs.
- A handler's exception is sent as an ERROR on its stream; the slave lives on.
- At most ``--concurrency`` jobs run at once; INVOKEs beyond that (the node's
  ``engine.prefetch``) wait in arrival order and start as slots free.  A ``CANCEL``
  of one that has not started answers it with ``cancelled`` at once.
- ``CANCEL`` on a job's sid cancels that handler's task: an async handler or async
  generator stops at its next await, a sync generator before its next item; a sync
  handler cannot be interrupted and runs to its end (its reply is then dropped by
  the node).  The acknowledgement is an ERROR with code ``cancelled``.
- A chunked request (``INVOKE [event, payload, true]``, then ``CHUNK``s and ``CHOKE``)
  gives its handler the chunks as a second argument, an async iterator that grants the
  node ``CREDIT`` as it is read (transport/inbound.py); such a handler must be async.
- Streams are flow-controlled: at most ``STREAM_WINDOW`` chunks of a job beyond the
  node's ``CREDIT`` grants; a handler whose window is used up waits (heartbeats go on).
- A reply too large for the link (over its frame limit) fails that job with a
  ``bad-message`` error saying so, checked here before anything is written, so the link
  and the slave live on; a chunk too large ends its stream the same way.  The link
  itself failing (its end closed, garbage on it) ends the slave: it exits quietly when
  the node is gone, with ``EXIT_LINK_BROKEN`` when the framing is lost.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import inspect
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, AsyncGenerator, Callable, Generator

import trio

from transport.channel import EnvelopeChannel
from transport.codec import Envelope, Kind, encode_one
from transport.errors import BadMessage, Closed, CodecError, error_to_body
from transport.inbound import InputStream
from transport.streams import FramedStream, from_fd

from engine import api
from engine.client import calls
from engine.protocol.output_lines import record_line
from engine.protocol.slave_session import (Action, CancelHandler, CloseInput, EndInput, Exit, Feed, OpenInput,
                                           Resume, Start, WorkerSession)

PR_SET_PDEATHSIG = 1
EXIT_STARTUP_FAILED = 3
EXIT_LINK_BROKEN = 4   # the node's link carried something that is not a frame


def watch_parent(parent_pid: int, death_fd: int | None, *, kill: bool = False) -> None:
    """Exit when the node dies, even if it was SIGKILLed, even if we are SIGSTOPped.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked us exits.  ``kill``: our
    parent forked us from a thread that lives as long as it does (the zygote's only
    thread, or the node's trio thread: ``engine.pool.spawn``), so the signal is
    SIGKILL, which also ends a stopped process (one runs no handler and no thread).
    Otherwise (started by other code, e.g. from trio's worker threads that come and
    go) it is a private real-time signal whose handler checks that the parent really
    changed, instead of a bare SIGKILL that would kill healthy slaves.
    """
    sig = int(signal.SIGKILL) if kill else _checked_death_signal()
    if not kill:
        def on_parent_gone(signum: int, frame: FrameType | None) -> None:
            if os.getppid() != parent_pid:
                os._exit(0)

        signal.signal(sig, on_parent_gone)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pipe below still works
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)  # the node died before prctl took effect
    if death_fd is not None:
        # Also covers a main thread stuck in C code, where Python signal handlers wait.
        def wait_for_eof() -> None:
            try:
                while os.read(death_fd, 64):
                    pass
            except OSError:
                pass
            os._exit(0)
        threading.Thread(target=wait_for_eof, name="parent-watch", daemon=True).start()


def _checked_death_signal() -> int:
    """The parent-death signal a handler checks: a private real-time one on Linux."""
    if sys.platform == "linux":
        return int(signal.SIGRTMIN) + 1
    return int(signal.SIGUSR1)


def apply_limits(limits: dict[str, Any]) -> None:
    """Resource limits from the manifest, applied before the app is imported."""
    cpus = limits.get("cpus")
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    for key, res, extra in (("memory_bytes", resource.RLIMIT_AS, 0),
                            ("cpu_seconds", resource.RLIMIT_CPU, 1),  # SIGXCPU, then SIGKILL 1 s later
                            ("open_files", resource.RLIMIT_NOFILE, 0)):
        value = limits.get(key)
        if value:
            _, hard = resource.getrlimit(res)
            soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
            new_hard = soft + extra if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(res, (soft, new_hard))


def load_app(entry: Path) -> dict[str, Callable[..., Any]]:
    """Import the app module; its ``@on`` decorators fill the registry."""
    entry = entry.resolve()
    sys.path.insert(0, str(entry.parent))  # the app may import its sibling modules
    spec = importlib.util.spec_from_file_location(f"engine_app_{entry.stem}", entry)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {entry}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return api.handlers()


SYNC, ASYNC, ASYNC_GEN = "sync", "async", "async-gen"


def handler_kind(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return ASYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return ASYNC
    return SYNC


def chunks_refused(fn: Callable[..., Any], kind: str) -> str | None:
    """Why ``fn`` cannot take a chunked request (None if it can): it must be async
    (reading chunks waits for them) and take them as a second argument."""
    if kind is SYNC:
        return (f"{fn.__name__} cannot read a chunked request: define it as "
                f"async def {fn.__name__}(payload, chunks)")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return None
    if len(params) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
        return (f"{fn.__name__} takes no chunks: define it as "
                f"async def {fn.__name__}(payload, chunks) to read a chunked request")
    return None


# A sync handler's result of exactly one of these types is a plain value, not a generator
# or an awaitable to run on a task: inspect's three checks cost ~0.35 µs of each job.
_PLAIN_VALUES = frozenset((type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict))


class _Task:
    """One job running on a task: its cancel scope, and the event its stream's producer
    waits on while the window is used up."""
    __slots__ = ("scope", "room")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()  # may be cancelled before the task enters it
        self.room: trio.Event | None = None


class Runtime:
    """The trio shell around :class:`WorkerSession`, which decides everything about
    jobs (validation, slots, prefetch, cancellation, credit, TERMINATE); this runs the
    handlers and moves envelopes.

    A plain sync handler runs inline, in the frame loop, and its reply is sent before
    the next envelope is looked at: no task per job (on the trio thread either way, see
    the module docstring).  Async handlers, generators and a sync handler's awaitable
    result get a task each, so they can overlap and be cancelled."""

    def __init__(self, chan: EnvelopeChannel, handlers: dict[str, Callable[..., Any]],
                 nursery: trio.Nursery, concurrency: int = 1):
        self.chan = chan
        self.handlers = {name: (fn, handler_kind(fn)) for name, fn in handlers.items()}
        self.nursery = nursery
        self.session = WorkerSession(concurrency=concurrency, events=handlers)
        self.tasks: dict[int, _Task] = {}             # jobs running on a task
        self.inputs: dict[int, InputStream] = {}      # sid -> a chunked request's chunks
        self.beat_at = time.monotonic()               # the trio task's last heartbeat

    async def heartbeat(self, interval: float) -> None:
        try:
            while True:
                self.chan.send_nowait(*self.session.heartbeat())
                self.beat_at = time.monotonic()
                await trio.sleep(interval)
        except Closed:
            return  # the node is gone: serve() sees it too

    async def serve(self) -> int:
        """Serve the node until TERMINATE or the link's end (0), or until its framing
        is lost (``EXIT_LINK_BROKEN``)."""
        receive, act = self.chan.receive, self._act
        session = self.session
        try:
            while True:
                envelopes = await receive()
                for env in envelopes:
                    if act(session.receive(env)):  # TERMINATE: answered; say so and go
                        await self.chan.flush()
                        return 0
        except Closed:
            return 0
        except CodecError as exc:
            print(f"engine.worker: the node's link carried garbage, exiting: {exc}",
                  file=sys.stderr, flush=True)
            return EXIT_LINK_BROKEN
        finally:
            session.connection_lost()

    def _act(self, actions: list[Action]) -> bool:
        """Carry out the session's actions; True if it says to exit.  A job started
        inline appends what its end brings (its reply, the next prefetched job) to
        ``actions``, which this loop then reaches: no recursion however deep the queue."""
        send = self.chan.send_nowait
        exit_now = False
        for a in actions:  # a list iterator sees items appended while it runs
            # ``type(a) is`` rather than ``match``: the first two are each job's, and an
            # isinstance per case costs more than the rest of the dispatch.
            if type(a) is Envelope:
                send(*a)
            elif type(a) is Start:
                actions += self._start(a)
            elif type(a) is CancelHandler:
                task = self.tasks.get(a.sid)
                if task is not None:
                    task.scope.cancel()
            elif type(a) is Resume:
                task = self.tasks.get(a.sid)
                if task is not None and task.room is not None:
                    task.room.set()
            elif type(a) is OpenInput:
                self.inputs[a.sid] = InputStream(self._granter(a.sid))
            elif type(a) is Feed:
                self.inputs[a.sid].feed(a.item)
            elif type(a) is EndInput:
                self.inputs[a.sid].end()
            elif type(a) is CloseInput:
                del self.inputs[a.sid]
            elif type(a) is Exit:
                exit_now = True
        return exit_now

    def _granter(self, sid: int) -> Callable[[int], None]:
        """What a chunked request's input calls as its handler takes chunks."""
        def grant(chunks: int) -> None:
            self._act(self.session.grant_input(sid, chunks))
        return grant

    def _start(self, start: Start) -> list[Action]:
        """Run one job: inline to its end (a plain sync handler), or on a task.
        Returns what its end brings if it ended here."""
        sid = start.sid
        fn, kind = self.handlers[start.event]  # the session started only known events
        chunks = self.inputs.get(sid)
        try:
            if chunks is None:
                out = fn(start.payload)  # sync: on the trio thread on purpose (module docstring)
            else:
                refused = chunks_refused(fn, kind)
                if refused:
                    raise BadMessage(refused)
                out = fn(start.payload, chunks)
        except Exception as exc:  # the caller gets type + message; the slave lives on
            return self.session.failed(sid, exc)
        if kind is SYNC and (type(out) in _PLAIN_VALUES or not (
                inspect.isgenerator(out) or inspect.isasyncgen(out) or inspect.isawaitable(out))):
            return self.session.result(sid, out)
        task = self.tasks[sid] = _Task()
        self.nursery.start_soon(self.run_job, sid, task, out)
        return []

    async def run_job(self, sid: int, task: _Task, out: Any) -> None:
        """Finish one job on its task and tell the session how it ended.  ``out`` is
        what the handler returned: a coroutine or other awaitable, an async generator,
        or a sync generator."""
        session = self.session
        ended: list[Action] = []
        try:
            with task.scope:
                try:
                    if inspect.isasyncgen(out):
                        await self._stream_async(sid, task, out)
                        ended = session.stream_ended(sid)
                    elif inspect.isgenerator(out):
                        await self._stream_sync(sid, task, out)
                        ended = session.stream_ended(sid)
                    else:
                        ended = session.result(sid, await out)
                except Exception as exc:  # the caller gets type + message; the slave lives on
                    ended = session.failed(sid, exc)
            if task.scope.cancelled_caught:  # the handler stopped at a checkpoint: acknowledge
                ended = session.cancelled(sid)
        finally:
            del self.tasks[sid]
        try:
            self._act(ended)
        except Closed:
            pass  # the node is gone: nobody to answer

    async def _stream_sync(self, sid: int, task: _Task, gen: Generator[Any, Any, Any]) -> None:
        try:
            for item in gen:
                await self._chunk(sid, task, item)  # a checkpoint per item
        finally:
            gen.close()  # cancelled: run the generator's own cleanup

    async def _stream_async(self, sid: int, task: _Task, agen: AsyncGenerator[Any, Any]) -> None:
        try:
            async for item in agen:
                await self._chunk(sid, task, item)
        finally:
            await agen.aclose()

    async def _chunk(self, sid: int, task: _Task, item: Any) -> None:
        """Send one chunk once the window allows (the node grants CREDIT as its
        consumer takes chunks), so a slow consumer bounds what is in flight."""
        session = self.session
        while session.send_window(sid) <= 0:
            task.room = trio.Event()
            await task.room.wait()
        env = session.chunk(sid, item)
        if env is not None:
            await self.chan.send(env.kind, env.sid, env.body)
        else:  # the link is gone; still a checkpoint, where the cancellation lands
            await trio.lowlevel.checkpoint()


class Watchdog:
    """Heartbeats from a thread of their own while the trio thread is busy in a job.

    Every ``interval`` it looks at when the trio task last beat; if that is an
    interval ago or more *and* a job is running, the trio thread is in a handler
    (a sync one runs inline) or behind one: the process is alive and working, so it
    writes the heartbeat itself, between two of the trio side's frames
    (:meth:`FramedStream.send_from_thread`).  With no job running it stays silent, so
    a slave whose loop is stuck with nothing to do still stops beating.  It reads the
    session's job count from another thread: one ``len`` of a dict, atomic under the
    GIL (a handler holding the GIL in C code for longer than the heartbeat-timeout
    stops this thread too, and its slave is killed as hung: it could not be stopped
    either)."""

    def __init__(self, runtime: Runtime, stream: FramedStream, interval: float) -> None:
        self.runtime = runtime
        self.stream = stream
        self.interval = interval
        self.beats = 0                                 # heartbeats it sent (tests)

    def start(self) -> None:
        self.stream.allow_thread_sends()
        threading.Thread(target=self._run, name="heartbeat-watchdog", daemon=True).start()

    def _run(self) -> None:
        runtime, interval = self.runtime, self.interval
        while True:
            time.sleep(interval)
            if time.monotonic() - runtime.beat_at >= interval and runtime.session.running:
                frame = encode_one(*runtime.session.heartbeat())
                if self.stream.send_from_thread(frame):
                    self.beats += 1


class _ToNodeLog(logging.Handler):
    """The app's ``logging`` records, one line each on stderr, which the node reads and
    logs at their level (engine/protocol/output_lines.py, ``engine.log-output``)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record_line(record.levelname, record.name, self.format(record)) + "\n")
        except Exception:   # noqa: BLE001  (logging's own rule: never raise from emit)
            self.handleError(record)


def forward_logging() -> None:
    """Records of INFO and up, from the app's loggers, to the node's log.  Installed as
    logging's *last resort* (the handler of records no configured handler took), not on
    the root logger: an app that calls ``logging.basicConfig`` still configures its
    logging (its handler's lines then reach the node as plain output)."""
    handler = _ToNodeLog()
    handler.setLevel(logging.INFO)
    logging.lastResort = handler
    logging.getLogger().setLevel(logging.INFO)


async def serve(args: argparse.Namespace) -> int:
    forward_logging()
    stream = from_fd(args.fd)
    chan = EnvelopeChannel(stream)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(chan.run_writer)
            try:
                apply_limits(json.loads(args.limits) if args.limits else {})
                handlers = load_app(Path(args.entry))
            except BaseException as exc:  # noqa: BLE001  SystemExit in app code too
                traceback.print_exc()
                chan.send_nowait(Kind.ERROR, 0, error_to_body(exc))
                await chan.flush()
                nursery.cancel_scope.cancel()  # stops the writer task
                return EXIT_STARTUP_FAILED
            runtime = Runtime(chan, handlers, nursery, args.concurrency)
            chan.send_nowait(*runtime.session.hello(pid=os.getpid(), app=args.app))
            calls.bind_runtime(nursery)  # acall/astream: their client runs in this nursery
            nursery.start_soon(runtime.heartbeat, args.heartbeat)
            Watchdog(runtime, stream, args.heartbeat).start()
            code = await runtime.serve()
            nursery.cancel_scope.cancel()
        return code
    finally:
        chan.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.worker", description=__doc__.split("\n")[0])
    p.add_argument("--app", required=True)
    p.add_argument("--entry", required=True)
    p.add_argument("--fd", type=int, required=True, help="inherited socketpair end to the node")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--death-fd", type=int, default=None)
    p.add_argument("--kill-with-parent", action="store_true",
                   help="the parent forked this from a thread that lives as long as it does: "
                        "its death SIGKILLs this process (see watch_parent)")
    p.add_argument("--limits", default="", help="JSON: cpus, memory_bytes, cpu_seconds, open_files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    watch_parent(args.parent_pid, args.death_fd, kill=args.kill_with_parent)
    return trio.run(serve, args)


if __name__ == "__main__":
    sys.exit(main())
