"""Printing the tables and the summary, writing ``bench/.peers/results.json`` and, after a
real (not ``--quick``) run, the committed ``bench/results.json`` and ``bench/results.svg``."""
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


# -- issue #18: the summary, the committed results.json and the chart ---------------------

PUBLISHED_JSON = Path(__file__).resolve().parent / "results.json"   # committed after a real run
PUBLISHED_SVG = Path(__file__).resolve().parent / "results.svg"
JUDGED = ("PASS", "FAIL", "SKIP")


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows judged against a target (PASS/FAIL/SKIP), as dicts (``Row.as_dict``)."""
    rows = [r for r in rows if r.get("verdict") in JUDGED]
    return sorted(rows, key=lambda r: FAMILY_ORDER.index(r["family"])
                  if r.get("family") in FAMILY_ORDER else len(FAMILY_ORDER))


def print_summary(rows: list[dict[str, Any]], tail: str = "") -> None:
    """One line per target row: name, ours, baseline, ratio, target, verdict; then the
    count line (``tail`` appended to it)."""
    lines = []
    for r in target_rows(rows):
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        lines.append([r["name"], fmt(r.get("ours"), r.get("unit", "")),
                      fmt(r.get("baseline"), r.get("unit", "")), ratio, r.get("target") or "-",
                      r["verdict"]])
    print("\nsummary (targets):")
    _print(["target", "ours", "baseline", "ratio", "target", "verdict"], lines)
    counts = {v: sum(r.get("verdict") == v for r in rows) for v in JUDGED}
    print(f"{counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skipped{tail}")
    sys.stdout.flush()


def _bar(row: dict[str, Any]) -> tuple[float, float, str] | None:
    """(value, target line, axis label) of one target row on a ratio axis, or None.

    A target in "x" (">= 0.33x") is drawn as the ratio against that line; a target in
    units ("> 10,000/s", "< 30 MB") as ours / that figure against 1."""
    target = (row.get("target") or "").replace(",", "")
    number = "".join(c for c in target if c.isdigit() or c == ".").strip(".")
    try:
        line = float(number)
    except ValueError:
        return None
    if target.rstrip().endswith("x"):
        ratio = row.get("ratio")
        return (ratio, line, "ours / baseline") if ratio else None
    ours = row.get("ours")
    if not line or not ours:
        return None
    return ours / line, 1.0, "ours / target"


def _latencies(figures: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(system, p50 us, p99 us) of every request-response system and job-queue peer."""
    out = []
    versions = figures.get("peers_versions") or {}
    for key, fig in figures.items():
        if key.startswith("peers:") and isinstance(fig, dict):
            name = key[6:]
            key, fig = f"{name.capitalize()} {versions.get(name, '')}".strip(), fig.get("figures")
        elif key.startswith("rr:"):
            key = key[3:]
        else:
            continue
        if isinstance(fig, dict) and fig.get("p50_us") and fig.get("p99_us"):
            out.append((key, float(fig["p50_us"]), float(fig["p99_us"])))
    return out


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_svg(doc: dict[str, Any]) -> str:
    """The chart of a results document (what ``write_json`` writes), as SVG text: each
    target row's ratio on a log axis against its target line (PASS green, FAIL red), then
    p50/p99 latencies of the request-response systems (log axis, µs).  Pure: no I/O."""
    import math
    rows = target_rows(doc.get("rows", []))
    bars = [(r, _bar(r)) for r in rows]
    lats = _latencies(doc.get("figures", {}))
    width, left, plot_w, bar_h = 1080, 540, 420, 22
    colour = {"PASS": "#2e9d4a", "FAIL": "#d1372e", "SKIP": "#9a9a9a"}
    out: list[str] = []
    grid: list[str] = []           # drawn first, under the bars
    y = 30
    machine_ = doc.get("machine", {})
    title = (f"engine-trio bench, {machine_.get('date', '?')}: "
             f"{machine_.get('cores', '?')} cores, {machine_.get('command', '')}")
    out.append(f'<text x="10" y="{y}" font-size="15" font-weight="bold">{_esc(title)}</text>')
    y += 26
    out.append(f'<text x="10" y="{y}" font-size="13">Targets: ratio on a log axis; black tick '
               f'= the target; green PASS, red FAIL, grey SKIP</text>')
    y += 16
    values = [v for _, b in bars if b for v in b[:2] if v > 0] or [1.0]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    if hi / lo < 10:
        hi = lo * 10

    def xpos(v: float) -> float:
        v = min(max(v, lo), hi)
        return left + plot_w * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    top = y
    for r, b in bars:
        cy = y + bar_h / 2 + 4
        name = r["name"] if len(r["name"]) <= 80 else r["name"][:78] + "…"
        out.append(f'<text x="{left - 8}" y="{cy}" font-size="12" text-anchor="end">'
                   f'{_esc(name)}</text>')
        if b is None:
            out.append(f'<text x="{left + 4}" y="{cy}" font-size="12" fill="#666">'
                       f'{_esc(r["verdict"])}: target {_esc(r.get("target") or "-")}, '
                       f'ours {_esc(fmt(r.get("ours"), r.get("unit", "")))}</text>')
        else:
            value, line, _ = b
            x0 = xpos(lo)
            out.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(xpos(value) - x0, 1):.1f}" '
                       f'height="{bar_h - 6}" fill="{colour.get(r["verdict"], "#999")}"/>')
            tx = xpos(line)
            out.append(f'<line x1="{tx:.1f}" y1="{y}" x2="{tx:.1f}" y2="{y + bar_h}" '
                       f'stroke="black" stroke-width="2"/>')
            out.append(f'<text x="{xpos(hi) + 6}" y="{cy}" font-size="12">{value:.2f}x '
                       f'{_esc(r["verdict"])}</text>')
        y += bar_h
    decade = lo
    while decade <= hi * 1.0001:
        x = xpos(decade)
        grid.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}" stroke="#ccc" '
                   f'stroke-dasharray="3,3"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 14}" font-size="11" text-anchor="middle">'
                   f'{decade:g}x</text>')
        decade *= 10
    y += 40
    if lats:
        out.append(f'<text x="10" y="{y}" font-size="13">Request-response latency, µs '
                   f'(log axis): p50 dark, p99 light</text>')
        y += 16
        lat_lo = 10 ** math.floor(math.log10(min(p50 for _, p50, _ in lats)))
        lat_hi = 10 ** math.ceil(math.log10(max(p99 for _, _, p99 in lats)))

        def lpos(v: float) -> float:
            return left + plot_w * (math.log10(v) - math.log10(lat_lo)) / (
                math.log10(lat_hi) - math.log10(lat_lo))

        top = y
        for name, p50, p99 in lats:
            cy = y + bar_h / 2 + 4
            out.append(f'<text x="{left - 8}" y="{cy}" font-size="12" text-anchor="end">'
                       f'{_esc(name)}</text>')
            x0 = lpos(lat_lo)
            out.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{lpos(p99) - x0:.1f}" '
                       f'height="{bar_h - 6}" fill="#9cc3e6"/>')
            out.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{lpos(p50) - x0:.1f}" '
                       f'height="{bar_h - 6}" fill="#2f6fae"/>')
            out.append(f'<text x="{lpos(lat_hi) + 6}" y="{cy}" font-size="12">'
                       f'{p50:,.0f} / {p99:,.0f}</text>')
            y += bar_h
        decade = lat_lo
        while decade <= lat_hi * 1.0001:
            x = lpos(decade)
            grid.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{y}" stroke="#ccc" '
                       f'stroke-dasharray="3,3"/>')
            out.append(f'<text x="{x:.1f}" y="{y + 14}" font-size="11" text-anchor="middle">'
                       f'{decade:,g}</text>')
            decade *= 10
        y += 30
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(grid + out) + "\n</svg>\n")


def publish(doc: dict[str, Any], json_path: Path = PUBLISHED_JSON,
            svg_path: Path = PUBLISHED_SVG) -> tuple[Path, Path]:
    """Write the committed ``bench/results.json`` and ``bench/results.svg`` of a real run."""
    json_path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    svg_path.write_text(render_svg(json.loads(json_path.read_text())))
    return json_path, svg_path


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report --from bench/.peers/results.json``: print the summary of a
    saved run and (re)write bench/results.json and bench/results.svg from it."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    ap.add_argument("--from", dest="source", default=str(RESULTS_JSON),
                    help="a results.json written by python -m bench")
    ap.add_argument("--no-write", action="store_true", help="print the summary only")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.source).read_text())
    print_summary(doc.get("rows", []))
    if not args.no_write:
        for path in publish(doc):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
