"""FP8 (nanoseek/fp8.py) against full precision: what the CPU simulation costs, and (on a GPU) what real FP8 buys.

    python benchmarks/bench_fp8.py            # CPU: GEMM, Linear fwd+bwd and tiny/small train-step overhead (~2 min)
    python benchmarks/bench_fp8.py --quick    # smoke run (seconds)
    python benchmarks/bench_fp8.py --gpu      # on a CUDA machine: FP8 vs BF16 GEMM TFLOP/s and training tok/s

CPU (fp32 is the baseline: bf16 matmuls are 10-100x slower on this AVX2 CPU, REFERENCE §14):
  gemm        y = x W^T: fp32 matmul vs the FP8 simulation (quantize x in 1x128 tiles and W in 128x128 blocks,
              cast to float8_e4m3fn and back, one fp32 matmul). The simulation does the fp32 GEMM AND the
              quantization passes, so it can only be slower; the number says by how much.
  linear      one Linear forward+backward (3 GEMMs): nn.Linear vs Fp8Linear (Dgrad, Wgrad requantization too).
  train step  a model's forward+backward, fp32 vs --precision fp8 (routed experts: one FP8 GEMM per expert).
GPU (--gpu; needs Hopper + CUDA >= 12.9 for blockwise scaled_mm, else the FP8 rows fall back to the simulation):
  gemm        BF16 torch.mm vs FP8 F.scaled_mm (1x128 x 128x128 scales), GEMM only and with the activation's
              quantization, at 4096-8192 square and at V3 expert shapes (d=7168, I=2048).
  train step  tokens/s of a ~0.5B-total MoE config, bf16 autocast vs fp8 + bf16 autocast.
Timing: interleaved rounds, median and best (benchmarks/common.py). Results: BENCHMARKS.md, "FP8 (issue 5)".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import print_machine_info, time_interleaved  # noqa: E402
from nanoseek.config import ModelConfig, get_preset  # noqa: E402
from nanoseek.fp8 import (  # noqa: E402
    BLOCK,
    Fp8Linear,
    _cuda_blockwise_ok,
    convert_to_fp8,
    fp8_mm,
    quantize_blocks,
    quantize_tiles,
)
from nanoseek.model import Transformer  # noqa: E402


def _row(name: str, times: dict[str, list[float]], flops: float) -> str:
    """Markdown row: median/best ms of the baseline and of FP8, GFLOP/s (median), overhead ratio of medians."""
    (base, tb), (_, t8) = times.items()
    mb, m8 = statistics.median(tb), statistics.median(t8)
    return (
        f"| {name} | {mb * 1e3:.1f} / {min(tb) * 1e3:.1f} | {m8 * 1e3:.1f} / {min(t8) * 1e3:.1f} | "
        f"{flops / mb / 1e9:.0f} | {flops / m8 / 1e9:.0f} | {m8 / mb:.2f}x |"
    )


def _gemm_contenders(M: int, K: int, N: int) -> dict:
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.02

    def fp8():
        x_q, x_s = quantize_tiles(x)
        w_q, w_s = quantize_blocks(w)
        return fp8_mm(x_q, x_s, w_q, w_s, BLOCK)

    return {"fp32": lambda: x @ w.t(), "fp8": fp8}


def cpu_table(what: str, contenders, flops_per_mkn: int, shapes, iters: int, warmup: int) -> None:
    """One Markdown table: for each (M, K, N), time contenders(M, K, N) = {"fp32": fn, "fp8": fn} interleaved."""
    print(f"\n| {what} | fp32 ms (median / best) | FP8 ms | fp32 GFLOP/s | FP8 GFLOP/s | FP8 / fp32 |")
    print("|---|---|---|---|---|---|")
    for M, K, N in shapes:
        times = time_interleaved(contenders(M, K, N), warmup, iters)
        print(_row(f"{M} x {K} x {N}", times, flops_per_mkn * M * K * N))


def _linear_contenders(M: int, K: int, N: int) -> dict:
    ref = nn.Linear(K, N, bias=False)
    fp8 = Fp8Linear.from_linear(nn.Linear(K, N, bias=False))
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)
    return {"fp32": lambda: ref(x).backward(dy), "fp8": lambda: fp8(x).backward(dy)}


def _model_step(cfg: ModelConfig, batch: int, seq: int, fp8: bool, device="cpu", autocast=None):
    torch.manual_seed(0)
    model = Transformer(cfg, seed=0).to(device).train()
    if fp8:
        convert_to_fp8(model)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def step():
        with autocast() if autocast else torch.autocast(device, enabled=False):
            loss = model(x, targets=x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def cpu_train_step(presets: list[str], batch: int, seq: int, iters: int, warmup: int) -> None:
    print(
        f"\n| train step fwd+bwd, {batch} x {seq} tokens | fp32 ms | FP8 sim ms | fp32 tok/s | FP8 tok/s "
        "| FP8 / fp32 |"
    )
    print("|---|---|---|---|---|---|")
    for name in presets:
        cfg = get_preset(name).replace(vocab_size=4096)
        steps = {"fp32": _model_step(cfg, batch, seq, False), "fp8": _model_step(cfg, batch, seq, True)}
        times = time_interleaved(steps, warmup, iters)
        mb, m8 = (statistics.median(t) for t in times.values())
        tokens = batch * seq
        print(
            f"| {name} | {mb * 1e3:.0f} / {min(times['fp32']) * 1e3:.0f} | {m8 * 1e3:.0f} / "
            f"{min(times['fp8']) * 1e3:.0f} | {tokens / mb:,.0f} | {tokens / m8:,.0f} | {m8 / mb:.2f}x |"
        )


# ---- GPU ---------------------------------------------------------------------------------------------------
def _cuda_time(fn, iters: int) -> float:
    """Median seconds per call with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _gpu_gemm_row(M: int, K: int, N: int, iters: int) -> str:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    x_q, x_s = quantize_tiles(x)
    w_q, w_s = quantize_blocks(w)
    tflops = 2 * M * K * N / 1e12
    bf16 = tflops / _cuda_time(lambda: x @ w.t(), iters)
    gemm = tflops / _cuda_time(lambda: fp8_mm(x_q, x_s, w_q, w_s, BLOCK, torch.bfloat16), iters)
    full = tflops / _cuda_time(lambda: fp8_mm(*quantize_tiles(x), w_q, w_s, BLOCK, torch.bfloat16), iters)
    fused = tflops / _cuda_time(
        lambda: fp8_mm(*_compiled_quantize(x), w_q, w_s, BLOCK, torch.bfloat16), iters
    )
    path = "scaled_mm" if _cuda_blockwise_ok(x_q, w_q) else "simulated"
    return f"| {M} x {K} x {N} | {bf16:.0f} | {gemm:.0f} | {full:.0f} | {fused:.0f} | {path} |"


