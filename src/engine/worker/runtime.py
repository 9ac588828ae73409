"""The slave runtime: ``python -m engine.worker --app NAME --entry PATH --fd N``.

One slave process hosts one app module and serves INVOKEs from its node over the
inherited end ``N`` of a Unix socketpair (docs/protocol.md).  Lifetime rules:

- It dies with its node: ``PR_SET_PDEATHSIG`` (SIGKILL) plus a thread blocked on
  the read end of a pipe whose write end only the node holds (EOF = node gone),
  which also covers the race where the node died before ``prctl`` ran.
- Heartbeats come from a trio task, and **sync handlers run on the trio thread on
  purpose**: a sync handler stuck in ``while True: pass`` (or an async one that never
  awaits) stops the heartbeats, so the node sees the hang and kills the slave.  A
  worker thread would keep heartbeats flowing and hide the hang.  The price: one sync
  handler call (or one step of a sync generator) must finish within the
  heartbeat-timeout, and blocks the slave's other jobs while it runs.
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
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import inspect
import json
import os
import resource
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

import trio

from transport.channel import EnvelopeChannel
from transport.codec import Kind
from transport.errors import BadMessage, Closed, UnknownEvent, error_to_body
from transport.inbound import InputStream, SendWindow
from transport.streams import from_fd

from engine import api
from engine.client import calls
from engine.errors import JobCancelled, ShuttingDown
from engine.protocol.node_session import PROTOCOL_VERSION, STREAM_WINDOW

PR_SET_PDEATHSIG = 1
EXIT_STARTUP_FAILED = 3


def watch_parent(parent_pid: int, death_fd: int | None) -> None:
    """Exit when the node dies, even if it was SIGKILLed.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked us exits, and trio
    spawns processes from worker threads that come and go; so the death signal is
    a private real-time signal whose handler checks that the parent really
    changed, instead of a bare SIGKILL that would kill healthy slaves.
    """
    sig = getattr(signal, "SIGRTMIN", signal.SIGUSR1) + 1 if hasattr(signal, "SIGRTMIN") \
        else signal.SIGUSR1

    def on_parent_gone(signum, frame) -> None:
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


def apply_limits(limits: dict) -> None:
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


def load_app(entry: Path) -> dict:
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


class _Running:
    """One job running on a task: its cancel scope and its stream's send window."""
    __slots__ = ("scope", "window")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()  # may be cancelled before the task enters it
        self.window = SendWindow(STREAM_WINDOW)  # chunks it may send beyond the CREDIT


SYNC, ASYNC, ASYNC_GEN = "sync", "async", "async-gen"


def handler_kind(fn) -> str:
    if inspect.isasyncgenfunction(fn):
        return ASYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return ASYNC
    return SYNC


def chunks_refused(fn, kind: str) -> str | None:
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


