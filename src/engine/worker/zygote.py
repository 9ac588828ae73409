"""The zygote: a template process that forks slaves with the engine already imported.

A fresh ``python -m engine.worker`` spends about a quarter of a second of CPU
importing trio and the engine before it can say hello, and a burst that grows a
pool to eight slaves on two cores pays that eight times over.  A node therefore
starts one zygote (``python -m engine.worker.zygote``; a slave pool run on its own starts
its own) that imports :mod:`engine.worker` once and then forks a slave per request,
for any of its apps: the child only imports its app.  No app is ever imported into
the zygote, so slaves share nothing an app made (connections, threads, random state).

The node talks to its zygote over a ``SOCK_SEQPACKET`` socketpair, one msgpack map
per message:

- node -> zygote ``{"op": "spawn", "id", "argv", "env"}`` (``env``: the slave's whole
  environment) with two descriptors (the slave's end of its link, the write end of
  its output pipe); the zygote answers ``{"op": "spawned", "id", "pid"}`` or ``{"op": "failed", "id", "error"}``;
- node -> zygote ``{"op": "kill", "pid", "sig"}``: signal that slave's process
  group, only while it is the zygote's unreaped child (so never a recycled pid);
- zygote -> node ``{"op": "exit", "pid", "code"}`` when it has reaped a slave
  (``code`` as ``subprocess`` gives it: negative for a signal).

The zygote exits when the node closes the socket or dies (the node-death pipe, and
``PR_SET_PDEATHSIG`` through :func:`engine.worker.runtime.watch_parent`: SIGKILL, as
the node starts it from its trio thread, ``engine.pool.spawn``), and SIGKILLs the
process group of every slave it has not reaped as it goes.  Its slaves watch the same
pipe, and ask for SIGKILL when the zygote dies (it forks from its only thread, so
that is its death, not a thread's): none outlives the node, not even a SIGSTOPped
one, which sees no pipe and runs no handler.  The node side is
:class:`engine.pool.zygote_client.Zygote`.
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import traceback
from typing import NoReturn

import msgpack

from engine.worker import runtime as worker  # the point: trio, msgpack and the engine, imported once
from engine.worker.zygote_wire import MAX_MESSAGE

import setproctitle  # a dependency (pyproject): forked slaves name themselves in ps/top


def serve(control: socket.socket, death_fd: int | None) -> NoReturn:
    """Fork slaves as the node asks, reap them and report, until the node is gone."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    children: set[int] = set()
    poller = select.poll()
    for fd in (control.fileno(), wake_r) + ((death_fd,) if death_fd is not None else ()):
        poller.register(fd, select.POLLIN)
    _send(control, {"op": "ready", "pid": os.getpid()}, children)
    while True:
        for fd, _ in poller.poll():
            if fd == death_fd:
                _end(children)  # the node died
            if fd == wake_r:
                os.read(wake_r, 4096)
                _reap(control, children)
            elif fd == control.fileno():
                try:
                    data, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 2)
                except InterruptedError:
                    continue
                if not data:
                    _end(children)  # the node closed its end: the pool is gone
                try:
                    request = msgpack.unpackb(data)
                    op = request["op"]
                    if op == "spawn":
                        _spawn(control, request, fds, children, (wake_r, wake_w))
                    elif op == "kill" and request["pid"] in children:
                        os.killpg(request["pid"], request["sig"])
                except (ProcessLookupError, PermissionError):
                    pass  # that slave is already gone
                except Exception:  # noqa: BLE001 - a bad request (the node times it out)
                    traceback.print_exc()
                for fd_ in fds:
                    _close(fd_)


def _spawn(control: socket.socket, request: dict, fds: list[int], children: set[int],
           keep_out: tuple[int, ...]) -> None:
    """Fork a slave; ``keep_out``: the zygote's own descriptors it must not keep."""
    if len(fds) != 2:
        _send(control, {"op": "failed", "id": request["id"], "error": "expected 2 descriptors"},
              children)
        return
    link_fd, out_fd = fds
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        _send(control, {"op": "failed", "id": request["id"], "error": f"fork: {exc}"}, children)
        return
    if pid == 0:
        _become_slave(control, request, link_fd, out_fd, keep_out)  # never returns
    children.add(pid)
    _send(control, {"op": "spawned", "id": request["id"], "pid": pid}, children)


def _become_slave(control: socket.socket, request: dict, link_fd: int, out_fd: int,
                  keep_out: tuple[int, ...]) -> None:
    code = 1
    try:
        os.setsid()  # its own process group, which the node signals as a whole
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a plain start has it
        control.close()
        for fd in keep_out:
            _close(fd)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        # --kill-with-parent: forked from the zygote's only thread, so the kernel's
        # parent-death signal means the zygote's death and may be SIGKILL.
        argv = [*request["argv"], "--fd", str(link_fd), "--kill-with-parent"]
        sys.argv = ["engine.worker", *argv]
        # First: setproctitle finds the room for the title by the environment's memory.
        _retitle(f"{sys.executable} -m engine.worker {' '.join(argv)}")
        os.environ.clear()
        os.environ.update(request["env"])
        code = worker.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the crashlog gets the traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code or 0)


def _retitle(title: str) -> None:
    """Show as a slave in ps/top (and to tools that look for ``engine.worker``),
    not as the zygote whose command line the fork inherited."""
    setproctitle.setproctitle(title)


def _reap(control: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(control, {"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)},
              children)


def _send(control: socket.socket, message: dict, children: set[int]) -> None:
    try:
        control.send(msgpack.packb(message))
    except OSError:
        _end(children)  # the node is gone


def _end(children: set[int]) -> NoReturn:
    """Exit, and SIGKILL the process group of every slave not reaped yet: its node is
    gone or done with it.  SIGKILL, because it ends a stopped slave too (one stopped
    runs no handler and sees no pipe close); its group, so what the slave started
    goes with it.  (Normally there are none: the node ends its slaves first.)"""
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # gone already (a zombie's group is empty)
    os._exit(0)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.worker.zygote", description=__doc__.split("\n")[0])
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=0)
    p.add_argument("--death-fd", type=int, default=None)
    p.add_argument("--kill-with-parent", action="store_true",
                   help="the node started this from its trio thread: its death SIGKILLs us")
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when we stop
    # The death fd is polled below, no thread.
    worker.watch_parent(args.parent_pid, None, kill=args.kill_with_parent)
    control = socket.socket(fileno=args.control_fd)
    serve(control, args.death_fd)


if __name__ == "__main__":
    sys.exit(main())
