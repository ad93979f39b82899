"""Where the `small` training step's time goes: its GEMMs, each timed alone, against everything else.

Issue 3 §6 asks for >= 65% MFU on `small`. This script asks what that would take with the kernels torch has here.
It runs the `small` preset's training step (the trainer's batch, 16 x 256, inside `hardware.fast_matmul()` as the
trainer runs it: forward with the fused head loss, backward, AdamW) under a TorchDispatchMode that records every
GEMM the step calls, forward and backward: mm, addmm(_), bmm, baddbmm and the experts' `_grouped_mm`, with shapes,
strides and the grouped GEMMs' row offsets. Then it times each recorded GEMM alone on fresh operands of the same
layout (median of several calls, warm), and prints:

- the step: time, MFU (model FLOPs, `accounting.count_flops(...).full`, over the fp32 matmul peak measured in
  this process with the fastest exact kernel, before and after the GEMMs' timings, the larger, as bench_train.py
  does);
- the GEMMs alone, by group (routed experts, attention, output heads, the other projections): time, share of
  the step, rate against the peak;
- the ceiling: the MFU if everything that is not a GEMM (norms, activations, softmax, gathers, routing, the
  optimizer, Python) took no time at all, and how far that other work would have to shrink for 65%.

The GEMMs timed alone find their operands warmer in cache than inside the step, so their sum is a lower bound on
the step's GEMM time and the ceiling an upper bound.

    python benchmarks/bench_train_ceiling.py          # ~1 minute on 2 cores
    python benchmarks/bench_train_ceiling.py --quick  # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak, print_machine_info  # noqa: E402

from nanoseek.accounting import count_flops  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.hardware import fast_matmul  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.train.optim import make_optimizer  # noqa: E402
from nanoseek.train.trainer import TrainConfig  # noqa: E402

aten = torch.ops.aten
GROUPED = aten._grouped_mm.default if hasattr(aten, "_grouped_mm") else None  # the routed experts' GEMMs
MM = {aten.mm.default, aten.mm.out, aten.bmm.default, aten.bmm.out}  # (a, b)
ADDMM = {
    aten.addmm.default,
    aten.addmm_.default,
    aten.addmm.out,
    aten.baddbmm.default,
    aten.baddbmm.out,
}  # (c, a, b)
BATCHED = {aten.bmm.default, aten.bmm.out, aten.baddbmm.default, aten.baddbmm.out}
GEMMS = MM | ADDMM | {GROUPED}  # .out: the head loss writes its weight gradient into a buffer


def _spec(a):
    """What a call needs to be repeated: a tensor's layout (integer tensors, the row offsets, by value)."""
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            return ("tensor", tuple(a.shape), tuple(a.stride()), a.dtype)
        return ("value", a.clone())
    return ("const", a)


def _make(spec):
    kind = spec[0]
    if kind == "tensor":
        _, shape, stride, dtype = spec
        t = torch.empty_strided(shape, stride, dtype=dtype)
        return t.normal_() if t.numel() else t
    return spec[1]


class GemmRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS:
            spec = (func, [_spec(a) for a in args], {k: _spec(v) for k, v in kwargs.items()})
            self.calls.append((group_of(func), *spec))
        return func(*args, **kwargs)


