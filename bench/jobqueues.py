"""Family ``peers``: the job queues a Python team would pick instead (issue #18).

Celery and Dramatiq, each with a real ``redis-server`` as broker and result backend
(started on a free loopback port by the bench, always stopped), run a no-op job that
returns its argument on 2 worker processes (``celery worker --pool prefork
--concurrency 2``; ``dramatiq --processes 2 --threads 1``).  A client process submits a
job and awaits its result: sequentially (rt/s, p50/p99), then with 256 outstanding for
a couple of seconds (jobs/s).  Between its warm-up and the load, the bench samples the
worker processes' idle RSS (the pool's children, not the supervisor process).

Against them: the engine's native-server and control paths on the same 2 slaves, as
family ``rr`` measured them in this run (measured here when ``rr`` did not run).

Both tools are installed by the bench into ``bench/.peers/py`` (git-ignored) with
``pip install --target``; the clients and workers are child processes with that folder
on PYTHONPATH, so nothing of theirs is imported into the bench process.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import psutil
import trio

from . import engine
from .harness import (BENCH_DIR, PEERS_DIR, Results, Row, RRFigures, Settings, child_process,
                      skip, verdict)

PY_DIR = PEERS_DIR / "py"
PACKAGES = ("celery[redis]", "dramatiq[redis]", "redis")
TOOLS = ("celery", "dramatiq")
WORKERS = 2
K = 256
DURATION = 2.0                   # seconds with K jobs outstanding
SEQ_CALLS = 1000                 # sequential jobs, after the warm-up
WARMUP_CALLS = 100
INSTALL_TIMEOUT = 300.0
THROUGHPUT_TARGET = 3.0
LATENCY_TARGET = 10.0


class Unavailable(Exception):
    """Why the family (or one tool) is skipped."""


def ensure_installed() -> dict[str, str]:
    """pip-install Celery and Dramatiq into bench/.peers/py if needed; their versions."""
    def versions() -> dict[str, str]:
        found = {}
        for dist in PY_DIR.glob("*.dist-info") if PY_DIR.is_dir() else ():
            name, _, version = dist.name[:-len(".dist-info")].partition("-")
            found[name.lower()] = version
        return found

    have = versions()
    if not all(t in have for t in (*TOOLS, "redis")):
        PY_DIR.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--target", str(PY_DIR), "--upgrade", *PACKAGES],
                capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"pip install {' '.join(PACKAGES)} timed out after "
                              f"{INSTALL_TIMEOUT:g} s (PyPI unreachable?)") from None
        have = versions()
        if done.returncode != 0 or not all(t in have for t in (*TOOLS, "redis")):
            lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines()
                     if not ln.startswith("WARNING")]
            raise Unavailable(f"pip install {' '.join(PACKAGES)} failed: "
                              f"{(lines[-1:] or ['?'])[0][:150]}")
    return {t: have[t] for t in (*TOOLS, "redis")}


def redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise Unavailable("no redis-server on PATH (apt install redis-server)")
    return path


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(folder: Path, tool: str, url: str) -> dict[str, str]:
    env = dict(os.environ, BENCH_JOBS_TOOL=tool, BENCH_JOBS_REDIS=url, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(PY_DIR)])
    return env


@asynccontextmanager
async def running_redis(folder: Path) -> AsyncIterator[str]:
    """A redis-server on a free loopback port, no persistence; its URL.  Always stopped."""
    port = _free_tcp_port()
    argv = [redis_server(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(folder), "--protected-mode", "yes"]
    async with child_process(argv, wait_ready=False) as server:
        with trio.fail_after(10):
            while True:
                if server.eof.is_set():
                    raise RuntimeError(f"redis-server exited: {' | '.join(server.output[-3:])}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    if (await stream.receive_some(64)).startswith(b"+PONG"):
                        break
                await trio.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


def _worker_argv(tool: str) -> list[str]:
    if tool == "celery":
        return [sys.executable, "-m", "celery", "-A", "bench_jobs", "worker", "--concurrency",
                str(WORKERS), "--pool", "prefork", "-l", "warning", "--without-gossip",
                "--without-mingle", "--without-heartbeat"]
    return [sys.executable, "-m", "dramatiq", "bench_jobs", "--processes", str(WORKERS),
            "--threads", "1"]


def _worker_rss(pid: int) -> dict[str, Any]:
    """The supervisor's RSS and its worker children's (MB)."""
    proc = psutil.Process(pid)
    kids = []
    for child in proc.children(recursive=True):
        try:
            kids.append({"pid": child.pid, "name": " ".join(child.cmdline()[:3])[:60],
                         "rss_mb": child.memory_info().rss / 2**20})
        except psutil.Error:
            pass
    return {"supervisor_mb": proc.memory_info().rss / 2**20, "children": kids}


async def measure_tool(tool: str, settings: Settings) -> dict[str, Any]:
    """One tool's figures: {"figures": RRFigures, "rss": ..., "version": ...}."""
    seq = 100 if settings.quick else SEQ_CALLS
    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-") as tmp:
        folder = Path(tmp)
        shutil.copy(BENCH_DIR / "jobqueue_peer.py", folder / "bench_jobs.py")
        async with running_redis(folder) as url:
            env = _env(folder, tool, url)
            async with child_process(_worker_argv(tool), env=env, wait_ready=False) as worker:
                client_argv = [sys.executable, "-m", "bench_jobs", "client", str(seq),
                               str(WARMUP_CALLS), str(DURATION), str(K)]
                async with child_process(client_argv, env=env, stdin=True,
                                         ready_timeout=90) as client:
                    if worker.eof.is_set():
                        raise RuntimeError(f"{tool} worker exited: "
                                           f"{' | '.join(worker.output[-5:])}")
                    await trio.sleep(0.5)                    # let the warm-up settle
                    rss = _worker_rss(worker.pid)
                    out = await client.ask("run", "RESULT ", timeout=60 + seq * 0.05)
    if "error" in out:
        raise RuntimeError(f"{tool} client: {out['error']}")
    s = out["seq"]
    figures = RRFigures(s["rate"], s["p50_us"], s["p99_us"],
                        {int(k): v for k, v in out["inflight"].items()})
    kids = rss["children"]
    per_worker = sum(k["rss_mb"] for k in kids) / len(kids) if kids else None
    return {"figures": figures, "rss": rss, "rss_per_worker_mb": per_worker,
            "workers": len(kids), "done": out["done"]}


