"""The short soak (benchmarks/chaos_soak.py): kill -9 at random steps, a SIGTERM, a corrupted
newest checkpoint, an LR spike and a NaN in one run, restarted after each fault; the result
matches the undisturbed run bit for bit."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_short_soak_matches_the_undisturbed_run(small_corpus, tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from chaos_soak import soak
    finally:
        sys.path.pop(0)
    report = soak(str(small_corpus), tmp_path, kills=2, steps=44, seed=1, timeout=400)
    assert report["faults_injected"] >= 2 and report["restarts"] >= 2, report
    assert report["metrics_match"], report
    assert report["params_match"], report
    kinds = {e["signal"] for e in report["events"]}
    assert kinds == {"SIGKILL", "SIGTERM"}, report
    steps = [(r["step"], r["reason"].split()[0]) for r in report["rollbacks"]]
    assert steps[0] == (24, "loss") and steps[-1][1] == "loss", steps  # the spike, the NaN
