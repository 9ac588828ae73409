"""The rows of family ``sockend-sio`` (``python -m bench --only sockend-sio``): cote's
Sockend against ours through the same socket.io-client, measured by bench/sockend_sio.py.

Target: ours / cote >= 2.00x on sequential requests, on 100 requests in flight and on
fan-out deliveries/s to 100 and to 1,000 clients, with no event lost.  A side without a
figure is said why: cote's side needs node and npm (and is off under ``--quick`` and
``--no-cote``, as every cote column); ours is ``SKIP`` while ``python -m sockend`` has no
Socket.IO endpoint (the Engine.IO handshake on /socket.io/ is probed first), ``FAIL``
with what the client saw when it has one and it fails.
"""
from __future__ import annotations

from typing import Any, Callable

from .harness import Results, Row, RRFigures, Settings, median, verdict
from .sockend_sio import CONNS, FANOUT, WINDOW, compare

FAMILY = "sockend-sio"
TARGET = 2.0
NAMES = ("sockend socket.io seq rt/s vs cote Sockend",
         f"sockend socket.io {WINDOW} in flight/s vs cote Sockend",
         *(f"sockend socket.io fan-out to {c:,} clients, deliveries/s vs cote"
           for c, _, _ in FANOUT),
         "sockend socket.io fan-out events lost (all sizes)")


def summary(side: dict[str, Any]) -> dict[str, Any]:
    """Medians of a side's request rounds ({} when there are none)."""
    runs = side.get("requests") or []
    if not runs:
        return {}

    def med(fn: Callable[[dict], float]) -> float:
        return median([fn(r) for r in runs])

    return {"seq_rate": med(lambda r: r["seq"]["rate"]), "p50_us": med(lambda r: r["seq"]["p50_us"]),
            "p99_us": med(lambda r: r["seq"]["p99_us"]),
            "inflight": med(lambda r: r["inflight"]["rate"]),
            "cpu_us": {role: med(lambda r: r["cpu_us_per_request"][role])
                       for role in ("sockend", "responder", "client")},
            "rounds": len(runs)}


