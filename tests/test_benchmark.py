"""The benchmark runs and prints its figures (a small run: no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from testkit.processes import ROOT

pytestmark = pytest.mark.broker


def test_benchmark_runs_small_and_reports_every_figure():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--records",
            "20000",
            "--runs",
            "1",
            "--minutes",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("median raw consume rate", "median processor rate", "median ratio (b/a)", "median peak RSS"):
        assert re.search(rf"{re.escape(label)}\s+[\d,.]+", out), f"{label} missing:\n{out}"
    for stage in ("consume", "parse", "dead_letter", "aggregate", "publish"):
        assert re.search(rf"^\s+{stage}\s+[\d.]+s", out, re.MULTILINE), f"stage {stage} missing:\n{out}"
    windows = int(re.search(r"(\d+) windows \|", out).group(1))
    assert f"windows {windows}" in out  # every window of the workload was published
    group = re.search(r"2 processors in one group:\s+([\d,]+) records/s in all = ([\d.]+) x", out)
    assert group and int(group.group(1).replace(",", "")) > 0, out
    assert re.search(r"realistic \| +(native|pure) \| +[\d,]+ \|", out), out  # the part size table
