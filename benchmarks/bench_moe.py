"""MoE layer forward+backward: our grouped-GEMM experts against a per-expert loop and against transformers.

    python benchmarks/bench_moe.py                  # CPU, fp32, `small` preset, 1024 and 4096 tokens (~1 min)
    python benchmarks/bench_moe.py --quick          # smoke run (seconds)
    python benchmarks/bench_moe.py --device cuda    # GPU, bf16 weights and activations (Hopper: grouped GEMM)

Contenders, all with the same weights and the same routing (one layer: router + 64 routed + 2 shared experts):
  ours             nanoseek.model.moe.MoE in training mode: tokens sorted by expert once, one grouped GEMM per
                   weight matrix for all experts, one scatter back. (Its complementary balance loss is computed
                   and back-propagated too; the others have none, so this is a small handicap for ours.)
  loop             the same module's weights driven by a per-expert Python loop, the way transformers' eager
                   experts work: for each expert, mask the tokens routed to it, gather, SwiGLU, index_add.
  hf grouped_mm    transformers' DeepseekV3MoE with experts_implementation="grouped_mm", the default that a
                   DeepseekV3 PreTrainedModel picks. Built standalone, the module sees `_experts_implementation
                   = None` and silently runs its eager loop, so the benchmark sets "grouped_mm" explicitly.
  hf eager         the same transformers module with experts_implementation="eager" (its per-expert loop).
  hf grouped_mm+oneDNN   transformers' grouped_mm module with the same GEMM kernels as ours (below), for transparency.

Kernels (CPU): ours and the loop run inside `hardware.fast_matmul()`, as the trainer does: fp32 GEMMs on oneDNN
where that is exact and faster than MKL (AVX-512 CPUs, ~2x at these shapes; nothing changes on AVX2 machines).
transformers runs torch's defaults, as shipped; the "+oneDNN" row shows it with our kernels. The targets are
checked against the shipped defaults, and the ratio to the "+oneDNN" row is printed beside them.

Before timing, every contender's output and gradients (input and all weights) are checked against ours.
Timing: interleaved rounds (one call of each contender per round), median and best round; see common.py.
FLOPs counted: the GEMMs of the routed experts, the shared experts and the router, backward = 2x forward.
On CUDA everything is bf16 (the grouped GEMM is bf16-only); the agreement check is then a relative error (bf16
rounding differs between implementations), timings synchronize the device, and the peak is a measured bf16 matmul.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import matmul_gflops, matmul_peak, print_machine_info, time_interleaved  # noqa: E402
from nanoseek.config import ModelConfig, get_preset  # noqa: E402
from nanoseek.hardware import fast_matmul, fast_matmul_available  # noqa: E402
from nanoseek.model.moe import MoE  # noqa: E402

DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set by main(--device)


def build_ours(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg).train().to(DEVICE)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02)
        moe.gate.e_score_bias.normal_(0.0, 1e-3)  # a trained-looking bias, so it takes part in the routing
    return moe.to(DTYPE) if DTYPE != torch.float32 else moe


def loop_forward(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The per-expert loop of transformers' eager experts, on our module's router and weights."""
    idx_TK, weights_TK, _ = moe.gate(x_TD)
    ex = moe.experts
    out_TD = torch.zeros_like(x_TD)
    for e in range(ex.n_experts):
        token, slot = torch.where(idx_TK == e)  # a mask over all tokens, once per expert
        if token.numel() == 0:
            continue
        x_e = x_TD[token]
        h = F.silu(x_e @ ex.w1[e].t()) * (x_e @ ex.w3[e].t())
        out_TD.index_add_(0, token, (h @ ex.w2[e].t()) * weights_TK[token, slot, None].to(x_e.dtype))
    return out_TD + moe.shared_experts(x_TD)


def build_hf(cfg: ModelConfig, ours: MoE, experts_implementation: str):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = DeepseekV3Config(
        hidden_size=cfg.hidden_size,
        moe_intermediate_size=cfg.moe_intermediate_size,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        routed_scaling_factor=cfg.routed_scaling_factor,
        norm_topk_prob=cfg.norm_topk_prob,
        hidden_act="silu",
        experts_implementation=experts_implementation,
    )
    hf = DeepseekV3MoE(hf_cfg).train().to(DEVICE)
    assert hf.experts.config._experts_implementation == experts_implementation
    with torch.no_grad():
        hf.gate.weight.copy_(ours.gate.weight)
        hf.gate.e_score_correction_bias.copy_(ours.gate.e_score_bias)
        hf.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))  # gate rows first
        hf.experts.down_proj.copy_(ours.experts.w2)
        hf.shared_experts.gate_proj.weight.copy_(ours.shared_experts.w1.weight)
        hf.shared_experts.up_proj.weight.copy_(ours.shared_experts.w3.weight)
        hf.shared_experts.down_proj.weight.copy_(ours.shared_experts.w2.weight)
    if DTYPE != torch.float32:
        bias = hf.gate.e_score_correction_bias.data.clone()  # the routing bias stays fp32, as in ours
        hf.to(DTYPE)
        hf.gate.e_score_correction_bias.data = bias
    return hf


