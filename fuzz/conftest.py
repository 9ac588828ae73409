"""The fuzzers' budgets: hypothesis profiles.

- ``ci`` (the default, what ``make test`` runs): hypothesis's usual 100 examples per
  test (the fuzzers that cost a trio run or a state machine per example take a share
  of it, ``settings.default.max_examples // n`` in their module), no deadline (the
  machine is shared: a slow example is load, not a bug).  All of ``fuzz/`` takes well
  under a minute on 2 cores.
- ``long`` (``make fuzz``): 5,000 examples per test, the same shares; minutes.

Pick one with ``HYPOTHESIS_PROFILE=long`` or ``pytest --hypothesis-profile=long``
(the option wins: hypothesis's plugin loads it after this file).  A failure hypothesis
finds is kept as an ``@example`` or a pinned test beside the property it broke, so the
short budget replays it for ever.

The profile is loaded for the whole pytest run, so ``tests/`` sees it too: ``ci``
keeps hypothesis's default number of examples for them, and their own ``@settings``
still win.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# The one ``wait_until`` (tests/support.py) serves the fuzzers that run a server too.
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=100, deadline=None,
                          suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("long", max_examples=5_000, deadline=None,
                          suppress_health_check=_SLOW_IS_FINE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
