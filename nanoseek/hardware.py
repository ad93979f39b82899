"""CPU/GPU facts the trainer needs: the peak FLOP/s that MFU divides by, the fastest exact fp32 matmul kernel,
and a glibc allocator setting.

Peak: on these shared CPU machines the fp32 matmul rate drifts by +-30% between runs, so MFU on CPU divides by a
peak measured in the same process, at start-up, with the fastest kernel torch has here (below). On GPUs the
convention is the dense datasheet peak for the compute dtype.

fp32 matmul kernels on CPU: torch sends fp32 GEMMs to MKL, which on AMD CPUs runs its AVX2 code even where the
CPU has AVX-512. oneDNN (bundled with torch) picks its kernels by CPU feature and, on an AVX-512 Zen 5, runs fp32
GEMMs 1.9-2.4x faster at training shapes (2048 x 256 x 128 ... 512 x 256 x 8192), 1.1-1.7x at 96-192-row expert
shapes, and 2-6x *slower* at 1-8 rows (a decode step's GEMVs). `fast_matmul()` routes fp32 matmuls to oneDNN
inside a block, and the trainer wraps its forward/backward in it (not GRPO's update: oneDNN pays ~250 us for
each new GEMM shape, and GRPO's micro-batch shapes change every step). The switch is torch's
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, which *allows* oneDNN to compute in bf16: on a CPU with
a bf16 matrix unit (AMX) that would lose precision, so it is used only where a probe shows oneDNN's results are
exactly fp32's (`onednn_matmul_is_exact`), and only on AMD CPUs with AVX-512 (`fast_matmul_available`): the
choice must not depend on a timing, or a resumed run could pick other kernels and lose bit-reproducibility.
NANOSEEK_ONEDNN_MATMUL=0 turns it off, =1 turns it on elsewhere too (never without the exactness check).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
    mkl = measure_matmul_flops()
    if not fast_matmul_available():
        return mkl, f"measured fp32 matmul, {torch.get_num_threads()} threads"
    with fast_matmul():
        onednn = measure_matmul_flops()
    return max(mkl, onednn), (
        f"measured fp32 matmul, {torch.get_num_threads()} threads, the faster of {_blas()} ({mkl / 1e9:.0f} "
        f"GFLOP/s) and oneDNN ({onednn / 1e9:.0f} GFLOP/s)"
    )


# ---- the fp32 matmul kernel on CPU -----------------------------------------------------------------------
def _blas() -> str:
    return "MKL" if torch.backends.mkl.is_available() else "the default BLAS"


_FAST_MATMUL: bool | None = None  # the probe's answer, once per process


@contextmanager
def _onednn(on: bool) -> Iterator[None]:
    """fp32 CPU matmuls on oneDNN (on) or torch's default BLAS (off) inside the block; the setting is restored."""
    prev = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if on else "none"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = prev


def _onednn_switch_exists() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"
    )


def onednn_matmul_is_exact(matmul=torch.mm) -> bool:
    """Whether `matmul` under the oneDNN switch computes in fp32, not bf16.

    1 + 2^-10 is exact in fp32 and rounds to 1 in bf16 (8 significant bits), and 512 of them sum exactly in fp32:
    an fp32 GEMM gives 512.5, a bf16 one 512. A random product is also checked against fp64."""
    if not _onednn_switch_exists():
        return False
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=gen), torch.randn(256, 96, generator=gen)
    try:
        with _onednn(True):
            ones = matmul(torch.full((16, 512), 1 + 2**-10), torch.ones(512, 16))
            got = matmul(a, b).double()
    except (RuntimeError, ValueError):  # a build or CPU where the switch (or oneDNN's bf16 mode) is refused
        return False
    want = a.double() @ b.double()
    err = float((got - want).abs().max() / want.abs().max())
    return bool((ones == 512.5).all()) and err < 1e-5


