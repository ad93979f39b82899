"""Peak FLOP/s for MFU: measured on CPUs, datasheet numbers on GPUs.

On these shared CPU machines the fp32 matmul rate drifts by +-30% between runs (REFERENCE-measured: 130-155
GFLOP/s on 2 cores), so MFU on CPU divides by a peak measured in the same process, at start-up. On GPUs the
convention is the dense datasheet peak for the compute dtype.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import torch

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from NVIDIA datasheets (SXM parts).
GPU_PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp8": 312.0, "fp32": 19.5},
}


def measure_matmul_flops(n: int = 1024, seconds: float = 0.3, dtype=torch.float32, device="cpu") -> float:
    """Best-of fp32 square-matmul rate in FLOP/s over ~`seconds`."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up
    while True:
        t = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
        if time.perf_counter() > deadline:
            return best


def peak_flops(device: torch.device, precision: str = "fp32") -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peaks.get(precision, peaks["bf16"]) * 1e12, f"{key} datasheet {precision}"
        return measure_matmul_flops(4096, 0.5, torch.bfloat16, device), f"measured bf16 matmul on {name}"
    return measure_matmul_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_allocator() -> str:
    """Keep freed CPU memory in the process instead of handing it back to the kernel (glibc only); says what it did.

    A training step frees and re-allocates the same ~100 MB of activations every step. With glibc's defaults,
    blocks above the (dynamic) mmap threshold are mmap'ed fresh and the heap top is trimmed back, so each step
    first-touches ~130 MB of new pages: ~34k page faults per `small` step, ~0.75 us each on this VM (a 12 MB
    gather takes 2.3 ms into fresh pages, 0.35 ms into reused ones). Raising the mmap threshold to its 32 MiB
    maximum and the trim threshold to 1 GiB makes the steady state fault-free: 6-8% faster `small` steps. PyTorch's
    CPU tuning guide reaches the same end with jemalloc/tcmalloc via LD_PRELOAD; this needs no extra library.
    NANOSEEK_NO_MALLOPT=1 turns it off."""
    if os.environ.get("NANOSEEK_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return "default allocator"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return "default allocator"
    return "glibc mallopt: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "default allocator"