# -- the family ------------------------------------------------------------------------

Measure = Callable[[str, Callable, Settings], tuple[Any, str | None]]


def _engine_figures(settings: Settings, results: Results,
                    measure: Measure) -> dict[str, RRFigures | str]:
    """The engine's native-server and control-path figures: family rr's of this run,
    else measured now."""
    out: dict[str, RRFigures | str] = {}
    for key, fn, label in (
            ("engine control", engine.control_path,
             "engine control path (client->node->slave)"),
            ("native-server", engine.native_server, "engine native-server driver")):
        fig = results.figures.get(f"rr:{key}")
        if isinstance(fig, RRFigures) and K in fig.inflight:
            out[key] = fig
            continue
        reason = engine.available() or (engine.native_server_available()
                                         if key == "native-server" else None)
        if reason:
            out[key] = reason
            continue
        got, err = measure(f"{label}, for the job queues", fn, replace_inflight(settings))
        out[key] = got[0] if got else err
    return out


def replace_inflight(settings: Settings) -> Settings:
    from dataclasses import replace
    return replace(settings, inflight=tuple(sorted({*settings.inflight, K})))


def family_peers(settings: Settings, results: Results,
                 measure: Measure) -> dict[str, RRFigures | str]:
    names = ("engine native-server 256 in flight vs faster of Celery/Dramatiq (>= 3x)",
             "engine sequential latency p50 vs faster of Celery/Dramatiq (>= 10x lower)")
    if settings.quick:
        for name in names:
            results.add(skip("peers", name, "skipped: --quick (installs packages, starts "
                                            "redis-server)"))
        return {}
    try:
        versions = ensure_installed()
        redis_server()
    except Unavailable as exc:
        for name in names:
            results.add(skip("peers", name, f"skipped: {exc}"))
        return {"Celery / Dramatiq": f"skipped: {exc}"}
    results.figures["peers_versions"] = versions
    systems: dict[str, RRFigures | str] = {}
    tools: dict[str, dict[str, Any]] = {}
    for tool in TOOLS:
        label = f"{tool.capitalize()} {versions[tool]}"
        out, err = measure(f"{label}: no-op job via redis, {WORKERS} worker processes",
                           lambda s, tool=tool: measure_tool(tool, s), settings)
        results.figures[f"peers:{tool}"] = (
            {**out, "figures": out["figures"].as_dict()} if out else err)
        if out:
            tools[label] = out
            systems[f"{label} (redis, {WORKERS} workers)"] = out["figures"]
        else:
            systems[f"{label} (redis, {WORKERS} workers)"] = err
    ours = _engine_figures(settings, results, measure)
    for key, fig in ours.items():
        if f"rr:{key}" not in results.figures:
            systems[key] = fig
    _rows(results, tools, ours)
    slaves = ((results.figures.get("control_memory") or {}).get("after_warmup") or {}).get("slaves")
    if slaves and tools:
        lightest = min(tools, key=lambda t: tools[t]["rss_per_worker_mb"] or 1e9)
        results.add(Row("peers", "engine slave RSS per child process MB (after warm-up)",
                        sum(slaves) / len(slaves), tools[lightest]["rss_per_worker_mb"], "MB",
                        note=f"mean of the node's {len(slaves)} child processes (2 slaves + the pool's zygote; node not counted), family rr's "
                             f"control path; vs {lightest}"))
    return systems


