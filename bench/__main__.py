"""``python -m bench`` (``make bench``): every measurement beside its baseline, in one run.

Prints the raw request-response figures per system, then one comparison row per
target of issue 6 (ours, baseline, ratio, target, PASS/FAIL/SKIP), then a summary of
the target rows only, and writes both to ``bench/.peers/results.json`` (``--json``); a
run without ``--quick`` also writes the committed ``bench/results.json`` and
``bench/results.svg`` (the chart; ``python -m bench.report`` redraws both from a saved run).  ``--quick`` is a tiny smoke workload (no cote, no pool
burst); ``--only`` picks families.  Exit status 0 whatever the verdicts: this is a
measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import trio

from . import (baselines, cote, engine, jobqueues, languages, mesh, pool, rpc, sockend,
               sockend_sio_rows, timing)
from .harness import (PAYLOAD, Results, Row, RRFigures, Settings, median, rss_mb, skip,
                      verdict)
from .report import (RESULTS_JSON, machine, print_rows, print_rr_table, print_summary, publish,
                     write_json)

FAMILIES = ("rr", "mesh", "pool", "streaming", "sockend", "sockend-sio", "timing", "languages",
            "peers")
LEAK_LIMIT = 1.10                       # RSS after the run / after warm-up
PUBSUB_ROUNDS = 3                       # pub/sub runs of ours and of cote's, alternating


def _measure(label: str, fn: Callable, settings: Settings) -> tuple[Any, str | None]:
    """Run one measurement in its own trio run; (value, None) or (None, error text)."""
    t0 = time.perf_counter()
    print(f"  {label} ...", end="", flush=True)
    try:
        value = trio.run(fn, settings)
    except Exception as exc:  # noqa: BLE001 - one failed column must not end the run
        err = exc
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
            err = err.exceptions[0]
        print(f" error ({time.perf_counter() - t0:.1f} s)", flush=True)
        return None, f"error: {type(err).__name__}: {err}"[:200]
    print(f" {time.perf_counter() - t0:.1f} s", flush=True)
    return value, None


def _leak_row(results: Results, name: str, before: float | None, after: float | None) -> None:
    if before is None or after is None:
        return
    results.add(Row("leak", f"leak: {name} RSS after run / after warm-up", after, before, "MB",
                    f"<= {LEAK_LIMIT:.2f}x", verdict(after <= before * LEAK_LIMIT)))


# -- 1. request-response ------------------------------------------------------------

def family_rr(settings: Settings, results: Results) -> dict[str, RRFigures | str]:
    systems: dict[str, RRFigures | str] = {}
    tcp, err = _measure("trio TCP echo (1 process)", baselines.trio_tcp_echo, settings)
    systems["trio TCP echo"] = tcp or err
    pynng_fig, err = _measure("pynng Req/Rep (2 processes)", baselines.pynng_reqrep, settings)
    systems["pynng Req/Rep"] = pynng_fig or err

    cote_fig, why = _cote_reqrep(settings, results)
    systems["cote Req/Resp"] = cote_fig or why

    ours = {}
    reason = rpc.available()
    if reason is None:
        out, err = _measure("transport.rpc RpcClient->RpcServer", rpc.rpc_echo, settings)
        if out:
            ours["rpc"], memory = out
            _leak_row(results, "rpc echo server", memory["server_after_warmup"],
                      memory["server_after_run"])
        systems["transport.rpc"] = ours.get("rpc") or err
    else:
        systems["transport.rpc"] = reason

    reason = engine.available()
    if reason is None:
        out, err = _measure("engine control path (client->node->slave)", engine.control_path,
                            settings)
        if out:
            ours["control"], memory = out
            results.figures["control_memory"] = memory
            results.figures["idle_node_rss_mb"] = memory["idle_node"]
            _leak_row(results, "node + slaves (control path)", memory["after_warmup"]["total"],
                      memory["after_run"]["total"])
        systems["engine control"] = ours.get("control") or err
    else:
        systems["engine control"] = reason

    reason = reason or engine.native_server_available()
    if reason is None:
        out, err = _measure("engine native-server driver", engine.native_server, settings)
        if out:
            ours["native"], memory = out
            ours["native_sync"] = memory.pop("sync_client")
            _leak_row(results, "node + slaves (native-server)", memory["after_warmup"]["total"],
                      memory["after_run"]["total"])
        systems["native-server"] = ours.get("native") or err
        if "native_sync" in ours:
            systems["native-server, SyncRpcClient"] = ours["native_sync"]
        if not settings.quick:
            for key, setting, measure in _native_variants():
                out, err = _measure(f"engine native-server driver, {setting}", measure, settings)
                if out:
                    ours[key] = out[0]
                    ours[f"{key}_sync"] = out[1]["sync_client"]
                systems[f"native-server, {setting}"] = ours.get(key) or err
    else:
        systems["native-server"] = reason

    for name, fig in systems.items():
        results.figures[f"rr:{name}"] = fig
    _rr_rows(results, tcp, pynng_fig, ours, settings)
    return systems


def _rr_rows(results: Results, tcp: RRFigures | None, pynng_fig: RRFigures | None,
             ours: dict[str, RRFigures], settings: Settings) -> None:
    top = max(settings.inflight)
    for key, label in (("rpc", "transport.rpc"), ("control", "engine control")):
        fig = ours.get(key)
        if fig is None:
            continue
        if tcp:
            results.add(Row("rr", f"{label} seq rt/s vs trio TCP echo", fig.seq_rate,
                            tcp.seq_rate, "/s"))
        if pynng_fig:
            results.add(Row("rr", f"{label} seq rt/s vs pynng Req/Rep", fig.seq_rate,
                            pynng_fig.seq_rate, "/s"))
            results.add(Row("rr", f"{label} {top} in flight/s vs pynng", fig.inflight[top],
                            pynng_fig.inflight[top], "/s"))
    native = ours.get("native")
    if native is None:
        results.add(skip("rr", "native-server seq vs trio TCP echo (>= 1/3)",
                         "no native-server figures"))
        return
    sync = ours.get("native_sync")
    if tcp and sync:
        results.add(Row("rr", "native-server seq rt/s vs trio TCP echo", sync.seq_rate,
                        tcp.seq_rate, "/s", ">= 0.33x", verdict(sync.seq_rate >= tcp.seq_rate / 3),
                        "client: the blocking SyncRpcClient"))
    if tcp:
        results.add(Row("rr", "native-server seq rt/s (trio client) vs trio TCP echo",
                        native.seq_rate, tcp.seq_rate, "/s", ">= 0.33x",
                        verdict(native.seq_rate >= tcp.seq_rate / 3),
                        "client: transport.rpc.RpcClient under trio"))
    if 256 in native.inflight:
        results.add(Row("rr", "native-server 256 in flight/s (2 slaves)", native.inflight[256],
                        10_000.0, "/s", "> 10,000/s", verdict(native.inflight[256] > 10_000)))
    # Not the target's configuration (that is the defaults above): what the same engine
    # does with other manifest settings; shown, not judged.
    sync = ours.get("native_threads_sync")
    if tcp and sync:
        results.add(Row("rr", "(backend thread) native-server seq rt/s vs trio TCP echo",
                        sync.seq_rate, tcp.seq_rate, "/s", ">= 0.33x", "info",
                        "manifest engine.backend = thread (handlers in the node process), "
                        "not the default; client: SyncRpcClient"))
    for key, setting, _ in _native_variants():
        fig = ours.get(key)
        if fig is not None and 256 in fig.inflight:
            rate = fig.inflight[256]
            results.add(Row("rr", f"({setting}) native-server 256 in flight/s", rate, 10_000.0,
                            "/s", "> 10,000/s", "info",
                            f"manifest engine.{setting.replace(' ', ' = ')}, not the default; "
                            f"{'above' if rate > 10_000 else 'below'} 10,000/s"))


def _native_variants() -> list[tuple[str, str, Callable]]:
    """(figures key, manifest setting, measurement) of the opt-in native-server rows."""
    return [("native_concurrent", f"concurrency {engine.CONCURRENT}", engine.native_server_concurrent),
            ("native_no_prefetch", f"prefetch {engine.NO_PREFETCH}",
             engine.native_server_no_prefetch),
            ("native_threads", "backend thread", engine.native_server_threads)]


def _cote_reqrep(settings: Settings, results: Results) -> tuple[RRFigures | None, str | None]:
    """cote's request-response figures, measured once per run (rr or mesh, whichever
    comes first); (figures, None) or (None, why there are none)."""
    if "cote_reqrep" not in results.figures:
        fig, why = None, _cote_reason(settings, results)
        if why is None:
            out, why = _measure("cote Requester/Responder (node)", cote.reqrep, settings)
            if out:
                fig, results.figures["cote_reqrep_rss_mb"] = out
        results.figures["cote_reqrep"], results.figures["cote_reqrep_why"] = fig, why
    return results.figures["cote_reqrep"], results.figures["cote_reqrep_why"]


def _cote_reason(settings: Settings, results: Results) -> str | None:
    """None when cote can run, else why its columns are skipped (installs on first use)."""
    if "cote_reason" in results.figures:
        return results.figures["cote_reason"]
    reason = None
    if not settings.cote:
        reason = "skipped: cote disabled (--quick / --no-cote)"
    else:
        try:
            results.figures["cote_version"] = cote.ensure_installed()
        except cote.CoteUnavailable as exc:
            reason = f"skipped: {exc}"
    results.figures["cote_reason"] = reason
    return reason


# -- 2. mesh ----------------------------------------------------------------------------

def family_mesh(settings: Settings, results: Results) -> dict[str, RRFigures | str]:
    systems: dict[str, RRFigures | str] = {}
    reason = mesh.available()
    ours = None
    if reason is None:
        out, err = _measure("mesh Requester->Responder", mesh.reqrep, settings)
        if out:
            ours, memory = out
            results.figures["mesh_memory"] = memory
            _leak_row(results, "mesh responder", memory["responder_after_warmup"],
                      memory["responder_after_run"])
            results.add(Row("pool", "idle mesh component (Responder) RSS MB",
                            memory["idle_responder"], _cote_rss(results), "MB", "< 30 MB",
                            verdict(memory["idle_responder"] < 30)))
        systems["mesh Req/Resp"] = ours or err
    else:
        systems["mesh Req/Resp"] = reason
    results.figures["rr:mesh"] = systems["mesh Req/Resp"]

    cote_reason = _cote_reason(settings, results)
    cote_fig, why = _cote_reqrep(settings, results) if ours is not None else (None, None)
    if ours is None:
        results.add(skip("mesh", "mesh req/resp vs cote", str(systems["mesh Req/Resp"])))
    elif cote_fig is None:
        results.add(Row("mesh", "mesh req/resp vs cote", ours.seq_rate, verdict="SKIP",
                        note=why or "no cote figures"))
    else:
        systems["cote Req/Resp"] = cote_fig  # measured here when family rr did not run
        _head_to_head_rows(settings, results)

    # publish/subscribe: a few runs of each, taking turns, medians compared (one run
    # each swung the ratio from 1.65x to 3.26x as the machine's load moved)
    rounds = 1 if settings.quick else PUBSUB_ROUNDS
    ours_ps: list[dict] = []
    cote_ps: list[dict] = []
    for i in range(rounds):
        for runs, why, label, measure, key in (
                (ours_ps, reason, "mesh Publisher->Subscriber", mesh.pubsub, "mesh_pubsub_error"),
                (cote_ps, cote_reason, "cote Publisher->Subscriber (node)", cote.pubsub,
                 "cote_pubsub_error")):
            if why is None:
                out, err = _measure(f"{label} ({i + 1}/{rounds})", measure, settings)
                if out:
                    runs.append(out)
                else:
                    results.figures.setdefault(key, err)
    results.figures["mesh_pubsub"], results.figures["cote_pubsub"] = ours_ps, cote_ps
    if not ours_ps:
        results.add(skip("mesh", "pub/sub delivered msg/s vs cote",
                         reason or str(results.figures.get("mesh_pubsub_error"))))
        return systems
    ours_rate = median([r["rate"] for r in ours_ps])
    base = median([r["rate"] for r in cote_ps]) if cote_ps else None
    if base:
        note = (f"medians of {len(ours_ps)} runs each, taking turns (ours {_span(ours_ps)}/s, "
                f"cote's {_span(cote_ps)}/s)")
    else:
        note = cote_reason or str(results.figures.get("cote_pubsub_error", "no cote figures"))
    results.add(Row("mesh", "pub/sub delivered msg/s vs cote", ours_rate, base, "/s",
                    ">= 2.00x", verdict(ours_rate >= 2 * base) if base else "SKIP", note))
    lost = max(r["lost"] for r in ours_ps)
    results.add(Row("mesh", "pub/sub messages lost (worst run)", lost,
                    max(r["lost"] for r in cote_ps) if cote_ps else None, "", "0",
                    verdict(lost == 0)))
    return systems


def _span(runs: list[dict]) -> str:
    rates = [r["rate"] for r in runs]
    return f"{min(rates):,.0f}-{max(rates):,.0f}"


def _head_to_head_rows(settings: Settings, results: Results) -> None:
    """The mesh targets against cote: medians of rounds taking turns, both sides kept
    running (single figures measured a minute apart swung across the targets as the
    machine's load moved)."""
    rounds, err = _measure(f"mesh vs cote, {settings.rounds} interleaved rounds",
                           mesh.head_to_head, settings)
    results.figures["mesh_head_to_head"] = rounds or err
    window = mesh.PIPELINE_WINDOW
    names = ("mesh seq rt/s vs cote", "mesh seq p99 us vs cote",
             "mesh seq CPU us per round trip vs cote",
             f"mesh {window} tasks awaiting send()/s vs cote {window} in flight",
             f"(send_many) mesh {window} in flight/s vs cote")
    if rounds is None:
        for name in names:
            results.add(Row("mesh", name, verdict="FAIL", note=err))
        return
    n = len(rounds["ours"])
    seq, cote_seq = rounds["ours_seq"], rounds["cote_seq"]
    ours_rate, cote_rate = median([r[0] for r in seq]), median([r[0] for r in cote_seq])
    ours_p99, cote_p99 = median([r[2] for r in seq]), median([r[2] for r in cote_seq])
    note = f"medians of {n} rounds taking turns"
    results.add(Row("mesh", names[0], ours_rate, cote_rate, "/s", ">= 1.30x",
                    verdict(ours_rate >= 1.3 * cote_rate), note))
    results.add(Row("mesh", names[1], ours_p99, cote_p99, "us", "< 1.00x",
                    verdict(ours_p99 < cote_p99), note))
    ours_cpu, cote_cpu = median(rounds["ours_seq_cpu_us"]), median(rounds["cote_seq_cpu_us"])
    results.add(Row("mesh", names[2], ours_cpu, cote_cpu, "us", "<= 1.00x",
                    verdict(ours_cpu <= cote_cpu),
                    f"{note}; requester + responder processes, every thread"))
    theirs = median(rounds["cote"])
    for name, key, target, how in (
            (names[3], "ours_callers", 1.5, f"{window} tasks each awaiting Requester.send(), "
                                            "the shape of cote's requester"),
            (names[4], "ours", 0.0, f"Requester.send_many, window {window}, one task")):
        ours = median(rounds[key])
        ratios = sorted(a / b for a, b in zip(rounds[key], rounds["cote"]))
        results.add(Row("mesh", name, ours, theirs, "/s", f">= {target:.2f}x" if target else "",
                        verdict(ours >= target * theirs) if target else "-",
                        f"{note}, {settings.duration:g} s each (round ratios "
                        f"{ratios[0]:.2f}-{ratios[-1]:.2f}x); {how}"))


def _cote_rss(results: Results) -> float | None:
    rss = results.figures.get("cote_reqrep_rss_mb")
    return rss["responder"] if rss else None


# -- 3. pool dynamics ----------------------------------------------------------------------

def family_pool(settings: Settings, results: Results) -> None:
    reason = pool.available()
    if reason is not None:
        results.add(skip("pool", "pool dynamics", reason))
        return
    if settings.quick:
        results.add(skip("pool", "pool dynamics (burst, retirement)", "skipped: --quick"))
        return
    out, err = _measure("pool: cold start, burst to 8, idle retirement", pool.pool_dynamics,
                        settings)
    results.figures["pool"] = out or err
    if out is None:
        results.add(Row("pool", "pool dynamics", verdict="FAIL", note=err))
        return
    results.add(Row("pool", "burst -> 8 slaves serving (s)", out["burst_to_limit_s"], None, "s",
                    "< 1 s", verdict(out["burst_to_limit_s"] < 1.0)))
    results.add(Row("pool", "cold slave start, fresh pool, submit->answer (s)",
                    out["cold_start_s"], None, "s"))
    results.add(Row("pool", "new slave in a running pool, submit->serving (s)",
                    out["new_slave_s"], None, "s", note="forked by the pool's zygote"))
    limit = pool.IDLE_TIMEOUT + 1.0
    results.add(Row("pool", f"idle retirement, idle-timeout {pool.IDLE_TIMEOUT:g} s (s)",
                    out["retired_after_s"], pool.IDLE_TIMEOUT, "s", f"<= {limit:g} s",
                    verdict(out["retired_after_s"] <= limit)))
    rss = out["idle_slave_rss_mb"]
    if rss:
        results.add(Row("pool", "idle slave RSS MB (largest)", max(rss), _cote_rss(results),
                        "MB", "< 30 MB", verdict(max(rss) < 30)))
    idle_node = results.figures.get("idle_node_rss_mb")
    if idle_node is not None:
        results.add(Row("pool", "idle node RSS MB (without slaves)", idle_node,
                        _cote_rss(results), "MB"))


# -- 4. streaming ------------------------------------------------------------------------

STREAM_TARGET = 0.4     # one app's streams against a two-process TCP copy
PIPELINE_TARGET = 0.7   # a two-stage pipeline against one app
STREAM_RSS_TARGET = 1.25  # peak RSS during the 1 GiB stream against before it


def family_streaming(settings: Settings, results: Results) -> None:
    memory = results.figures.get("control_memory") or {}
    ours = memory.get("stream_mb_s")
    if ours is None:
        results.add(skip("streaming", "streamed reply MB/s through one app",
                         "skipped: needs the engine control-path run (family rr)"))
    else:
        size = memory["stream_bytes"]
        base, err = _measure("trio TCP copy (2 processes)",
                             partial(baselines.trio_tcp_copy, total=size), settings)
        results.figures["tcp_copy_mb_s"] = base
        target = f">= {STREAM_TARGET:.2f}x"
        for name, rate in (("streamed reply MB/s, slave->node->client vs TCP copy", ours),
                           ("chunked request MB/s, client->node->slave vs TCP copy",
                            memory.get("upload_mb_s"))):
            if rate is not None:
                results.add(Row("streaming", name, rate, base, "MB", target,
                                verdict(rate >= STREAM_TARGET * base) if base else "FAIL",
                                err or "baseline: 64 KiB trio send_all -> receive_some() "
                                       "between two processes, best of 3"))
        rss = memory["stream_rss"]
        results.add(Row("streaming", f"peak RSS MB during a {size / 2**20:,.0f} MiB streamed "
                        "reply (node + slaves + client)", rss["total_peak"], rss["total_before"],
                        "MB", f"<= {STREAM_RSS_TARGET:.2f}x",
                        verdict(rss["total_peak"] <= STREAM_RSS_TARGET * rss["total_before"]),
                        "before -> peak: " + ", ".join(
                            f"{k} {rss[k + '_before']:.1f} -> {rss[k + '_peak']:.1f}"
                            for k in ("node", "slaves", "client"))))
    reason = engine.available()
    if reason is not None:
        results.add(skip("streaming", "streaming MB/s through a two-stage pipeline", reason))
        return
    out, err = _measure("two-stage pipeline (relay app -> echo app) and one app, taking turns",
                        engine.pipeline_rate, settings)
    results.figures["pipeline_mb_s"] = out
    if out is None:
        results.add(Row("streaming", "streaming MB/s, two-stage pipeline vs one app",
                        verdict="FAIL", note=err))
    else:
        piped, direct = out
        size = engine.STREAM_BYTES_QUICK if settings.quick else engine.PIPELINE_BYTES
        results.add(Row("streaming", "streaming MB/s, two-stage pipeline vs one app", piped,
                        direct, "MB", f">= {PIPELINE_TARGET:.2f}x",
                        verdict(piped >= PIPELINE_TARGET * direct),
                        f"client <- relay app <- echo app (engine.astream) against client <- "
                        f"echo app, same node, medians of "
                        f"{1 if settings.quick else engine.PIPELINE_ROUNDS} rounds "
                        f"taking turns, {size / 2**20:,.0f} MiB each"))


def family_sockend(settings: Settings, results: Results) -> dict[str, RRFigures | str]:
    reason = sockend.available() or mesh.available()
    if reason is not None:
        results.add(skip("sockend", "sockend websocket rt/s, fan-out to 100 clients", reason))
        return {"sockend websocket": reason}
    out, err = _measure("sockend: websocket requests, fan-out to 100", sockend.sockend_bench,
                        settings)
    results.figures["sockend"] = out or err
    if out is None:
        results.add(Row("sockend", "sockend websocket requests", verdict="FAIL", note=err))
        return {"sockend websocket": err}
    rr = out["rr"]
    mesh_fig = results.figures.get("rr:mesh")
    base = mesh_fig.seq_rate if isinstance(mesh_fig, RRFigures) else None
    if isinstance(rr, RRFigures):
        results.add(Row("sockend", "sockend websocket seq rt/s vs mesh Requester", rr.seq_rate,
                        base, "/s"))
    else:
        results.add(Row("sockend", "sockend websocket requests", verdict="FAIL", note=str(rr)))
    fan = out["fanout"]
    if isinstance(fan, dict):
        results.add(Row("sockend", f"sockend fan-out deliveries/s to {fan['clients']} clients",
                        fan["deliveries_per_s"], note=f"{fan['received']:,} of "
                        f"{fan['events'] * fan['clients']:,} delivered, {fan['skipped']:,} skipped"))
        results.add(Row("sockend", "sockend fan-out events missed", fan["missed"], None, "", "0",
                        verdict(fan["missed"] == 0)))
    else:
        results.add(Row("sockend", "sockend fan-out", verdict="FAIL", note=str(fan)))
    return {"sockend websocket": rr}


# -- 6. languages ----------------------------------------------------------------------------

def family_languages(settings: Settings, results: Results) -> dict[str, RRFigures | str]:
    """Each language's slaves against the Python slave's, measured in this run."""
    out, err = _measure("languages: python, nodejs, perl slaves (conformance app echo)",
                        languages.all_languages, settings)
    if out is None:
        results.add(Row("languages", "slaves in other languages", verdict="FAIL", note=err))
        return {}
    python = out.get("python")
    top = max(settings.inflight)
    for language in ("nodejs", "perl"):
        fig = out.get(language)
        if not isinstance(fig, RRFigures):
            results.add(skip("languages", f"{language} slave echo", str(fig)))
            continue
        base = python if isinstance(python, RRFigures) else None
        results.add(Row("languages", f"{language} slave seq rt/s vs python slave", fig.seq_rate,
                        base.seq_rate if base else None, "/s", note="through a node, 2 slaves"))
        results.add(Row("languages", f"{language} slave {top} in flight /s vs python slave",
                        fig.inflight.get(top), base.inflight.get(top) if base else None, "/s"))
    return {f"{lang} slaves (node)": fig for lang, fig in out.items()}


# -- main ---------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny workload, no cote, no pool burst (a smoke run)")
    ap.add_argument("--no-cote", action="store_true", help="skip the node/cote baseline")
    ap.add_argument("--only", default=",".join(FAMILIES),
                    help=f"comma-separated families (default all: {','.join(FAMILIES)})")
    ap.add_argument("--json", default=str(RESULTS_JSON), help="where to write the results")
    ns = ap.parse_args(argv)
    ns.families = [f.strip() for f in ns.only.split(",") if f.strip()]
    unknown = set(ns.families) - set(FAMILIES)
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}; choose from {','.join(FAMILIES)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    settings = Settings.quick_mode() if args.quick else Settings()
    if args.no_cote:
        settings = replace(settings, cote=False)
    info = machine()
    print(f"engine-trio bench: {info['date']}, {info['cores']} cores ({info['cpu']}), "
          f"load {info['load_avg'][0]:.2f}, python {info['python']}, node {info['node']}")
    t0 = time.perf_counter()
    results = Results()
    results.figures["bench_rss_start_mb"] = rss_mb()
    systems: dict[str, RRFigures | str] = {}
    if "rr" in args.families:
        systems.update(family_rr(settings, results))
    if "mesh" in args.families:
        systems.update(family_mesh(settings, results))
    if "pool" in args.families:
        family_pool(settings, results)
    if "streaming" in args.families:
        family_streaming(settings, results)
    if "sockend" in args.families:
        systems.update(family_sockend(settings, results))
    if "sockend-sio" in args.families:   # cote's Sockend and ours, one socket.io client
        systems.update(sockend_sio_rows.family_sockend_sio(settings, results, _measure,
                                                           _cote_reason))
    if "timing" in args.families:
        timing.family_timing(settings, results, _measure)
    if "languages" in args.families:
        systems.update(family_languages(settings, results))
    if "peers" in args.families:
        systems.update(jobqueues.family_peers(settings, results, _measure))
    results.figures["bench_rss_end_mb"] = rss_mb()
    info["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"\nrequest-response, {len(PAYLOAD)}-byte payload, loopback:")
    print_rr_table(systems, settings.inflight)
    print("\ncomparisons (ratio = ours / baseline):")
    print_rows(results.rows)
    path = write_json(results, info, Path(args.json))
    written = [str(path)]
    if not settings.quick:   # the committed copies: never from a smoke run (make test)
        written += map(str, publish(json.loads(path.read_text())))
    print_summary([r.as_dict() for r in results.rows],
                  f" in {info['seconds']} s; results in {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
