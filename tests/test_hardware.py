import sys

import pytest
import torch

from nanoseek.hardware import measure_matmul_flops, tune_allocator


def test_tune_allocator_reports_what_it_did(monkeypatch):
    said = tune_allocator()
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert said.startswith("glibc mallopt")
    monkeypatch.setenv("NANOSEEK_NO_MALLOPT", "1")
    assert tune_allocator() == "default allocator"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counters are Linux-only here")
def test_tuned_allocator_reuses_freed_memory():
    """A training step's pattern, ~100 MB of activations allocated then all freed, repeated: once tuned, later
    rounds reuse the heap instead of faulting in fresh pages (glibc 2.36 defaults: ~27k faults for 5 rounds)."""
    import resource

    if not tune_allocator().startswith("glibc"):
        pytest.skip("not glibc")

    def rounds(n):
        for _ in range(n):
            keep = [torch.ones(3 << 20) for _ in range(8)]  # 8 x 12 MiB
            del keep

    rounds(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(5)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 6000


def test_measured_peak_is_positive():
    assert measure_matmul_flops(128, 0.01) > 0