def _rows(results: Results, tools: dict[str, dict[str, Any]],
          ours: dict[str, RRFigures | str]) -> None:
    for label, out in tools.items():
        fig = out["figures"]
        results.add(Row("peers", f"{label} seq rt/s (p50 {fig.p50_us:,.0f} us, p99 "
                                 f"{fig.p99_us:,.0f} us)", fig.seq_rate, None, "/s"))
        results.add(Row("peers", f"{label} {K} in flight jobs/s", fig.inflight[K], None, "/s",
                        note=f"{out['done'][str(K)]:,} jobs, {K} outstanding for "
                             f"{DURATION:g} s then drained"))
        rss = out["rss_per_worker_mb"]
        results.add(Row("peers", f"{label} idle RSS per worker process MB", rss, None, "MB",
                        note=f"mean of the {out['workers']} pool children (supervisor "
                             f"{out['rss']['supervisor_mb']:.1f} MB not counted)"))
    native, control = ours.get("native-server"), ours.get("engine control")
    names = ("engine native-server 256 in flight vs faster of Celery/Dramatiq (>= 3x)",
             "engine sequential latency p50 vs faster of Celery/Dramatiq (>= 10x lower)")
    if not tools:
        for name in names:
            results.add(skip("peers", name, "neither Celery nor Dramatiq measured"))
        return
    fastest = max(tools, key=lambda t: tools[t]["figures"].inflight[K])
    base = tools[fastest]["figures"].inflight[K]
    if isinstance(native, RRFigures):
        rate = native.inflight[K]
        results.add(Row("peers", names[0], rate, base, "/s", f">= {THROUGHPUT_TARGET:g}x",
                        verdict(rate >= THROUGHPUT_TARGET * base), f"vs {fastest}"))
    else:
        results.add(skip("peers", names[0], str(native)))
    if isinstance(control, RRFigures):
        rate = control.inflight[K]
        results.add(Row("peers", "(control path) engine 256 in flight vs faster of "
                                 "Celery/Dramatiq", rate, base, "/s", f">= {THROUGHPUT_TARGET:g}x",
                        "info", f"engine.client -> node -> slave; vs {fastest}"))
    quickest = min(tools, key=lambda t: tools[t]["figures"].p50_us)
    p50 = tools[quickest]["figures"].p50_us
    # Latency: the engine's p50 against the quicker tool's; ratio = ours / theirs, the
    # target is <= 1/10.
    for fig, label, judged in ((native, "native-server, trio RpcClient", True),
                               (control, "control path, engine.client", False)):
        name = names[1] if judged else ("(control path) engine sequential latency p50 vs "
                                        "faster of Celery/Dramatiq")
        if not isinstance(fig, RRFigures):
            if judged:
                results.add(skip("peers", name, str(fig)))
            continue
        results.add(Row("peers", name, fig.p50_us, p50, "us", f"<= {1 / LATENCY_TARGET:.2f}x",
                        verdict(fig.p50_us * LATENCY_TARGET <= p50) if judged else "info",
                        f"{label}; vs {quickest}"))