class Runtime:
    """Serves INVOKEs.  At most ``concurrency`` jobs run at once; INVOKEs beyond that
    (the node's ``prefetch``) wait here in arrival order and start as slots free.

    A plain sync handler runs inline, in the frame loop, and its reply is sent before
    the next envelope is looked at: no task per job (on the trio thread either way, see
    the module docstring).  Async handlers, generators and a sync handler's awaitable
    result get a task each, so they can overlap and be cancelled."""

    def __init__(self, chan: EnvelopeChannel, handlers: dict, nursery: trio.Nursery,
                 concurrency: int = 1):
        self.chan = chan
        self.handlers = {name: (fn, handler_kind(fn)) for name, fn in handlers.items()}
        self.nursery = nursery
        self.concurrency = max(1, concurrency)
        self.jobs: dict[int, _Running] = {}          # running on a task
        self.waiting: dict[int, tuple[str, Any]] = {}  # sid -> (event, payload), FIFO
        self.inputs: dict[int, InputStream] = {}     # sid -> a chunked request's chunks
        self.stopping = False

    @property
    def running(self) -> int:
        return len(self.jobs)

    async def heartbeat(self, interval: float) -> None:
        while True:
            self.chan.send_nowait(Kind.HEARTBEAT, 0, {"jobs": self.running})
            await trio.sleep(interval)

    async def serve(self) -> None:
        try:
            await self._serve()
        finally:
            self.stopping = True

    async def _serve(self) -> None:
        send = self.chan.send_nowait
        while True:
            try:
                envelopes = await self.chan.receive()
            except Closed:
                return
            for kind, sid, body in envelopes:
                if kind == Kind.INVOKE:
                    if type(body) is list and 2 <= len(body) <= 3 and type(body[0]) is str \
                            and sid not in self.jobs and sid not in self.waiting:
                        if len(body) == 3 and body[2] is True:  # its CHUNKs follow
                            self.inputs[sid] = InputStream(self._granter(sid))
                        if self.waiting or len(self.jobs) >= self.concurrency:
                            self.waiting[sid] = (body[0], body[1])  # prefetched: wait for a slot
                        else:
                            self.start(sid, body[0], body[1])
                    else:
                        send(Kind.ERROR, sid, error_to_body(BadMessage(
                            f"INVOKE body must be [event, payload(, chunked)], got {body!r:.80}")))
                elif kind == Kind.CHUNK or kind == Kind.CHOKE:  # a chunked request's
                    chunks = self.inputs.get(sid)
                    if chunks is not None:
                        if kind == Kind.CHUNK:
                            chunks.feed(body)
                        else:
                            chunks.end()
                elif kind == Kind.CANCEL:
                    job = self.jobs.get(sid)
                    if job is not None:
                        job.scope.cancel()
                    elif self.waiting.pop(sid, None) is not None:  # prefetched, never started
                        self.inputs.pop(sid, None)
                        send(Kind.ERROR, sid, error_to_body(
                            JobCancelled("cancelled by the node before it started")))
                    # else it has finished: its reply is on its way
                elif kind == Kind.CREDIT:
                    job = self.jobs.get(sid)
                    if job is not None:
                        job.window.credit(body)  # ignores anything but a positive int
                elif kind == Kind.TERMINATE:
                    self.stopping = True
                    for sid in list(self.waiting):  # prefetched jobs: answered, not dropped
                        del self.waiting[sid]
                        send(Kind.ERROR, sid, error_to_body(
                            ShuttingDown("the slave is exiting; the job never started")))
                    send(Kind.TERMINATE, 0, None)
                    await self.chan.flush()
                    return

    def _granter(self, sid: int):
        send = self.chan.send_nowait
        return lambda n: send(Kind.CREDIT, sid, n)

    def start(self, sid: int, event: str, payload: Any) -> None:
        """Run one job: inline to its end (a plain sync handler), or on a task."""
        send = self.chan.send_nowait
        chunks = self.inputs.get(sid)
        entry = self.handlers.get(event)
        if entry is None:
            self.inputs.pop(sid, None)
            send(Kind.ERROR, sid, error_to_body(UnknownEvent(
                f"no handler for event {event!r}; the app handles {sorted(self.handlers)}")))
            return
        fn, kind = entry
        try:
            if chunks is None:
                out = fn(payload)  # sync: on the trio thread on purpose (module docstring)
            else:
                refused = chunks_refused(fn, kind)
                if refused:
                    raise BadMessage(refused)
                out = fn(payload, chunks)
        except Exception as exc:  # the caller gets type + message; the slave lives on
            self.inputs.pop(sid, None)
            send(Kind.ERROR, sid, error_to_body(exc))
            return
        if kind is SYNC and not (inspect.isgenerator(out) or inspect.isasyncgen(out)
                                 or inspect.isawaitable(out)):
            send(Kind.RESULT, sid, out)
            return
        job = self.jobs[sid] = _Running()
        self.nursery.start_soon(self.run_job, sid, job, out)

    def _start_waiting(self) -> None:
        waiting = self.waiting
        while waiting and len(self.jobs) < self.concurrency and not self.stopping:
            sid = next(iter(waiting))
            event, payload = waiting.pop(sid)
            self.start(sid, event, payload)

    async def run_job(self, sid: int, job: _Running, out: Any) -> None:
        """Finish one job on its task; exactly one of RESULT / CHOKE / ERROR ends its sid.
        ``out`` is what the handler returned: a coroutine or other awaitable, an async
        generator, or a sync generator."""
        send = self.chan.send_nowait
        try:
            with job.scope:
                try:
                    if inspect.isasyncgen(out):
                        await self._stream_async(sid, job, out)
                    elif inspect.isgenerator(out):
                        await self._stream_sync(sid, job, out)
                    else:
                        send(Kind.RESULT, sid, await out)
                except Exception as exc:  # the caller gets type + message; the slave lives on
                    send(Kind.ERROR, sid, error_to_body(exc))
            if job.scope.cancelled_caught:  # the handler stopped at a checkpoint: acknowledge
                send(Kind.ERROR, sid, error_to_body(JobCancelled("cancelled by the node")))
        finally:
            del self.jobs[sid]
            if self.inputs:
                self.inputs.pop(sid, None)
            if self.waiting:
                self._start_waiting()

    async def _stream_sync(self, sid: int, job: _Running, gen) -> None:
        try:
            for item in gen:
                await self._chunk(sid, job, item)  # a checkpoint per item
        finally:
            gen.close()  # cancelled: run the generator's own cleanup
        self.chan.send_nowait(Kind.CHOKE, sid, None)

    async def _stream_async(self, sid: int, job: _Running, agen) -> None:
        try:
            async for item in agen:
                await self._chunk(sid, job, item)
        finally:
            await agen.aclose()
        self.chan.send_nowait(Kind.CHOKE, sid, None)

    async def _chunk(self, sid: int, job: _Running, item: Any) -> None:
        """Send one chunk once the window allows (the node grants CREDIT as its
        consumer takes chunks), so a slow consumer bounds what is in flight."""
        await job.window.wait()
        job.window.left -= 1
        await self.chan.send(Kind.CHUNK, sid, item)


async def serve(args: argparse.Namespace) -> int:
    chan = EnvelopeChannel(from_fd(args.fd))
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
            chan.send_nowait(Kind.HANDSHAKE, 0, {
                "version": PROTOCOL_VERSION, "pid": os.getpid(), "app": args.app,
                "concurrency": args.concurrency, "events": sorted(handlers),
                "window": STREAM_WINDOW,
            })
            runtime = Runtime(chan, handlers, nursery, args.concurrency)
            calls.bind_runtime(nursery)  # acall/astream: their client runs in this nursery
            nursery.start_soon(runtime.heartbeat, args.heartbeat)
            await runtime.serve()
            nursery.cancel_scope.cancel()
        return 0
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
    p.add_argument("--limits", default="", help="JSON: cpus, memory_bytes, cpu_seconds, open_files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    watch_parent(args.parent_pid, args.death_fd)
    return trio.run(serve, args)


if __name__ == "__main__":
    sys.exit(main())
