"""The benchmark suite runs end to end (``python -m bench --quick``): it completes,
prints its tables and writes its JSON.  No timing is asserted here: figures on a
shared machine are for bench/README.md, not for pass/fail."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_completes_and_reports(tmp_path):
    out_json = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "request-response, 32-byte payload" in out
    assert "trio TCP echo" in out and "pynng Req/Rep" in out
    assert "comparisons (ratio = ours / baseline):" in out
    assert "skipped: cote disabled" in out          # --quick never runs npm/node
    doc = json.loads(out_json.read_text())
    names = [row["name"] for row in doc["rows"]]
    assert any(n.startswith("streaming") for n in names)
    assert all(row["verdict"] in ("PASS", "FAIL", "SKIP", "info", "-") for row in doc["rows"])
    # The baselines were measured, whatever else is missing.
    tcp = doc["figures"]["rr:trio TCP echo"]
    assert tcp["seq_rate"] > 0 and tcp["inflight"]["16"] > 0