def grads_in_our_layout(name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weight gradients under our parameter names (transformers fuses gate_up_proj = [w1; w3])."""
    g = {n: p.grad for n, p in module.named_parameters()}
    if not name.startswith("hf"):
        return g
    w1, w3 = g["experts.gate_up_proj"].chunk(2, dim=1)
    return {
        "gate.weight": g["gate.weight"],
        "experts.w1": w1,
        "experts.w3": w3,
        "experts.w2": g["experts.down_proj"],
        "shared_experts.w1.weight": g["shared_experts.gate_proj.weight"],
        "shared_experts.w3.weight": g["shared_experts.up_proj.weight"],
        "shared_experts.w2.weight": g["shared_experts.down_proj.weight"],
    }


def moe_flops(cfg: ModelConfig, tokens: int) -> float:
    """GEMM FLOPs of one forward+backward (backward = 2x forward: input and weight gradients)."""
    d, inter, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    routed = 2 * tokens * k * 3 * d * inter
    shared = 2 * tokens * 3 * d * inter * cfg.n_shared_experts
    router = 2 * tokens * d * cfg.n_routed_experts
    return 3.0 * (routed + shared + router)


def bench_size(cfg: ModelConfig, batch: int, seq: int, warmup: int, iters: int, with_hf: bool):
    """Checks all contenders agree, then times them: (median seconds, best seconds) per contender."""
    ours = build_ours(cfg)
    modules = {"ours": ours, "loop": ours}
    forwards = {
        "ours": lambda x: ours(x),
        "loop": lambda x: (loop_forward(ours, x.view(-1, x.shape[-1])).view_as(x), None),
    }
    kernels_ours = {"ours", "loop"}  # run inside fast_matmul(); the rest with torch's defaults
    if with_hf:
        for impl in ("grouped_mm", "eager"):
            hf = build_hf(cfg, ours, impl)
            modules[f"hf {impl}"] = hf
            forwards[f"hf {impl}"] = lambda x, hf=hf: (hf(x), None)
        if DEVICE.type == "cpu" and fast_matmul_available():
            name = "hf grouped_mm+oneDNN"
            modules[name], forwards[name] = modules["hf grouped_mm"], forwards["hf grouped_mm"]
            kernels_ours.add(name)

    torch.manual_seed(1)
    x0 = torch.randn(batch, seq, cfg.hidden_size).to(DEVICE, DTYPE)
    grad_out = torch.randn_like(x0)

    def step(name: str, with_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        x = x0.clone().requires_grad_()
        modules[name].zero_grad(set_to_none=True)
        with (
            fast_matmul(enabled=None if name in kernels_ours else False)
            if DEVICE.type == "cpu"
            else nullcontext()
        ):
            out, aux = forwards[name](x)
            loss = (out * grad_out).sum()
            if with_aux and aux is not None:
                loss = loss + aux
            loss.backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out.detach(), x.grad

    # Same outputs and gradients (ours without its balance loss, which the others do not have).
    ref_out, ref_dx = step("ours", with_aux=False)
    ref_grads = {n: g.clone() for n, g in grads_in_our_layout("ours", ours).items()}
    for name in forwards:
        out, dx = step(name, with_aux=False)
        pairs = [("output", out, ref_out), ("input grad", dx, ref_dx)]
        pairs += [(f"{p} grad", g, ref_grads[p]) for p, g in grads_in_our_layout(name, modules[name]).items()]
        for what, got, want in pairs:
            if DTYPE == torch.float32:
                torch.testing.assert_close(
                    got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name, w=what: f"{n} {w}: {m}"
                )
            else:
                rel = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
                assert rel < 3e-2, f"{name} {what}: relative error {rel:.3g} (bf16)"

    times = time_interleaved({name: lambda n=name: step(n) for name in forwards}, warmup, iters)
    return {n: statistics.median(t) for n, t in times.items()}, {n: min(t) for n, t in times.items()}


def cuda_matmul_gflops(n: int, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ a
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="model preset whose MoE layer is timed")
    parser.add_argument("--sizes", default="4x256,16x256", help="comma-separated BATCHxSEQ token counts")
    parser.add_argument(
        "--iters", type=int, default=10, help="timed rounds (each calls every contender once)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers contenders")
    parser.add_argument("--quick", action="store_true", help="smoke run: one tiny size, 1 warm-up + 2 rounds")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 on the GPU")
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
        DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
    if args.quick:
        args.sizes, args.iters, args.warmup = "2x64", 2, 1
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    with_hf = not args.no_hf
    if with_hf:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: skipping its contenders (pip install -e '.[dev]')")
            with_hf = False

    precision = f"bf16 on {torch.cuda.get_device_name()}" if DEVICE.type == "cuda" else "fp32"
    print(
        f"MoE layer forward+backward, preset {cfg.name!r}: d={cfg.hidden_size}, {cfg.n_routed_experts} routed "
        f"experts top-{cfg.num_experts_per_tok} (I={cfg.moe_intermediate_size}), {cfg.n_shared_experts} shared, "
        f"groups {cfg.n_group}/keep {cfg.topk_group}, {precision}"
    )
    print_machine_info()
    if with_hf:
        print(f"  {'transformers':26s} {transformers.__version__}")
    seconds = 0.1 if args.quick else 1.0
    if DEVICE.type == "cuda":
        start_peak = cuda_matmul_gflops(8192)
        print(f"  bf16 matmul 8192^3 at start: {start_peak:.0f} GFLOP/s")
    else:
        start_peak, said = matmul_peak(2048, 2048, 2048, seconds)
        # tokens x d -> 3 x moe_intermediate: a tiny-model shape
        tiny = matmul_gflops(4096, 256, 768, seconds)
        print(
            f"  fp32 matmul at start: 2048^3 {said}, [4096,256]x[256,768] {tiny:.0f} GFLOP/s (default BLAS)"
        )

    results = []
    for size in args.sizes.split(","):
        batch, seq = (int(v) for v in size.lower().split("x"))
        print(
            f"timing {batch}x{seq} tokens: checking outputs and gradients agree, then {args.iters} rounds",
            flush=True,
        )
        results.append((batch, seq, *bench_size(cfg, batch, seq, args.warmup, args.iters, with_hf)))
    end_peak = (
        cuda_matmul_gflops(8192) if DEVICE.type == "cuda" else matmul_peak(2048, 2048, 2048, seconds)[0]
    )
    # Contention only slows a measurement down, so the higher of the two is the better estimate of the peak.
    peak = max(start_peak, end_peak)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  at end: matmul {end_peak:.0f} GFLOP/s, load avg (1 min) {load:.2f}")
    print(f"  reference peak = max(start, end) = {peak:.0f} GFLOP/s")

    print(
        "\n| tokens (BxS) | implementation | median ms | best ms | GFLOP/s (median) | of matmul peak "
        "| time / ours (median / best) |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch, seq, med, best in results:
        for name in med:
            gflops = moe_flops(cfg, batch * seq) / med[name] / 1e9
            print(
                f"| {batch}x{seq} = {batch * seq} | {name} | {med[name] * 1e3:.1f} | {best[name] * 1e3:.1f} "
                f"| {gflops:.0f} | {100 * gflops / peak:.0f}% "
                f"| {med[name] / med['ours']:.2f}x / {best[name] / best['ours']:.2f}x |"
            )
    print("\nSpeedup of ours, median rounds (best rounds):")
    targets = {"loop": 3.0, "hf grouped_mm": 1.3, "hf eager": None, "hf grouped_mm+oneDNN": None}
    for batch, seq, med, best in results:
        size = f"{batch}x{seq}"
        for other, target in targets.items():
            if other not in med:
                continue
            ratio, ratio_best = med[other] / med["ours"], best[other] / best["ours"]
            verdict = (
                "" if target is None else f"  target >= {target}x: {'met' if ratio >= target else 'NOT met'}"
            )
            print(f"  {size:>8s} ours vs {other:20s} {ratio:5.2f}x ({ratio_best:.2f}x){verdict}")
        # No implementation beats the loop by more than this: the same GEMM FLOPs run at 100% of the peak.
        gemm_s = moe_flops(cfg, batch * seq) / (peak * 1e9)
        print(
            f"  {size:>8s} bound: the GEMMs alone at 100% of peak take {gemm_s * 1e3:.1f} ms, so at most "
            f"{med['loop'] / gemm_s:.2f}x over the loop"
        )


if __name__ == "__main__":
    main()
