"""What every measurement family shares: settings, result rows, request-response
timing, and child processes that are always ended.

A *row* compares one figure of ours with its baseline measured in the same run and
says whether the issue's target is met.  Rows without a target (a baseline's own
figure, an informational one) have verdict ``-``; a column whose code is not there
yet is a row with verdict ``SKIP`` and the reason in ``note``.
"""
from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import psutil
import trio

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / ".peers"           # git-ignored: npm packages, results.json
PAYLOAD = b"x" * 32                        # the payload every request-response echoes
READY_TIMEOUT = 20.0                       # a child process must say READY within this


@dataclass(frozen=True)
class Settings:
    seq_calls: int = 2000                  # sequential round trips (after warm-up)
    warmup_calls: int = 300
    duration: float = 1.0                  # seconds per in-flight level
    inflight: tuple[int, ...] = (1, 16, 100, 256)
    pubsub_messages: int = 100_000
    rounds: int = 7                        # interleaved head-to-head rounds (mesh vs cote)
    cote: bool = True
    quick: bool = False

    @classmethod
    def quick_mode(cls) -> "Settings":
        return cls(seq_calls=100, warmup_calls=20, duration=0.15, inflight=(1, 16),
                   pubsub_messages=2000, rounds=1, cote=False, quick=True)


@dataclass
class Row:
    family: str
    name: str
    ours: float | None = None
    baseline: float | None = None
    unit: str = ""
    target: str = ""
    verdict: str = "-"                     # PASS / FAIL / SKIP / -
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.baseline:
            return None
        return self.ours / self.baseline

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def skip(family: str, name: str, reason: str) -> Row:
    return Row(family, name, verdict="SKIP", note=reason)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)   # raw numbers, for the JSON

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


# -- request-response timing ---------------------------------------------------------

Call = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class RRFigures:
    seq_rate: float                        # sequential round trips per second
    p50_us: float
    p99_us: float
    inflight: dict[int, float]             # requests/s with k in flight

    def as_dict(self) -> dict[str, Any]:
        return {"seq_rate": self.seq_rate, "p50_us": self.p50_us, "p99_us": self.p99_us,
                "inflight": {str(k): v for k, v in self.inflight.items()}}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


async def sequential(call: Call, n: int) -> tuple[float, float, float]:
    """n round trips one after another: (rate/s, p50 us, p99 us)."""
    lat = []
    clock = time.perf_counter
    t0 = clock()
    for _ in range(n):
        s = clock()
        await call()
        lat.append(clock() - s)
    elapsed = clock() - t0
    lat.sort()
    return n / elapsed, percentile(lat, 0.5) * 1e6, percentile(lat, 0.99) * 1e6


async def throughput(make_call: Callable[[], Call], k: int, duration: float) -> float:
    """Requests/s with k callers each keeping one request in flight for ``duration``."""
    done = 0
    clock = time.perf_counter
    deadline = clock() + duration

    async def caller(call: Call) -> None:
        nonlocal done
        while clock() < deadline:
            await call()
            done += 1

    t0 = clock()
    async with trio.open_nursery() as nursery:
        for _ in range(k):
            nursery.start_soon(caller, make_call())
    return done / (clock() - t0)


async def measure_rr(make_call: Callable[[], Call], settings: Settings,
                     after_warmup: Callable[[], None] | None = None) -> RRFigures:
    """Warm up, then sequential latency, then throughput at each in-flight level.
    ``make_call`` gives each concurrent caller its own call (pynng contexts need it)."""
    call = make_call()
    for _ in range(settings.warmup_calls):
        await call()
    if after_warmup is not None:
        after_warmup()
    rate, p50, p99 = await sequential(call, settings.seq_calls)
    tput = {k: await throughput(make_call, k, settings.duration) for k in settings.inflight}
    return RRFigures(rate, p50, p99, tput)