def family_sockend_sio(settings: Settings, results: Results, measure: Callable,
                       cote_reason: Callable) -> dict[str, RRFigures | str]:
    """Measure both sides (``measure`` is bench.__main__._measure), add the rows; the
    two sides' request figures for the rr table."""
    why = cote_reason(settings, results)   # node + npm: cote and the socket.io pair
    if why is not None:
        for name in NAMES:
            results.add(Row(FAMILY, name, target=_target(name), verdict="SKIP", note=why))
        return {"cote Sockend (socket.io)": why}
    out, err = measure("sockend socket.io: cote's Sockend and ours, taking turns", compare,
                       settings)
    results.figures["sockend_sio"] = out or err
    if out is None:
        for name in NAMES:
            results.add(Row(FAMILY, name, target=_target(name), verdict="FAIL", note=err))
        return {"cote Sockend (socket.io)": err}
    cote, ours = out["cote"], out["ours"]
    skipped = (f"skipped: our Sockend has no Socket.IO endpoint ({ours['unavailable']})"
               if "unavailable" in ours else None)
    ours_why = skipped or ours.get("error")     # no request figures of ours: why
    c, o = summary(cote), summary(ours)
    _judged(results, NAMES[0], o.get("seq_rate"), c.get("seq_rate"), "/s", ours_why,
            cote.get("error"), f"medians of {c.get('rounds', 0)} rounds taking turns; one "
            "socket, emit with ack, await, repeat")
    _judged(results, NAMES[1], o.get("inflight"), c.get("inflight"), "/s", ours_why,
            cote.get("error"), f"{WINDOW} emits outstanding over {CONNS} sockets, "
            f"{settings.duration:g} s")
    if o and c:
        results.add(Row(FAMILY, "(p99) sockend socket.io seq p99 us vs cote Sockend",
                        o["p99_us"], c["p99_us"], "us",
                        note=f"p50 {o['p50_us']:.0f} vs {c['p50_us']:.0f} us"))
        split = "; ".join(f"{side} Sockend {f['cpu_us']['sockend']:.0f} + Responder "
                          f"{f['cpu_us']['responder']:.0f}, client {f['cpu_us']['client']:.0f}"
                          for side, f in (("ours", o), ("cote", c)))
        results.add(Row(FAMILY, "(cpu) sockend socket.io server CPU us per request vs cote",
                        o["cpu_us"]["sockend"] + o["cpu_us"]["responder"],
                        c["cpu_us"]["sockend"] + c["cpu_us"]["responder"], "us",
                        note=f"{split}; over every request of a run (warm-up, sequential, in "
                             "flight); our mesh polls while a lone request is out"))
    lost_ours = lost_cote = 0
    for (clients, _, _), name in zip(FANOUT, NAMES[2:]):
        fo, fc = ours["fanout"].get(clients, {}), cote["fanout"].get(clients, {})
        lost_ours += fo.get("lost", 0) + fo.get("warm_lost", 0)
        lost_cote += fc.get("lost", 0) + fc.get("warm_lost", 0)
        note = "; ".join(f"{side}: {f['events']:,} events x {clients:,} clients, "
                         f"{f['received']:,} delivered, {f['lost']:,} lost, Sockend "
                         f"{f['sockend_cpu_us_per_delivery']:.1f} us CPU per delivery, client "
                         f"at {f['client_cpu_share']:.0%} of a core"
                         for side, f in (("ours", fo), ("cote", fc)) if "received" in f)
        _judged(results, name, fo.get("deliveries_per_s"), fc.get("deliveries_per_s"), "/s",
                skipped or fo.get("error") or ours.get("error"), fc.get("error"), note,
                ok=not (fo.get("lost") or fo.get("warm_lost")))
        if "received" in fo and "received" in fc:
            # On 2 cores one load client counts ~300,000-450,000 deliveries/s at most: when
            # it runs at a full core, deliveries/s measure it, and the server's own cost
            # per delivery is what tells the two Sockends apart.
            results.add(Row(FAMILY, f"(cpu) fan-out to {clients:,}: Sockend CPU us per delivery vs cote",
                            fo["sockend_cpu_us_per_delivery"], fc["sockend_cpu_us_per_delivery"], "us",
                            note="lower is better; the load client at "
                                 f"{fo['client_cpu_share']:.0%} (ours) and {fc['client_cpu_share']:.0%} "
                                 "(cote) of a core"))
    failed = [f"{n:,} clients: {ours['fanout'].get(n, {}).get('error', ours.get('error'))}"
              for n, _, _ in FANOUT if "received" not in ours["fanout"].get(n, {})]
    if skipped:
        results.add(Row(FAMILY, NAMES[-1], None, lost_cote, "", "0", "SKIP", skipped))
    else:   # judged on what was measured; a size without figures fails it
        measured = len(failed) < len(FANOUT)
        results.add(Row(FAMILY, NAMES[-1], lost_ours if measured else None, lost_cote, "", "0",
                        verdict(lost_ours == 0 and not failed), "; ".join(failed)))
    return {name: (RRFigures(f["seq_rate"], f["p50_us"], f["p99_us"], {WINDOW: f["inflight"]})
                   if f else str(side.get("error") or side.get("unavailable") or "no figures"))
            for name, f, side in (("cote Sockend (socket.io)", c, cote),
                                  ("sockend socket.io", o, ours))}


def _target(name: str) -> str:
    return "0" if name == NAMES[-1] else f">= {TARGET:.2f}x"


def _judged(results: Results, name: str, ours: float | None, cote: float | None, unit: str,
            ours_why: str | None, cote_why: str | None, note: str, ok: bool = True) -> None:
    """One ``>= 2.00x`` row: SKIP/FAIL with the reason when a side has no figure; ``ok``
    False (events lost) fails it whatever the ratio."""
    target = _target(name)
    if cote is None:
        results.add(Row(FAMILY, name, ours, None, unit, target, "FAIL",
                        f"cote: {cote_why or 'no figures'}"))
    elif ours is None:
        why = ours_why or "no figures"
        results.add(Row(FAMILY, name, None, cote, unit, target,
                        "SKIP" if why.startswith("skipped") else "FAIL",
                        why if why.startswith("ours") else f"ours: {why}"))
    else:
        results.add(Row(FAMILY, name, ours, cote, unit, target,
                        verdict(ours >= TARGET * cote and ok), note))
