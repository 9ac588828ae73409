"""Child processes started from the thread that runs trio, so they can die with it.

Linux's ``PR_SET_PDEATHSIG`` (a child's "send me this signal when my parent dies")
fires when the *thread* that forked the child exits, not its process.
``trio.lowlevel.open_process`` forks from one of trio's cached worker threads, which
exit after 10 idle seconds: a child started that way that asks for SIGKILL is killed
then, healthy (measured: exactly 10.0 s).  So slaves asked for a catchable signal and
checked in its handler that the parent had really gone; but a SIGSTOPped process runs
no handler and no thread, and such a slave outlived a SIGKILLed node as a stopped
orphan for good (issue 12).

:func:`start_child` forks from the calling thread, the one that runs trio: it lives
as long as anything the pool runs, so its children (the zygote, slaves started the
plain way) can ask the kernel for SIGKILL when their parent dies
(``--kill-with-parent``, :func:`engine.worker.runtime.watch_parent`).  SIGKILL ends a
stopped process too, and needs nothing of the child.  The price: the fork blocks the
loop while it runs, which CPython makes a ``vfork`` + ``exec`` when it can (no
``preexec_fn``, no uid or gid change, as here): about a millisecond, whatever the
node's size.  Waiting for the exit is a pidfd the loop watches, as trio's own.
"""
from __future__ import annotations

import os
import subprocess
from typing import Sequence

import trio

# What a child started here passes to ``engine.worker`` / ``engine.worker.zygote``.
KILL_WITH_PARENT = "--kill-with-parent"


class ChildProcess:
    """A child started by :func:`start_child`: what its pool uses of a ``trio.Process``
    (``pid``, ``returncode``, ``wait()``, ``kill()``, ``stdout``)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout: trio.lowlevel.FdStream | None) -> None:
        self.pid = popen.pid
        self.stdout = stdout
        self._popen = popen
        self._wait_lock = trio.Lock()  # one waiter on the pidfd at a time (trio's rule)
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        """As ``subprocess`` gives it: negative for a signal; None while it runs."""
        return self._popen.returncode

    async def wait(self) -> int:
        """Its exit status, once it has exited (and been reaped)."""
        async with self._wait_lock:
            if self._popen.returncode is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    while self._popen.poll() is None:
                        await trio.sleep(0.05)
                self._popen.wait()  # it has exited: this reaps it at once
            self._close_pidfd()
        code = self._popen.returncode
        assert code is not None, "reaped"
        return code

    def kill(self) -> None:
        """SIGKILL the process alone, only while it is unreaped (never a recycled pid)."""
        self._popen.kill()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def start_child(argv: Sequence[str], *, env: dict[str, str], pass_fds: Sequence[int] = (),
                capture_output: bool = False, stdio_fd: int | None = None,
                cwd: str | os.PathLike[str] | None = None) -> ChildProcess:
    """Start ``argv`` in a session of its own (no ^C from the tty; its group is
    signalled as a whole), stdin from /dev/null, ``pass_fds`` inherited.
    ``capture_output``: stdout and stderr into one pipe, read as ``stdout``; else
    they are this process's.  ``stdio_fd``: the child's stdin and stdout instead (a
    slave that speaks its protocol there), and ``capture_output`` takes its stderr
    alone.  Raises OSError if it cannot be started."""
    out_r = out_w = None
    if capture_output:
        out_r, out_w = os.pipe()
    stdin: int = subprocess.DEVNULL if stdio_fd is None else stdio_fd
    stdout = out_w if stdio_fd is None else stdio_fd
    try:
        popen = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=out_w,
                                 env=env, pass_fds=tuple(pass_fds), start_new_session=True,
                                 cwd=cwd)
    except BaseException:
        if out_r is not None:
            os.close(out_r)
        raise
    finally:
        if out_w is not None:
            os.close(out_w)  # the child has its copy: EOF on out_r means it and its children are done
    return ChildProcess(popen, trio.lowlevel.FdStream(out_r) if out_r is not None else None)
