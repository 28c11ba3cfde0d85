"""The benchmark suite runs end to end (``--quick`` sizes: a smoke test; figures are quoted from ``make bench``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_suite_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["machine"]["cores"] >= 1
    benchmarks = {figure["benchmark"] for figure in results["figures"]}
    assert benchmarks == {"embed", "tcav", "nmf", "net2vec", "similarity", "memory", "controls", "decode", "ray"}
    for figure in results["figures"]:
        assert math.isfinite(figure["value"]) and figure["value"] >= 0, figure
        assert (figure["target"] is None) == (figure["passed"] is None), figure
    score_gap = next(f for f in results["figures"] if f["benchmark"] == "tcav" and "captum" in f["name"] and f["unit"] != "×")
    assert score_gap["value"] <= 1e-6  # the same CAVs give captum's scores exactly
    assert "embed" in done.stdout and "results in" in done.stdout