def free_udp_port() -> int:
    """A UDP port free on loopback now (discovery ports: one per run, so runs don't meet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- child processes -----------------------------------------------------------------

def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class Child:
    process: trio.Process
    ready: str                             # what followed READY on its first line
    output: list[str] = field(default_factory=list)
    eof: trio.Event = field(default_factory=trio.Event)

    async def result(self, timeout: float) -> dict[str, Any]:
        """The JSON of the child's RESULT line, waiting up to ``timeout`` for it."""
        with trio.move_on_after(timeout):
            while not self.eof.is_set():
                if any(line.startswith("RESULT ") for line in self.output):
                    break
                await trio.sleep(0.02)
        for line in reversed(self.output):
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        tail = " | ".join(self.output[-5:])
        raise RuntimeError(f"no RESULT within {timeout:g} s: {tail or 'no output'}")

    async def ask(self, line: str, prefix: str, timeout: float) -> dict[str, Any]:
        """Write ``line`` to the child's stdin (``child_process(..., stdin=True)``)
        and return the JSON of the next output line starting with ``prefix``."""
        seen = sum(1 for out in self.output if out.startswith(prefix))
        await self.process.stdin.send_all(line.encode() + b"\n")
        with trio.move_on_after(timeout):
            while not self.eof.is_set():
                answers = [out for out in self.output if out.startswith(prefix)]
                if len(answers) > seen:
                    return json.loads(answers[seen][len(prefix):])
                await trio.sleep(0.01)
        tail = " | ".join(self.output[-5:])
        raise RuntimeError(f"no {prefix.strip()} answer within {timeout:g} s: {tail or 'no output'}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        return rss_mb(self.pid)


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time the processes have used so far, every thread counted.  Linux's
    per-thread schedstat is exact; psutil's clock ticks (10 ms) are the fallback, too
    coarse for a round of a few tens of milliseconds."""
    total = 0.0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                    total += int(stat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def tree_rss_mb(pid: int) -> tuple[float, list[float]]:
    """RSS of a process and, separately, of each of its descendants."""
    proc = psutil.Process(pid)
    kids = []
    for child in proc.children(recursive=True):
        try:
            kids.append(child.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            pass
    return proc.memory_info().rss / 2**20, kids


async def _read_lines(stream, child: "Child", ready: trio.MemorySendChannel) -> None:
    buf = b""
    sink = child.output
    async with ready:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                child.eof.set()
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                sink.append(text)
                if text.startswith("READY"):
                    ready.send_nowait(text[len("READY"):].strip())


@asynccontextmanager
async def child_process(argv: Sequence[str], *, env: dict[str, str] | None = None,
                        ready_timeout: float = READY_TIMEOUT, wait_ready: bool = True,
                        stdin: bool = False) -> AsyncIterator[Child]:
    """Start ``argv``; yield once it prints a ``READY ...`` line.  Always ends it:
    SIGTERM, then SIGKILL after a second, then reap.  ``stdin``: give it a pipe
    (for :meth:`Child.ask`) rather than /dev/null."""
    async with trio.open_nursery() as nursery:
        proc = await trio.lowlevel.open_process(
            list(argv), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env or python_env(), cwd=str(REPO))
        child = Child(proc, "")
        send, recv = trio.open_memory_channel[str](1)
        nursery.start_soon(_read_lines, proc.stdout, child, send)
        try:
            if wait_ready:
                with trio.fail_after(ready_timeout):
                    async for line in recv:
                        child.ready = line
                        break
                    else:
                        raise RuntimeError(
                            f"{argv[1:4]} exited before READY: {' | '.join(child.output[-5:])}")
            yield child
        except trio.TooSlowError:
            raise RuntimeError(f"{argv[1:4]} not ready in {ready_timeout:g} s: "
                               f"{' | '.join(child.output[-5:])}") from None
        finally:
            with trio.CancelScope(shield=True):
                if proc.stdin is not None:
                    await proc.stdin.aclose()
                await stop_process(proc)
            nursery.cancel_scope.cancel()


async def stop_process(proc: trio.Process, grace: float = 1.0) -> None:
    if proc.returncode is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
        with trio.move_on_after(grace):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def python_child(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if unit in ("MB", "s", "ms", "x") or abs(value) < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan
