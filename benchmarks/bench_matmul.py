"""fp32 GEMM kernels on this CPU: torch's default (MKL) against oneDNN, at the shapes nanoseek runs.

    python benchmarks/bench_matmul.py            # ~30 s on 2 cores
    python benchmarks/bench_matmul.py --quick

torch sends fp32 GEMMs to MKL, and MKL runs its AVX2 code on AMD CPUs even where they have AVX-512; oneDNN (inside
torch) runs AVX-512 there. `nanoseek.hardware.fast_matmul()` switches to oneDNN where that is exact, and the
trainer runs its steps inside it. This script shows where that pays: every shape in three layouts (the forward
x W^T and the two backward GEMMs), median time per call under each kernel, and the ratio (MKL time / oneDNN time,
so > 1 means oneDNN is faster). Rows: training GEMMs of the `small` preset at 8 x 256 tokens (projections, the
head's 512-row blocks), the routed experts' per-expert GEMMs (~96-192 rows), and decode-sized ones (1-32 rows).

A second table is the decode step's case (one thread, as bench_infer): fixed weights, a few rows. It times x @ W
on MKL with W stored [in, out] (the lean step's layout), oneDNN through the switch (which reorders W into its
blocked layout on every call), and oneDNN with W reordered once (`hardware.PackedWeight`, what the lean step uses
from 4 rows, and for the head from 1). Each call reads a different copy of W, ~32 MB of them in turn, as a
decode step reads weights that are not in cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import matmul_peak, print_machine_info  # noqa: E402
from nanoseek.hardware import PackedWeight, fast_matmul, onednn_matmul_is_exact, packed_is_exact  # noqa: E402

SHAPES = {  # M (rows), K (in), N (out)
    "training (2,048 rows)": [
        (2048, 256, 128),
        (2048, 128, 384),
        (2048, 256, 256),
        (2048, 64, 512),
        (2048, 256, 64),
    ],
    "head block": [(512, 256, 8192)],
    "expert (96-192 rows)": [(192, 256, 128), (192, 128, 256), (96, 256, 128)],
    "decode (1-32 rows)": [(32, 256, 8192), (8, 256, 256), (1, 256, 256)],
}
DECODE_SHAPES = [(256, 8192), (256, 512), (256, 256), (128, 640)]  # K, N: the head, FFN / attention matrices
DECODE_ROWS = [1, 2, 4, 8, 32]


def median_seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=15, help="timed calls per shape, layout and kernel")
    ap.add_argument("--quick", action="store_true", help="smoke run: one shape per group, 3 calls")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.reps = 3
    print("fp32 GEMMs, default BLAS vs oneDNN")
    print_machine_info()
    if not onednn_matmul_is_exact():
        print("oneDNN's fp32 matmul is not exact fp32 here (or this torch has no switch): nothing to compare")
        return
    _, said = matmul_peak(2048, 2048, 2048, 0.1 if args.quick else 0.5)
    print(f"  2048^3: {said}")
    print("\n| group | M, K, N | x W^T | dY W | dY^T X |")
    print("|---|---|---|---|---|")
    for group, shapes in SHAPES.items():
        for M, K, N in shapes[:1] if args.quick else shapes:
            x, w, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
            cells = []
            layouts = (lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w, lambda dy=dy, x=x: dy.t() @ x)
            for fn in layouts:
                default = median_seconds(fn, args.reps)
                with fast_matmul(True):
                    onednn = median_seconds(fn, args.reps)
                cells.append(f"{default * 1e3:.3f} / {onednn * 1e3:.3f} ms = **{default / onednn:.2f}x**")
            print(f"| {group} | {M}, {K}, {N} | " + " | ".join(cells) + " |")
    print("\n(each cell: default BLAS / oneDNN median ms per call = default / oneDNN; > 1: oneDNN is faster)")
    if packed_is_exact():
        decode_table(args)


def decode_table(args) -> None:
    torch.set_num_threads(1)
    print("\nDecode-sized GEMMs, fixed weights, one thread: us per call; MKL time over prepacked oneDNN time")
    print("\n| K, N | rows | MKL, W [in, out] | oneDNN (switch) | oneDNN prepacked | MKL / prepacked |")
    print("|---|---|---|---|---|---|")
    for K, N in DECODE_SHAPES[:1] if args.quick else DECODE_SHAPES:
        copies = max(2, (32 << 20) // (K * N * 4))  # ~32 MB of weights, read in turn
        ws = [torch.randn(N, K) for _ in range(copies)]
        w_in_out = [w.t().contiguous() for w in ws]
        packed = [PackedWeight(w) for w in ws]
        for M in DECODE_ROWS[::2] if args.quick else DECODE_ROWS:
            x = torch.randn(M, K)

            def mkl(x=x, w_in_out=w_in_out):
                for w in w_in_out:
                    x @ w

            def prepacked(x=x, packed=packed):
                for w in packed:
                    w(x)

            reps = max(3, args.reps // 3)
            t_mkl, t_packed = median_seconds(mkl, reps), median_seconds(prepacked, reps)
            with fast_matmul(True):
                t_switch = median_seconds(mkl, reps)
            us = [t / copies * 1e6 for t in (t_mkl, t_switch, t_packed)]
            print(
                f"| {K}, {N} | {M} | {us[0]:.1f} | {us[1]:.1f} | {us[2]:.1f} | **{t_mkl / t_packed:.2f}x** |",
                flush=True,
            )
    torch.set_num_threads(args.threads)


if __name__ == "__main__":
    main()
