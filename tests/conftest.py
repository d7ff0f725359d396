"""Test-suite configuration: hypothesis profiles.

``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) is bounded and derandomized, so CI runs
are reproducible and fit the budget; ``dev`` is the default; ``long`` explores far more
(``HYPOTHESIS_PROFILE=long python3 -m pytest tests/core tests/server tests/trio``).

The core state machine and the fuzzers take three times the profile's examples; the
simulation in tests/trio/test_sim.py runs 12 seeds (200 under ``long``; ``ROOMBUS_SIM_SEEDS=n`` or
``ROOMBUS_SIM_SEED=s`` to choose). See docs/testing.md.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
