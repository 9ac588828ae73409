"""Shared test support.

- :func:`wait_until` (and :func:`wait_until_sync` for plain threads and psutil): the one
  way a test waits for a state it cannot be told about by an event.  A test that can
  await an event, a channel or a nursery should do that instead; polling is for state
  that lives elsewhere (another process, a counter in a server, a file).
- The e2e rule's mechanism (:func:`processes_and_sockets_forbidden`,
  :func:`end_leftover_processes`); tests/conftest.py says the rule and applies it.
- Free loopback ports.
- A real node subprocess (``python -m engine run``) for end-to-end tests: started on a
  port the node picks (read back from its log), driven through the CLI, and ended by the
  test with every process it started.
"""
from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Awaitable, Callable, Iterator, NoReturn, TypeVar

import psutil
import pynng
import pytest
import trio

T = TypeVar("T")

ADDRESS_RE = re.compile(r"control endpoint on ((?:tls\+)?tcp://127\.0\.0\.1:\d+)")


def _timed_out(what: str, timeout: float, value: object) -> AssertionError:
    # The last value says *how far* it got when the predicate returns more than a bool.
    last = "" if value is None or isinstance(value, bool) else f" (last value: {value!r})"
    return AssertionError(f"timed out after {timeout} s waiting until {what}{last}")


async def wait_until(predicate: Callable[[], T | Awaitable[T]], what: str, *,
                     timeout: float = 10.0, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``predicate`` may be a plain function or an async one (``await client.info(...)``);
    ``what`` completes the sentence "timed out after N s waiting until ...", the
    AssertionError raised when ``timeout`` passes first.

    Both the polling and the timeout are on trio's clock, so under
    ``MockClock(autojump_threshold=0)`` (the ``autojump_clock`` fixture) a wait costs no
    real time and its timeout is virtual; on the real clock each poll is ``interval``.
    """
    last = None
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
            await trio.sleep(interval)
    raise _timed_out(what, timeout, last)


def wait_until_sync(predicate: Callable[[], T], what: str, *,
                    timeout: float = 10.0, interval: float = 0.05) -> T:
    """:func:`wait_until` for code outside trio (a thread, a fixture's teardown, psutil)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)


class NodeProcess:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc = proc
        self.log = log
        self.address: str | None = None

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 30) -> str:
        def serving() -> str | None:
            text = self.stderr
            match = ADDRESS_RE.search(text)
            if match and "serving" in text:
                return match.group(1)
            assert self.proc.poll() is None, f"node exited early:\n{text}"
            return None

        self.address = await wait_until(serving, "the node logs its control endpoint and serves",
                                        timeout=timeout, interval=0.05)
        return self.address

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    async def wait_exit(self, timeout: float) -> int:
        await wait_until(lambda: self.proc.poll() is not None, "the node process exits",
                         timeout=timeout, interval=0.05)
        return self.proc.returncode

    async def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        with trio.fail_after(timeout + 10):
            return await trio.run_process(
                [sys.executable, "-m", "engine", *args, "--node", self.address,
                 "--timeout", str(timeout)],
                capture_stdout=True, capture_stderr=True, check=False)


async def start_node_process(paths, log: Path, cwd: Path, *extra: str) -> NodeProcess:
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "run", *map(str, paths),
             "--control", "tcp://127.0.0.1:0", *extra],
            stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
    node = NodeProcess(proc, log)
    try:
        await node.wait_ready()
    except BaseException:
        stop_node(node)
        raise
    return node


