"""The test command itself: a run that selects no test must fail, in CI and locally.

pytest exits 5 when it collects nothing (a typo in `-k`, a path that moved, a marker
expression that matches nothing); `make` turns every non-zero status into its own 2,
so the suite's conftest turns "no tests ran" into a failure with one line that says so.
"""

from __future__ import annotations

import subprocess
import sys

from testkit.processes import ROOT


def test_a_run_that_selects_no_test_fails_and_says_why() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_ci.py",
            "-k",
            "no_test_has_this_name",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "ran no tests" in run.stdout + run.stderr
