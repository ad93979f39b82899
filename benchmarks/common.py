"""Helpers shared by the benchmarks: machine info, the fp32 matmul peak, interleaved timing.

The CPU machines these run on are shared and drift by +-30% between (and within) runs, so:
- the matmul peak that MFU figures divide by is measured in the same process, before and after the timings, with
  the fastest exact fp32 kernel torch has on the machine (`matmul_peak`: MKL, or oneDNN where hardware.fast_matmul
  is available, ~2.3x MKL on an AVX-512 Zen 5);
- the contenders of one comparison are timed in interleaved rounds (A B C, A B C, ...), so a slow spell hits all
  of them, and both the median and the best round are reported (noise only ever adds time);
- the 1-minute load average is printed, because other jobs on the machine are the largest source of noise;
- the allocator is tuned as the `nanoseek` CLI tunes it (hardware.tune_allocator) for every contender in the
  process alike, so a comparison measures the models, not glibc's page faults.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from nanoseek.hardware import cpuinfo, fast_matmul, fast_matmul_available, tune_allocator

ALLOCATOR = tune_allocator()


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cpu": f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})",
        "logical cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "allocator": ALLOCATOR,
        "fp32 GEMMs of training": "oneDNN (exact here and faster than MKL)"
        if fast_matmul_available()
        else "MKL / default BLAS",
        "load avg (1 min) at start": f"{load:.2f}",
    }


def print_machine_info() -> None:
    for key, value in machine_info().items():
        print(f"  {key:26s} {value}")


def matmul_peak(m: int, k: int, n: int, min_seconds: float = 0.5) -> tuple[float, str]:
    """(GFLOP/s of `[m, k] @ [k, n]` with the faster of the default BLAS and oneDNN, what each gave)."""
    default = matmul_gflops(m, k, n, min_seconds)
    if not fast_matmul_available():
        return default, f"{default:.0f} GFLOP/s (default BLAS)"
    with fast_matmul():
        onednn = matmul_gflops(m, k, n, min_seconds)
    peak = max(default, onednn)
    return peak, f"{peak:.0f} GFLOP/s (MKL {default:.0f}, oneDNN {onednn:.0f})"


def matmul_gflops(m: int, k: int, n: int, min_seconds: float = 0.5) -> float:
    """Median fp32 rate of `[m, k] @ [k, n]` in GFLOP/s over at least `min_seconds` (and at least 5 calls)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e9


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed round-robin: `iters` rounds, each calls every fn once."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def add_decode_threads_arg(ap) -> None:
    """`--threads` for the decode benchmarks: one thread by default, for both contenders."""
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both contenders (1: decode is latency-bound, and on a shared 2-core machine a "
        "second thread mostly waits at every small matmul)",
    )