def cpuinfo(field: str) -> str:
    """The first `field` value of /proc/cpuinfo ("vendor_id", "model name", ...); "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_vendor() -> str:
    return cpuinfo("vendor_id")


def _amd_avx512() -> bool:
    return "AVX512" in torch.backends.cpu.get_cpu_capability() and _cpu_vendor() == "AuthenticAMD"


def fast_matmul_available() -> bool:
    """Whether `fast_matmul()` switches kernels here (decided once per process).

    Yes on an AMD CPU with AVX-512, where MKL runs its AVX2 code and oneDNN its AVX-512 kernels, if oneDNN's
    results are exactly fp32's. The rule reads the CPU, not a timing, so every process on a machine (a resumed
    run, each data-parallel rank) picks the same kernels and stays bit-reproducible. On Intel CPUs MKL already
    uses AVX-512. NANOSEEK_ONEDNN_MATMUL=1 / 0 forces the switch on (still only if exact) / off."""
    global _FAST_MATMUL
    if _FAST_MATMUL is None:
        env = os.environ.get("NANOSEEK_ONEDNN_MATMUL", "")
        if env == "0" or not onednn_matmul_is_exact():
            _FAST_MATMUL = False
        elif env == "1":
            _FAST_MATMUL = True
        else:
            _FAST_MATMUL = _amd_avx512()
    return _FAST_MATMUL


@contextmanager
def fast_matmul(enabled: bool | None = None) -> Iterator[None]:
    """fp32 CPU matmuls inside the block run on oneDNN where that is exact and faster (module docstring).

    For training steps and other many-row GEMMs whose shapes repeat; never around a decode step (oneDNN is
    slower at 1-8 rows).
    enabled=None asks `fast_matmul_available()`; True forces the switch (only if it is exact)."""
    if enabled is None:
        enabled = fast_matmul_available()
    elif enabled:
        enabled = onednn_matmul_is_exact()
    if not enabled:
        yield
        return
    with _onednn(True):
        yield


def fast_matmul_active() -> bool:
    """Whether fp32 CPU matmuls run on oneDNN right now (inside `fast_matmul()`, or the switch set by hand)."""
    return _onednn_switch_exists() and torch.backends.mkldnn.matmul.fp32_precision == "bf16"


@contextmanager
def default_matmul() -> Iterator[None]:
    """fp32 CPU matmuls inside the block on torch's default BLAS, even inside `fast_matmul()` (few-row GEMMs)."""
    if not _onednn_switch_exists() or torch.backends.mkldnn.matmul.fp32_precision == "none":
        yield
        return
    with _onednn(False):
        yield


# ---- prepacked weights (decode) -------------------------------------------------------------------------
_PACKED: bool | None = None


def _pack(w: torch.Tensor, rows_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows_hint)


def _packed_mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


def packed_is_exact(pack=_pack, mm=_packed_mm) -> bool:
    """Whether oneDNN's prepacked linear computes in fp32 (the probe of `onednn_matmul_is_exact`)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=gen), torch.randn(96, 256, generator=gen)
    try:
        ones = mm(torch.full((16, 512), 1 + 2**-10), pack(torch.ones(16, 512), 16))
        got = mm(a, pack(b, 64)).double()
    except (RuntimeError, AttributeError, NotImplementedError):  # no such ops in this torch, or no oneDNN
        return False
    want = a.double() @ b.double().t()
    err = float((got - want).abs().max() / want.abs().max())
    return bool((ones == 512.5).all()) and err < 1e-5


def packed_weights_available() -> bool:
    """Whether `PackedWeight` is used here (decided once per process): on the CPUs of `fast_matmul_available`, if
    the ops exist and are exact. NANOSEEK_ONEDNN_MATMUL=0 / 1 turns them off / on as it does the switch."""
    global _PACKED
    if _PACKED is None:
        env = os.environ.get("NANOSEEK_ONEDNN_MATMUL", "")
        on = env == "1" or (env != "0" and _amd_avx512())
        _PACKED = on and torch.backends.mkldnn.is_available() and packed_is_exact()
    return _PACKED


class PackedWeight:
    """A fixed fp32 weight reordered once into oneDNN's blocked layout, for y = x W^T (a decode step's matrices).

    A plain-layout oneDNN GEMM reorders the weight on every call, which is why it loses to MKL at a few rows
    (module docstring). Reordered once, the same kernels win from 1 row for the 8 MB head (0.22 vs 0.30 ms, one
    thread) and from about 4 rows for 128-512 KB matrices (at 32 rows: the head 0.8 vs 2.0 ms on MKL, 1.4 on
    plain oneDNN); `benchmarks/bench_matmul.py` times them. Only where `packed_weights_available()`."""

    def __init__(self, w: torch.Tensor, rows_hint: int = 32):
        self.w = _pack(w.float(), rows_hint)  # w [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] -> x W^T [M, out]."""
        return _packed_mm(x, self.w)


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
