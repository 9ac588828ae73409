"""``python -m bench.soak --minutes N``: a real node under mixed traffic while its
slaves are killed, and the count of what became of every request.

The node is ``python -m engine run bench/soak_app`` on a loopback port it picks (its
token found the usual way, engine/client/tokens.py).  Its app (``bench/soak_app``) has
every kind of job: a plain reply (``echo``), a streamed one (``count``), a chunked
request (``digest``, an upload), a slow one (so kills find jobs in flight), a recurring
timer (``tick``, every 100 ms) and the app's maintenance channel (pub/sub: ``state``
every second, a ``fault`` per failure of a part).  Meanwhile:

- ``--clients`` tasks on ``--connections`` connections each call one job after another,
  of a random kind, and check the answer (an echo's bytes, a stream's items in order,
  an upload's digest);
- a killer SIGKILLs a random slave every ``--kill-every`` seconds (jittered);
- a subscriber reads the maintenance channel.

Every request ends one of three ways: *answered* (the right answer), *errored* (a
typed error: ``SlaveDied`` is what a kill costs the jobs it hits), or *lost* (no
answer within ``--call-timeout``: the node accepted it and never answered).  A wrong
answer is counted apart.  After the run the node is sent SIGTERM, and every process
it ever had (its zygote, every slave) must be gone.

Exit status: 0 when nothing was lost, nothing answered wrong, and nothing left behind;
1 otherwise.  Bounded: loopback only, ``--minutes`` (default 1) plus the shutdown.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

from .harness import BENCH_DIR, python_env

APP = "soak"
APP_DIR = BENCH_DIR / "soak_app"
ADDRESS_RE = re.compile(r"control endpoint on (tcp://127\.0\.0\.1:\d+)")
KINDS = {"echo": 55, "stream": 15, "upload": 15, "slow": 15}   # weights
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)        # by kind
    answered: Counter[str] = field(default_factory=Counter)    # by kind
    errored: Counter[str] = field(default_factory=Counter)     # by error type
    lost: Counter[str] = field(default_factory=Counter)        # by kind: no answer in time
    wrong: list[str] = field(default_factory=list)             # answers that were not the answer
    untyped: list[str] = field(default_factory=list)           # errors that were no RemoteError
    kills: int = 0
    state_messages: int = 0
    state_gaps: int = 0
    fault_messages: int = 0


# -- the node -------------------------------------------------------------------------------

class Node:
    """The node process, and every process it has had (to prove none is left)."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "node.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "run", str(APP_DIR), "--control", "tcp://127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=self._log, cwd=workdir, env=python_env())
        self.ps = psutil.Process(self.proc.pid)
        self.seen: set[tuple[int, float]] = set()   # (pid, create time) of every descendant

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def address(self) -> str:
        with trio.fail_after(START_TIMEOUT):
            while True:
                text = self.log()
                match = ADDRESS_RE.search(text)
                if match and "serving" in text:
                    return match.group(1)
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the node exited at start:\n{text[-2000:]}")
                await trio.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        try:
            kids = self.ps.children(recursive=True)
        except psutil.Error:
            return []
        for p in kids:
            try:
                self.seen.add((p.pid, p.create_time()))
            except psutil.Error:
                pass
        return kids

    def slaves(self) -> list[psutil.Process]:
        out = []
        for p in self.descendants():
            try:
                if "engine.worker --app" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def rss_mb(self) -> tuple[float, float]:
        """(the node's own RSS, the node's and all its descendants')."""
        own = total = self.ps.memory_info().rss / 2**20
        for p in self.descendants():
            try:
                total += p.memory_info().rss / 2**20
            except psutil.Error:
                pass
        return own, total

    async def stop(self) -> int | None:
        """SIGTERM, then (after STOP_TIMEOUT) SIGKILL; the node's exit status (None: killed)."""
        self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                while self.proc.poll() is None:
                    await trio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            return None
        self._log.close()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Processes of the node still running once it has exited (and then killed)."""
        left = []
        for pid, created in sorted(self.seen):
            try:
                p = psutil.Process(pid)
                if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                left.append(f"{pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
            except psutil.Error:
                continue
        return left


# -- traffic ----------------------------------------------------------------------------------

async def one_call(client: Any, kind: str, rng: random.Random, timeout: float, tally: Tally) -> None:
    from transport.errors import RemoteError, TimeoutError_

    tally.sent[kind] += 1
    try:
        if kind == "echo":
            payload = rng.randbytes(rng.randrange(0, 4096))
            ok = await client.call(APP, "echo", payload, timeout=timeout) == payload
        elif kind == "stream":
            n = rng.randrange(1, 60)
            with trio.fail_after(timeout):
                items = [item async for item in client.stream(APP, "count", n, timeout=timeout)]
            ok = items == list(range(n))
        elif kind == "upload":
            chunks = [rng.randbytes(1024) for _ in range(rng.randrange(1, 20))]
            ok = await client.call(APP, "digest", None, chunks=chunks, timeout=timeout) \
                == hashlib.sha256(b"".join(chunks)).hexdigest()
        else:
            seconds = rng.choice([0.01, 0.05, 0.1])
            ok = await client.call(APP, "slow", seconds, timeout=timeout) == seconds
    except (TimeoutError_, trio.TooSlowError):
        tally.lost[kind] += 1   # accepted, and no answer within the timeout
        return
    except RemoteError as exc:
        tally.errored[type(exc).__name__] += 1
        return
    except Exception as exc:    # not a typed error: a bug, counted (and failing the run)
        tally.errored[f"untyped {type(exc).__name__}"] += 1
        tally.untyped.append(f"{kind}: {type(exc).__name__}: {exc}"[:200])
        return
    tally.answered[kind] += 1
    if not ok:
        tally.wrong.append(kind)


async def caller(client: Any, seed: int, deadline: float, timeout: float, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    while trio.current_time() < deadline:
        await one_call(client, rng.choices(kinds, weights)[0], rng, timeout, tally)


async def killer(node: Node, every: float, deadline: float, rng: random.Random, tally: Tally) -> None:
    while True:
        await trio.sleep(every * rng.uniform(0.5, 1.5))
        if trio.current_time() >= deadline:
            return
        slaves = node.slaves()
        if slaves:
            try:
                os.kill(rng.choice(slaves).pid, signal.SIGKILL)
                tally.kills += 1
            except ProcessLookupError:
                pass


async def subscriber(endpoint: str, tally: Tally) -> None:
    import pynng

    from engine.node.maintenance import split_frame
    from transport.errors import CodecError
    from transport.sockets import TrioSocket

    sock = TrioSocket(pynng.Sub0())
    last_seq: int | None = None
    try:
        sock.sock.subscribe(b"state\0")
        sock.sock.subscribe(b"fault\0")
        sock.sock.dial(endpoint, block=False)
        while True:
            try:
                topic, body = split_frame(await sock.recv())
            except CodecError:
                continue
            if topic == "fault":
                tally.fault_messages += 1
            elif topic == "state" and isinstance(body, dict) and isinstance(body.get("seq"), int):
                tally.state_messages += 1
                if last_seq is not None and body["seq"] > last_seq + 1:
                    tally.state_gaps += body["seq"] - last_seq - 1
                last_seq = body["seq"]
    finally:
        sock.close()


async def tracker(node: Node) -> None:
    """Note every process the node has, so that none can be left unseen."""
    while True:
        node.descendants()
        await trio.sleep(0.25)


# -- the run --------------------------------------------------------------------------------

async def soak(args: argparse.Namespace) -> int:
    from engine.client import connect

    tally = Tally()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        node = Node(Path(tmp))
        try:
            address = await node.address()
            async with connect(address, timeout=args.call_timeout) as control:
                info = await control.info(APP)
                await warm_up(control)
                rss_start = node.rss_mb()
                started = time.monotonic()
                deadline = trio.current_time() + args.minutes * 60
                clients = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tracker, node)
                    nursery.start_soon(subscriber, info["pubsub"], tally)
                    async with trio.open_nursery() as traffic:
                        for c in range(args.connections):
                            clients.append(await traffic.start(_connection, address, args.call_timeout))
                        traffic.start_soon(killer, node, args.kill_every, deadline, rng, tally)
                        async with trio.open_nursery() as callers:   # each ends after its last call
                            for i in range(args.clients):
                                callers.start_soon(caller, clients[i % len(clients)], rng.randrange(2**32),
                                                   deadline, args.call_timeout, tally)
                        traffic.cancel_scope.cancel()
                    elapsed = time.monotonic() - started
                    app_info = await control.info(APP)
                    rss_end = node.rss_mb()
                    nursery.cancel_scope.cancel()
        finally:
            status = await node.stop()
            left = node.leftovers()
            log_tail = node.log()[-1500:]
    return report(args, tally, elapsed, app_info, rss_start, rss_end, status, left, log_tail)


async def warm_up(client: Any) -> None:
    """Every kind of job once, then a burst that grows the pool to its limit: the RSS
    at the start is that of a node whose slaves all run (not counted in the tally)."""
    assert await client.call(APP, "echo", b"x") == b"x"
    assert [i async for i in client.stream(APP, "count", 3)] == [0, 1, 2]
    assert await client.call(APP, "digest", None, chunks=[b"a"]) == hashlib.sha256(b"a").hexdigest()
    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(client.call, APP, "slow", 0.2)


async def _connection(address: str, timeout: float, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A connection of its own (RpcClient multiplexes the callers that share it)."""
    from engine.client import connect

    async with connect(address, timeout=timeout) as client:
        task_status.started(client)
        await trio.sleep_forever()