def gemm_flops(func, args) -> float:
    """Executed FLOPs of one recorded GEMM (padding rows and masked scores included)."""
    shape = [s[1] if s[0] == "tensor" else None for s in args]
    if func in MM:
        a, b = shape[0], shape[1]
    elif func is GROUPED:
        a, b = shape[0], shape[1]
        if len(a) == 2 and len(b) == 3:  # rows grouped: [N, K] x [E, K, n]
            return 2.0 * a[0] * a[1] * b[2]
        return 2.0 * a[0] * a[1] * b[-1]  # contraction grouped: [m, Ntot] x [Ntot, n] -> [E, m, n]
    else:  # addmm(_), baddbmm: (input, a, b)
        a, b = shape[1], shape[2]
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def _in_head_loss() -> bool:
    """Whether the caller runs inside nanoseek/model/head_loss.py (the fused head + cross-entropy is a Python
    autograd Function, so its forward and its backward both show up on the Python stack)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith("head_loss.py"):
            return True
        frame = frame.f_back
    return False


def group_of(func) -> str:
    if _in_head_loss():
        return "output heads (main, MTP)"
    if func is GROUPED:
        return "routed experts"
    if func in BATCHED:
        return "attention (scores, values)"
    return "other projections"


def time_alone(func, args, kwargs, reps: int) -> float:
    a = [_make(s) for s in args]
    kw = {k: _make(v) for k, v in kwargs.items()}
    func(*a, **kw)  # warm-up (and oneDNN's primitive for this shape)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        func(*a, **kw)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls of each GEMM alone")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: `tiny`, one timed step, one call per GEMM"
    )
    args = ap.parse_args()
    if args.quick:
        args.preset, args.steps, args.reps = "tiny", 1, 1
    print("machine:")
    print_machine_info()
    cfg = get_preset(args.preset)
    B, T = TrainConfig.batch_size, TrainConfig.seq_len
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opt = make_optimizer(model, 1e-4)

    def step(mode=None):
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1))
        with fast_matmul():
            if mode is None:
                model(tokens[:, :-1], targets=tokens[:, 1:], logits=False).loss.backward()
            else:
                with mode:
                    model(tokens[:, :-1], targets=tokens[:, 1:], logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balance_bias()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    recorder = GemmRecorder()
    step(recorder)  # one more step, to record its GEMMs

    peak0, said0 = matmul_peak(2048, 2048, 2048)
    by_group: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    with fast_matmul():
        for group, func, a, kw in recorder.calls:
            g = by_group[group]
            g[0] += time_alone(func, a, kw, args.reps)
            g[1] += gemm_flops(func, a)
            g[2] += 1
    peak1, said1 = matmul_peak(2048, 2048, 2048)
    peak = max(peak0, peak1)  # as bench_train.py: the larger of the peaks measured before and after
    model_flops = count_flops(cfg, T).full * B * T
    gemm_s = sum(g[0] for g in by_group.values())
    print(f"\nfp32 matmul peak (2048^3): {said0} before the GEMMs, {said1} after; using {peak:.0f}")
    print(f"{args.preset}: batch {B} x {T}, {model_flops / 1e9:.1f} GFLOP of model FLOPs per step")
    print(
        f"  training step: {step_s * 1e3:.0f} ms median of {args.steps}, MFU {model_flops / step_s / 1e9 / peak:.1%}"
    )
    print(
        f"\n  {'GEMMs timed alone':28s} {'calls':>6s} {'ms':>8s} {'of step':>8s} {'GFLOP/s':>8s} {'of peak':>8s}"
    )
    for name, (s, f, n) in sorted(by_group.items(), key=lambda kv: -kv[1][0]):
        print(
            f"  {name:28s} {n:6d} {s * 1e3:8.1f} {s / step_s:8.1%} {f / s / 1e9:8.0f} {f / s / 1e9 / peak:8.1%}"
        )
    all_f = sum(g[1] for g in by_group.values())
    print(
        f"  {'all GEMMs':28s} {len(recorder.calls):6d} {gemm_s * 1e3:8.1f} {gemm_s / step_s:8.1%} "
        f"{all_f / gemm_s / 1e9:8.0f} {all_f / gemm_s / 1e9 / peak:8.1%}"
    )
    print(
        f"  (the GEMMs execute {all_f / model_flops:.2f}x the model FLOPs: the experts' padding rows; the masked half "
        "of the attention scores is in both)"
    )
    other = step_s - gemm_s
    ceiling = model_flops / gemm_s / 1e9 / peak
    print(
        f"\n  everything else (norms, activations, softmax, gathers, routing, AdamW, Python): {other * 1e3:.0f} ms"
    )
    print(
        f"RESULT MFU now {model_flops / step_s / 1e9 / peak:.1%}; ceiling with these GEMM kernels {ceiling:.1%}"
    )
    budget = model_flops / (0.65 * peak * 1e9) - gemm_s
    if budget <= 0:
        print("RESULT 65% MFU is out of reach with these GEMM kernels even if nothing else took any time")
    else:
        print(
            f"RESULT 65% MFU needs everything else in {budget * 1e3:.0f} ms instead of {other * 1e3:.0f} "
            f"({other / budget:.1f}x less)"
        )


if __name__ == "__main__":
    main()
