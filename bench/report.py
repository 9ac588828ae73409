"""Printing the tables and writing ``bench/.peers/results.json``."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .harness import PEERS_DIR, Results, Row, RRFigures, fmt

RESULTS_JSON = PEERS_DIR / "results.json"


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    node = None
    if shutil.which("node"):
        try:
            node = subprocess.run(["node", "--version"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg(),
        "kernel": platform.release(), "python": platform.python_version(), "node": node,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
    }


def print_rr_table(systems: dict[str, RRFigures | str], inflight: tuple[int, ...]) -> None:
    """One line per system: sequential rate, latency, throughput per in-flight level."""
    heads = ["system", "seq rt/s", "p50 us", "p99 us", *[f"{k} in flight/s" for k in inflight]]
    lines = []
    for name, fig in systems.items():
        if isinstance(fig, str):
            lines.append([name, fig])
            continue
        lines.append([name, fmt(fig.seq_rate), fmt(fig.p50_us), fmt(fig.p99_us),
                      *[fmt(fig.inflight.get(k)) for k in inflight]])
    _print(heads, lines)


FAMILY_ORDER = ("rr", "mesh", "pool", "leak", "streaming", "sockend", "languages", "peers")


def print_rows(rows: list[Row]) -> None:
    """The comparison table, grouped by family (a stable sort keeps measuring order)."""
    rows = sorted(rows, key=lambda r: FAMILY_ORDER.index(r.family)
                  if r.family in FAMILY_ORDER else len(FAMILY_ORDER))
    heads = ["name", "ours", "baseline", "ratio", "target", "verdict"]
    lines = []
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        verdict = r.verdict + (f"  ({r.note})" if r.note else "")
        lines.append([r.name, fmt(r.ours, r.unit), fmt(r.baseline, r.unit), ratio, r.target,
                      verdict])
    _print(heads, lines)


def _print(heads: list[str], lines: list[list[str]]) -> None:
    widths = [len(h) for h in heads]
    for line in lines:
        if len(line) == len(heads):
            widths = [max(w, len(c)) for w, c in zip(widths, line)]
    # The last column (verdict + note) is left ragged: notes can be long.
    def render(cells: list[str]) -> str:
        if len(cells) != len(heads):
            return f"{cells[0]:<{widths[0]}}  " + "  ".join(cells[1:])
        out = [f"{cells[0]:<{widths[0]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[1:-1], widths[1:-1])]
        out.append(cells[-1])
        return "  ".join(out)
    print(render(heads))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(render(line))
    sys.stdout.flush()


def write_json(results: Results, info: dict[str, Any], path: Path = RESULTS_JSON) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "rows": [r.as_dict() for r in results.rows],
           "figures": results.figures}
    path.write_text(json.dumps(doc, indent=1, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, RRFigures):
        return value.as_dict()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