def report(args: argparse.Namespace, tally: Tally, elapsed: float, info: dict[str, Any],
           rss_start: tuple[float, float], rss_end: tuple[float, float], status: int | None,
           left: list[str], log_tail: str) -> int:
    sent, answered = sum(tally.sent.values()), sum(tally.answered.values())
    errored, lost = sum(tally.errored.values()), sent - answered - sum(tally.errored.values())
    tick = (info.get("drivers") or {}).get("tick", {})
    pool = info.get("pool") or {}
    print(f"soak: {elapsed / 60:.1f} min, {args.clients} callers on {args.connections} connections, "
          f"a slave SIGKILLed every ~{args.kill_every:g} s ({tally.kills} kills)")
    print(f"requests: sent {sent:,}  answered {answered:,}  errored {errored:,}  lost {lost:,}  "
          f"(wrong answers {len(tally.wrong)})")
    for kind in KINDS:
        print(f"  {kind:7} sent {tally.sent[kind]:>8,}  answered {tally.answered[kind]:>8,}"
              + (f"  lost {tally.lost[kind]:,}" if tally.lost[kind] else ""))
    print("  errored by type: " + (", ".join(f"{k} {v:,}" for k, v in tally.errored.most_common()) or "none"))
    print(f"timer: ticks {tick.get('ticks', 0):,}  done {tick.get('done', 0):,}  errors {tick.get('errors', 0):,}"
          f"  skipped {tick.get('skipped', 0):,}")
    print(f"pub/sub: state messages {tally.state_messages:,} (gaps {tally.state_gaps}), "
          f"fault messages {tally.fault_messages:,}")
    print(f"pool: done {pool.get('done', 0):,}  failed {pool.get('failed', 0):,}  faults {info.get('faults', {})}")
    print(f"node RSS: start {rss_start[0]:.1f} MB, end {rss_end[0]:.1f} MB "
          f"(with slaves: {rss_start[1]:.1f} -> {rss_end[1]:.1f} MB)")
    print(f"node exit status: {status}; processes left after shutdown: {len(left)}")
    for line in left:
        print(f"  left: {line}")
    for line in tally.untyped[:5]:
        print(f"  untyped error: {line}")
    failed = lost > 0 or tally.wrong or tally.untyped or left or status != 0 or sent == 0
    if status != 0:
        print(f"node log, last lines:\n{log_tail}")
    print("verdict:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long the traffic runs (default 1)")
    parser.add_argument("--clients", type=int, default=8, help="calling tasks (default 8)")
    parser.add_argument("--connections", type=int, default=2, help="connections they share (default 2)")
    parser.add_argument("--kill-every", type=float, default=3.0,
                        help="seconds between slave kills, jittered ±50%% (default 3)")
    parser.add_argument("--call-timeout", type=float, default=60.0,
                        help="seconds a call may take before it counts as lost (default 60)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.connections < 1 or args.kill_every <= 0:
        parser.error("--minutes, --kill-every must be > 0, --clients and --connections >= 1")
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