_compiled_quantize = torch.compile(quantize_tiles)  # one fused kernel instead of ~8 eager ones


def gpu_gemm(iters: int) -> None:
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(
        "| y = x W^T, M x K x N | BF16 TFLOP/s | FP8 GEMM only | FP8 incl. quantizing x (eager) "
        "| FP8 incl. quantizing x (torch.compile) | FP8 path |"
    )
    print("|---|---|---|---|---|---|")
    shapes = [(4096, 4096, 4096), (8192, 8192, 8192), (4096, 7168, 2048), (4096, 2048, 7168)]
    for M, K, N in shapes:  # the last two: one V3 routed expert's up (w1/w3) and down (w2) projection
        print(_gpu_gemm_row(M, K, N, iters))


def gpu_train_step(iters: int) -> None:
    # ~0.5B total / ~0.1B activated: small's shape, widened so the GEMMs are big enough to matter.
    cfg = get_preset("small").replace(
        name="fp8-bench",
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=16,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        vocab_size=32768,
    )
    batch, seq = 8, 2048

    def bf16():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    print(f"\n| train step fwd+bwd, {cfg.name} ({batch} x {seq} tokens) | tok/s |")
    print("|---|---|")
    for name, fp8 in [("bf16 autocast", False), ("fp8 + bf16 autocast", True)]:
        step = _model_step(cfg, batch, seq, fp8, "cuda", bf16)
        sec = _cuda_time(step, iters)
        print(f"| {name} | {batch * seq / sec:,.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes, 1 warm-up + 2 rounds")
    parser.add_argument("--gpu", action="store_true", help="the CUDA benchmarks instead of the CPU ones")
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        gpu_gemm(args.iters)
        gpu_train_step(args.iters)
        return
    torch.set_num_threads(args.threads)
    print("FP8 simulation overhead on CPU (fp32 baseline)")
    print_machine_info()
    t0 = time.perf_counter()
    if args.quick:
        args.iters, args.warmup = 2, 1
        cpu_table("y = x W^T, M x K x N", _gemm_contenders, 2, [(256, 256, 256)], args.iters, args.warmup)
        cpu_table(
            "Linear fwd+bwd, M x K x N", _linear_contenders, 6, [(256, 256, 256)], args.iters, args.warmup
        )
        cpu_train_step(["tiny"], 2, 64, args.iters, args.warmup)
    else:
        gemms = [(4096, 256, 768), (4096, 768, 256), (1024, 1024, 1024), (2048, 2048, 2048)]
        cpu_table("y = x W^T, M x K x N", _gemm_contenders, 2, gemms, args.iters, args.warmup)
        linears = [(4096, 256, 768), (4096, 768, 256), (2048, 1024, 1024)]
        cpu_table("Linear fwd+bwd, M x K x N", _linear_contenders, 6, linears, args.iters, args.warmup)
        cpu_train_step(["tiny", "small"], 16, 256, max(3, args.iters // 2), 1)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
