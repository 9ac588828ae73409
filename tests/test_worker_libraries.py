"""The worker libraries' own tests, run by `make test`: the Node.js one's unit tests
(workers/js/test: its session state machine, rule for rule against
tests/test_protocol.py's slave side) through node's test runner, and the Perl one's
(workers/perl/t: a node played over a socketpair, the docs/protocol.md session byte for
byte) through `prove`.  End to end both are held by tests/conformance/."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from engine import languages

JS = Path(__file__).parents[1] / "workers" / "js"
PERL = Path(__file__).parents[1] / "workers" / "perl"


@pytest.mark.e2e   # starts node
def test_the_js_worker_unit_tests_pass():
    missing = languages.get("nodejs").missing()
    if missing:
        pytest.skip(f"nodejs: {missing}")
    tests = sorted(str(p) for p in (JS / "test").glob("*.test.js"))
    assert tests, "workers/js/test has no tests"
    done = subprocess.run([shutil.which("node") or "node", "--test", *tests], cwd=JS,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout


@pytest.mark.e2e   # starts perl workers
def test_the_perl_worker_tests_pass():
    if shutil.which("prove") is None or subprocess.run(
            ["perl", "-MData::MessagePack", "-e", "1"], capture_output=True).returncode:
        pytest.skip("perl, prove or Data::MessagePack (libdata-messagepack-perl) missing")
    done = subprocess.run(["prove", "t/"], cwd=PERL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Result: PASS" in done.stdout