def stop_node(node: NodeProcess) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL; whatever it left behind is killed too, and returned (a
    node that shut down properly leaves nothing)."""
    leftovers = node.descendants()
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(20)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait(10)
    alive = psutil.wait_procs(leftovers, timeout=10)[1]
    for p in alive:
        p.kill()
    return alive


def write_app(where: Path, code: str, engine: dict | None = None, *,
              drivers: dict | None = None, name: str = "worker") -> Path:
    """An app folder ``where/name`` (the app's name: the folder's) with ``app.py`` and a
    manifest of these engine options and drivers; returns the folder."""
    import json

    folder = where / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(code)
    (folder / "manifest.json").write_text(json.dumps(
        {"type": "python", "args": "app.py", "engine": engine or {}, "drivers": drivers or {}}))
    return folder


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slave_pids(node: NodeProcess) -> set[int]:
    return {p.pid for p in node.descendants() if "engine.worker --app" in " ".join(_cmdline(p))}


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


# -- the e2e rule (tests/conftest.py applies it to every test) --------------------------------

class E2EOnly(RuntimeError):
    """Raised by a process- or socket-starting call inside a test not marked e2e."""


_SOCKET_CALLS = ("bind", "connect", "connect_ex", "sendto", "sendmsg")
_PROCESS_CALLS = ("fork", "forkpty", "posix_spawn", "posix_spawnp")
# The standard library's own probes (``ldconfig -p``, ``file -b``) that libraries run when
# first imported (trio: ctypes.util.find_library; croniter: platform.architecture): a
# lazy import inside a test is not the test starting a process.
_PLATFORM_PROBES = frozenset({"platform", "ctypes.util"})


def _called_from(modules: frozenset[str]) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") in modules:
            return True
        frame = frame.f_back
    return False


@contextmanager
def processes_and_sockets_forbidden(who: str) -> Iterator[list[str]]:
    """Within the block, starting a process or giving a socket an address raises
    :class:`E2EOnly`; the list yielded collects each such attempt (so a caller can fail
    even when the code under test swallowed the error).  ``socketpair()``, nng's
    ``inproc://`` and the standard library's platform probes stay allowed.  Patches Python-level entry points only: cheap, and
    undone on exit."""
    violations: list[str] = []

    def refuse(what: str) -> NoReturn:
        violations.append(what)
        raise E2EOnly(f"{who} {what}, so it needs @pytest.mark.e2e (the rule: tests/conftest.py)")

    def socket_call(name: str) -> Callable[..., NoReturn]:
        def guarded(self: socket.socket, *args: object, **kwargs: object) -> NoReturn:
            refuse(f"called socket.{name}{args!r}")
        return guarded

    listen, dial = pynng.Socket.listen, pynng.Socket._dial   # dial() goes through _dial()

    def nng_listen(self: pynng.Socket, address: str, *args: object, **kwargs: object) -> object:
        if not str(address).startswith("inproc://"):
            refuse(f"listened on {address} (nng)")
        return listen(self, address, *args, **kwargs)

    def nng_dial(self: pynng.Socket, address: str, *args: object, **kwargs: object) -> object:
        if not str(address).startswith("inproc://"):
            refuse(f"dialled {address} (nng)")
        return dial(self, address, *args, **kwargs)

    execute = subprocess.Popen._execute_child

    def execute_child(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> object:
        if _called_from(_PLATFORM_PROBES):
            return execute(self, args, *rest, **kwargs)
        refuse(f"started a process {args!r}")

    def process_call(name: str) -> Callable[..., NoReturn]:
        def guarded(*args: object, **kwargs: object) -> NoReturn:
            refuse(f"called os.{name}")
        return guarded

    with pytest.MonkeyPatch.context() as mp:
        for name in _SOCKET_CALLS:
            mp.setattr(socket.socket, name, socket_call(name))
        mp.setattr(pynng.Socket, "listen", nng_listen)
        mp.setattr(pynng.Socket, "_dial", nng_dial)
        mp.setattr(subprocess.Popen, "_execute_child", execute_child)
        for name in _PROCESS_CALLS:
            mp.setattr(os, name, process_call(name))
        yield violations


def descendant_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def end_leftover_processes(before: set[int], *, grace: float = 5.0) -> list[str]:
    """Processes descended from this one that were not in ``before`` and still run after
    ``grace`` seconds are killed; returns them described (empty: nothing was left)."""
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    if not any(map(_running, new)):
        return []
    try:
        wait_until_sync(lambda: not any(map(_running, new)), "the processes the test started end",
                        timeout=grace)
        return []
    except AssertionError:
        alive = [p for p in new if _running(p)]
        described = [_describe(p) for p in alive]
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return described


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE   # a zombie has ended; its parent reaps it
    except psutil.NoSuchProcess:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.Error:
        return str(p.pid)
