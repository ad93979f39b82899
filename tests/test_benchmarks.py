"""Every benchmark script still runs (`--quick` smoke runs, slow: `make test-slow`), so none rots unnoticed."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_the_benchmark_scripts_are_found():
    # an empty glob would parametrize the smoke test below into nothing, and it would pass silently
    assert len(SCRIPTS) >= 9


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_quick_run(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        cwd=tmp_path,  # nothing the script writes lands in the checkout
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
