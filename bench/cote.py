"""The Node.js ``cote`` baseline: Requester/Responder and Publisher/Subscriber.

cote is installed by the bench itself with npm into ``bench/.peers/`` (git-ignored),
together with ``socket.io`` and ``socket.io-client`` of one pinned release (the Sockend
comparison, bench/sockend_sio.py).
The node scripts in ``bench/peers/`` keep cote on loopback: each process gets its own
127.0.0.x address, discovery is unicast to the list of those addresses on a free UDP
port, and a per-run key keeps any other cote on this machine out of the benchmark.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from .harness import (BENCH_DIR, PAYLOAD, PEERS_DIR, Child, RRFigures, Settings, child_process,
                      free_udp_port)

COTE_VERSION = "1.2.0"
# cote 1.2.0 asks for socket.io ^4.8.1 (its Sockend's server).  The server and the load
# client of the Sockend comparison (bench/sockend_sio.py) are pinned to one release: the
# two packages are released in lockstep, and a pinned pair is the same in every run.
SOCKET_IO_VERSION = "4.8.4"
SCRIPTS = BENCH_DIR / "peers"
INSTALL_TIMEOUT = 180.0


class CoteUnavailable(Exception):
    """Why the cote column is skipped (no node/npm, registry unreachable...)."""


def ensure_installed() -> str:
    """Install cote and the Socket.IO pair (SOCKET_IO_VERSION) into bench/.peers if needed;
    the installed cote version."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise CoteUnavailable("node/npm not found on PATH")
    wanted = {"cote": COTE_VERSION, "socket.io": SOCKET_IO_VERSION,
              "socket.io-client": SOCKET_IO_VERSION}
    if any(_installed(name) != version for name, version in wanted.items()):
        PEERS_DIR.mkdir(parents=True, exist_ok=True)
        # One npm command for all of them: bench/.peers has no package.json, and an
        # install of one package prunes the others as extraneous.
        specs = [f"{name}@{version}" for name, version in wanted.items()]
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(PEERS_DIR), "--no-audit", "--no-fund",
                 "--no-save", *specs],
                capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CoteUnavailable(f"npm install cote timed out after {INSTALL_TIMEOUT:g} s "
                                  "(registry unreachable?)") from None
        missing = [name for name, version in wanted.items() if _installed(name) != version]
        if done.returncode != 0 or missing:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            raise CoteUnavailable(f"npm install {' '.join(specs)} failed: {last[0]}")
    return _installed("cote") or "?"


def _installed(name: str) -> str | None:
    """The version of ``name`` in bench/.peers/node_modules, None when absent."""
    import json
    package = PEERS_DIR / "node_modules" / name / "package.json"
    try:
        return json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def _envs(count: int) -> list[dict[str, str]]:
    """One environment per cote process: own loopback address, shared discovery."""
    addresses = [f"127.0.0.{i + 2}" for i in range(count)]
    shared = dict(os.environ,
                  BENCH_COTE_DISCOVERY_PORT=str(free_udp_port()),
                  BENCH_COTE_UNICAST=",".join(addresses),
                  BENCH_COTE_KEY=f"bench-{os.getpid()}",
                  COTE_PEERS_DIR=str(PEERS_DIR))
    return [dict(shared, BENCH_COTE_ADDR=a) for a in addresses]


def _node(script: str, *args) -> list[str]:
    return [shutil.which("node") or "node", str(SCRIPTS / script), *map(str, args)]


async def reqrep(settings: Settings) -> tuple[RRFigures, dict[str, float]]:
    """cote Requester -> Responder echo; figures and the RSS (MB) of both processes."""
    rep_env, req_env = _envs(2)
    async with child_process(_node("cote_responder.js"), env=rep_env) as responder:
        inflight = ",".join(map(str, settings.inflight))
        async with child_process(
                _node("cote_requester.js", len(PAYLOAD), settings.seq_calls,
                      settings.duration, inflight),
                env=req_env, wait_ready=False) as requester:
            budget = 15 + settings.duration * len(settings.inflight) * 2
            out = await requester.result(timeout=budget)
        responder_rss = responder.rss_mb()
    if "error" in out:
        raise RuntimeError(f"cote requester failed: {out['error']}")
    seq = out["seq"]
    figures = RRFigures(seq["rate"], seq["p50_us"], seq["p99_us"],
                        {int(k): v for k, v in out["inflight"].items()})
    return figures, {"requester": out["rss_mb"], "responder": responder_rss}


class CoteRounds:
    """A warmed-up cote Requester -> Responder pair kept running, measuring one round
    at a time when asked (for rounds interleaved with ours)."""

    def __init__(self, requester: Child, responder: Child, k: int):
        self._requester, self.k = requester, k
        self.pids = (requester.pid, responder.pid)

    async def inflight(self, seconds: float) -> float:
        """Requests/s with ``k`` in flight for ``seconds``."""
        out = await self._requester.ask(f"{self.k} {seconds}", "ROUND ", timeout=seconds + 10)
        return out["rate"]

    async def sequential(self, n: int) -> tuple[float, float, float]:
        """``n`` round trips one after another: (rate/s, p50 us, p99 us)."""
        out = await self._requester.ask(f"seq {n}", "ROUND ", timeout=10 + n / 500)
        return out["rate"], out["p50_us"], out["p99_us"]


@asynccontextmanager
async def rounds_requester(k: int) -> AsyncIterator[CoteRounds]:
    rep_env, req_env = _envs(2)
    async with child_process(_node("cote_responder.js"), env=rep_env) as responder, \
            child_process(_node("cote_requester.js", len(PAYLOAD), 0, 0, k, "--rounds"),
                          env=req_env, stdin=True) as requester:
        yield CoteRounds(requester, responder, k)


async def pubsub(settings: Settings) -> dict[str, float]:
    """cote Publisher -> one Subscriber: delivered messages/s and how many were lost."""
    pub_env, sub_env = _envs(2)
    n = settings.pubsub_messages
    async with child_process(_node("cote_publisher.js", n, len(PAYLOAD), 1),
                             env=pub_env) as publisher:
        async with child_process(_node("cote_subscriber.js", n), env=sub_env,
                                 wait_ready=False) as subscriber:
            out = await subscriber.result(timeout=30)
        publisher_rss = publisher.rss_mb()
    return {"rate": out["rate"], "received": out["received"], "lost": n - out["received"],
            "subscriber_rss_mb": out["rss_mb"], "publisher_rss_mb": publisher_rss}


if __name__ == "__main__":  # python -m bench.cote: just this baseline
    print("cote", ensure_installed())
    print(trio.run(reqrep, Settings()))
    print(trio.run(pubsub, Settings()))
