"""A node killed, or stopped with a stopped slave, leaves no process behind (issue 12, item 7).

A real node (``python -m engine run``) serves the echo example to a few callers in a
loop; its family (the node's descendants: the zygote, if any, and the slaves) is
collected before the node goes, and must be gone within a bounded wait after it.  Both
ways of starting slaves are covered: ``zygote`` (the zygote is the slaves' parent and
watches the node) and ``exec`` (the node is their parent).  A SIGSTOPped slave is the
hard case: a stopped process runs no signal handler and no thread, so it never notices
its parent's death by itself (only SIGKILL ends it, and SIGCONT wakes it).
"""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
import pytest
import trio

from engine.client import connect
from support import NodeProcess, slave_pids, wait_until
from transport.errors import TransportError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ECHO = ROOT / "examples" / "echo"
SLAVES = 3
CALL_TIMEOUT = 3.0


@pytest.fixture(params=["zygote", "exec"])
def spawn(request) -> str:
    return request.param


def _apps(tmp_path: Path, spawn: str, termination_timeout: float) -> Path:
    apps = tmp_path / "apps"
    shutil.copytree(ECHO, apps / "echo", ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((apps / "echo" / "manifest.json").read_text())
    # heartbeat-timeout: long, so the node itself never kills the stopped slave as hung
    # (what is tested is the death and the stop paths, not hang detection).
    manifest["engine"].update({"spawn": spawn, "pool-limit": SLAVES,
                               "termination-timeout": termination_timeout,
                               "heartbeat-timeout": 60})
    (apps / "echo" / "manifest.json").write_text(json.dumps(manifest))
    return apps


class Load:
    """Callers in a loop until the node goes.  Every call they made ends, with its
    answer or a typed error: a call in flight when the node dies cannot be answered,
    but its caller must hear so (``Unreachable``), not wait for ever.  (A call started
    after the client saw the link go waits for a reconnect, up to its timeout: so a
    short one.)"""

    def __init__(self) -> None:
        self.answered = 0
        self.errors: list[TransportError] = []

    async def caller(self, c: Any) -> None:
        while True:
            try:
                assert await c.call("echo", "sleep", 0.02, timeout=CALL_TIMEOUT) == {"slept": 0.02}
            except TransportError as exc:
                self.errors.append(exc)
                return
            self.answered += 1


async def _under_load(node: NodeProcess, body: Callable[[], Awaitable[None]]) -> Load:
    """Run ``body()`` while SLAVES + 1 callers keep the node's slaves busy; returns
    once every caller has ended (at the node's end, each with an error)."""
    load = Load()
    with trio.fail_after(40):
        async with connect(node.address, timeout=20) as c:
            async with trio.open_nursery() as nursery:
                for _ in range(SLAVES + 1):
                    nursery.start_soon(load.caller, c)
                await wait_until(lambda: len(slave_pids(node)) >= 2 and load.answered >= 10,
                                 "the pool grew under the load", timeout=30, interval=0.05)
                await body()
    return load


def _stop_one_slave(node: NodeProcess) -> int:
    pid = min(slave_pids(node))
    psutil.Process(pid).suspend()  # SIGSTOP
    return pid


def _not_forked_by_the_main_thread(node: NodeProcess) -> list[int]:
    """The node's children that a thread other than its main (trio) one forked.  The
    kernel's parent-death signal fires when the *thread* that forked a child exits, so
    a child that asks for SIGKILL (slaves and the zygote do) must come from the thread
    that lives as long as the node: one forked by trio's worker threads, which exit
    after 10 idle seconds, would be killed then, healthy."""
    pid = node.proc.pid
    try:
        mains = set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: nothing to say
        return []
    return [p.pid for p in psutil.Process(pid).children() if p.pid not in mains]


def _outliving(family: list[psutil.Process], timeout: float) -> list[str]:
    """Wait up to ``timeout`` for ``family`` to end; kill what is left (the test ends
    every process it started) and describe it."""
    left = []
    for p in psutil.wait_procs(family, timeout=timeout)[1]:
        try:
            left.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:100]}")
            p.kill()
        except psutil.Error:
            pass
    return left


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "one-stopped"])
async def test_a_sigkilled_node_under_load_leaves_no_process(tmp_path, start_node, spawn, stopped):
    node = await start_node(_apps(tmp_path, spawn, termination_timeout=1))
    family: list[psutil.Process] = []

    async def kill_the_node() -> None:
        if stopped:
            _stop_one_slave(node)
        family.extend(node.descendants())
        assert len(slave_pids(node)) >= 2
        assert not _not_forked_by_the_main_thread(node)
        node.proc.kill()
        assert await node.wait_exit(10) == -signal.SIGKILL

    try:
        load = await _under_load(node, kill_the_node)
    finally:
        left = _outliving(family, timeout=10)
    assert not left, f"outlived the SIGKILLed node: {left}"
    assert len(load.errors) == SLAVES + 1  # every caller heard of the node's end


async def test_sigterm_with_a_stopped_slave_holding_a_job_stops_the_node(tmp_path, start_node, spawn):
    termination_timeout = 1.0
    node = await start_node(_apps(tmp_path, spawn, termination_timeout))
    family: list[psutil.Process] = []

    async def terminate_the_node() -> None:
        _stop_one_slave(node)  # busy, as all are under this load: its job never ends
        family.extend(node.descendants())
        node.proc.send_signal(signal.SIGTERM)
        # The drain waits termination-timeout for that job, then kills its slave.
        assert await node.wait_exit(termination_timeout + 10) == 0

    try:
        load = await _under_load(node, terminate_the_node)
    finally:
        left = _outliving(family, timeout=5)
    assert not left, f"outlived the node's shutdown: {left}"
    assert len(load.errors) == SLAVES + 1  # (the stopped slave's job: ShuttingDown)


async def test_sigterm_with_a_stopped_idle_slave_does_not_wait_for_it(tmp_path, start_node, spawn):
    # A stopped slave hears neither TERMINATE nor SIGTERM (pending while it is
    # stopped): without a SIGCONT, its stop would wait termination-timeout and then
    # SIGTERM's 2 s for nothing.  Woken, it hears TERMINATE at once.
    termination_timeout = 10.0
    node = await start_node(_apps(tmp_path, spawn, termination_timeout))
    with trio.fail_after(40):
        async with connect(node.address, timeout=20) as c:
            async with trio.open_nursery() as nursery:  # a few slaves, then idle
                for _ in range(SLAVES):
                    nursery.start_soon(c.call, "echo", "sleep", 0.3)
            await wait_until(lambda: len(slave_pids(node)) >= 2, "the pool has grown")
            _stop_one_slave(node)
            family = node.descendants()
            node.proc.send_signal(signal.SIGTERM)
            try:
                assert await node.wait_exit(termination_timeout / 2) == 0
            finally:
                left = _outliving(family, timeout=5)
    assert not left, f"outlived the node's shutdown: {left}"
