"""Shared test support: free loopback ports, and a real node subprocess (`python -m
engine run`) for end-to-end tests: started on a port the node picks (read back from its
log), driven through the CLI, and ended by the test with every process it started."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import trio

ADDRESS_RE = re.compile(r"control endpoint on (tcp://127\.0\.0\.1:\d+)")


class NodeProcess:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc = proc
        self.log = log
        self.address: str | None = None

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 30) -> str:
        with trio.fail_after(timeout):
            while True:
                text = self.stderr
                match = ADDRESS_RE.search(text)
                if match and "serving" in text:
                    self.address = match.group(1)
                    return self.address
                assert self.proc.poll() is None, f"node exited early:\n{text}"
                await trio.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    async def wait_exit(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.05)
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


