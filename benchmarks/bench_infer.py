"""Decode throughput: our engine against transformers' `generate()` on the same checkpoint.

    python benchmarks/bench_infer.py            # batch 1, 8, 32; prompt 32 + 128 new tokens (a few minutes)
    python benchmarks/bench_infer.py --quick    # smoke run (seconds)

The checkpoint is built in transformers (random init, DeepseekV3ForCausalLM, fp32), saved with
`save_pretrained`, and loaded by `nanoseek.load`: both sides run the very same weights. The config is the
issue's 25M-total / 8M-active model: hidden 256, 4 layers (1 dense + 3 MoE), 64 routed experts top-6 + 2 shared,
vocab 8192, MLA with kv_lora_rank 64 (the `small` preset cut to 4 layers, without MTP).

Both sides decode greedily and never stop early; the time covers prefill and decode (the whole `generate`
call), tokens/s = batch * new tokens / seconds. transformers keeps MLA's latent in its cache but re-expands
K and V through kv_b_proj at every step (REFERENCE §8); ours prefills and decodes through the lean step over the
latent cache (nanoseek/infer/lean.py: W_UK / W_UV folded, MQA over [c_kv ; k_rope], dense matrices prepacked for
oneDNN where that is faster; `--reference-decode` runs the model's own forward instead) and samples the whole
batch with a few tensor ops. Both compute logits only at the last prompt position when prefilling. The fraction of identical greedy tokens is printed as a check
that both compute the same model (a near-tie may flip a token and everything after it, so it need not be 1).
A third contender, our engine with the model's own forward (`Engine(lean=False)`), runs in the same rounds; the
last column is its time over the lean step's (skipped with --reference-decode).
Timing: interleaved rounds (ours, transformers, ours, ...), median and best round reported; see common.py.

The memory floor: a decode step must read every weight it uses once (fp32). At batch B that is all non-expert
weights (the embedding excepted: one row per token) plus the routed experts the step touches, E (1 - (1 - k/E)^B)
per MoE layer in expectation for uniform routing. The script measures the read bandwidth (a matrix-vector
product over 256 MB, far beyond the caches) with the same thread count, and prints bytes / bandwidth: no
implementation of this fp32 model decodes a step faster, so transformers' step time over it bounds the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import add_decode_threads_arg, print_machine_info, time_interleaved  # noqa: E402
from nanoseek.config import get_preset, to_hf_dict  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402

TARGETS = {1: 3.0, 32: 5.0}  # issue 4: ours / transformers decode tokens/s at batch 1 and 32


def build_checkpoint(path: Path):
    """A random transformers DeepseekV3 model saved to `path`; returns it (eval, fp32)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = get_preset("small").replace(num_hidden_layers=4, num_nextn_predict_layers=0)
    hf_cfg = DeepseekV3Config(**{**to_hf_dict(cfg), "initializer_range": 0.02})
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    hf.generation_config.eos_token_id = None  # never stop early
    hf.save_pretrained(path)
    return hf


def read_bandwidth(mbytes: int = 256) -> float:
    """Bytes/s a matrix-vector product streams from memory (median of 7), at the current thread count."""
    a = torch.randn(mbytes * 2**20 // 4 // 4096, 4096)
    v = torch.randn(4096)
    torch.mv(a, v)
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        torch.mv(a, v)
        ts.append(time.perf_counter() - t)
    return a.numel() * 4 / statistics.median(ts)


def step_weight_bytes(model, B: int) -> float:
    """fp32 bytes of weights one decode step at batch B reads (expected distinct routed experts per layer)."""
    cfg = model.cfg
    total = 0.0
    for name, p in model.named_parameters():
        if name.startswith("embed.") or name.startswith("mtp."):
            continue  # embedding: B rows, negligible; MTP modules are not used by plain decoding
        if ".experts.w" in name:
            E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
            total += p.numel() * 4 * (1 - (1 - k / E) ** B)  # p holds all E experts
        else:
            total += p.numel() * 4
    return total


def moe_layers_ms(ours, B: int, reps: int = 20) -> float:
    """ms per step the MoE layers alone take at batch B, as the lean step runs them (router, shared and routed
    experts; random hidden states, so random routing), called back to back: each layer's experts are out of the
    caches again by its next call, as in a real step."""
    from nanoseek.infer.lean import LeanDecoder

    dec = LeanDecoder(ours)
    layers = [lw for lw in (dec._layer(b) for b in ours.layers) if lw.moe is not None]
    gen = torch.Generator().manual_seed(B)
    hs = [torch.randn(B, ours.cfg.hidden_size, generator=gen) for _ in range(8)]
    ts = []
    with torch.inference_mode():
        for r in range(reps + 2):
            x, h = torch.zeros_like(hs[0]), hs[r % len(hs)]
            t = time.perf_counter()
            for lw in layers:
                dec._moe(lw, x, h)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts[2:]) * 1e3


def compare(hf, ours, B: int, args) -> tuple[float, float, float]:
    """Time both at batch B; print one table row; return (ours tok/s, transformers tok/s, ratio), medians."""
    gen = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, ours.cfg.vocab_size, (B, args.prompt), generator=gen)
    engine = Engine(ours, max_batch=B, max_len=args.prompt + args.new, lean=not args.reference_decode)
    reference = Engine(ours, max_batch=B, max_len=args.prompt + args.new, lean=False)
    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    got: dict[str, torch.Tensor] = {}

    def run_ours():
        reqs = engine.generate(prompts.tolist(), params)
        got["ours"] = torch.tensor([r.output for r in reqs])

    def run_reference():
        reference.generate(prompts.tolist(), params)

    @torch.inference_mode()
    def run_hf():
        out = hf.generate(prompts, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
        got["hf"] = out[:, args.prompt :]

    fns = {"ours": run_ours, "hf": run_hf}
    if not args.reference_decode:
        fns["reference"] = run_reference
    times = time_interleaved(fns, warmup=1, iters=args.rounds)
    tokens = B * args.new
    ours_tps = [tokens / t for t in times["ours"]]
    hf_tps = [tokens / t for t in times["hf"]]
    ratio = [a / b for a, b in zip(ours_tps, hf_tps)]  # per round: both saw the same machine state
    same = float((got["ours"] == got["hf"]).float().mean())
    lean_gain = (
        ""
        if args.reference_decode
        else f" | {statistics.median(t / o for t, o in zip(times['reference'], times['ours'])):.2f}x"
    )
    print(
        f"{B:>5} | {statistics.median(ours_tps):>7.0f} ({max(ours_tps):>6.0f}) | "
        f"{statistics.median(hf_tps):>9.0f} ({max(hf_tps):>6.0f}) | "
        f"{statistics.median(ratio):>6.2f}x ({max(ratio):>4.2f}x) | {same:.2f}{lean_gain}",
        flush=True,
    )
    return statistics.median(ours_tps), statistics.median(hf_tps), statistics.median(ratio)


def print_floor(ours, results: dict, args) -> None:
    bw = read_bandwidth()
    print(f"\nmemory floor ({args.threads} thread(s), read bandwidth {bw / 1e9:.1f} GB/s):")
    print(
        f"{'batch':>5} | {'MB read/step':>12} | {'floor ms/step':>13} | {'ours ms/step':>12} | "
        f"{'transformers ms/step':>20} | max possible ratio"
    )
    for B, (ours_tps, hf_tps, _) in results.items():
        mb = step_weight_bytes(ours, B) / 1e6
        floor = mb * 1e6 / bw * 1e3
        ours_ms, hf_ms = B / ours_tps * 1e3, B / hf_tps * 1e3
        print(
            f"{B:>5} | {mb:>12.1f} | {floor:>13.2f} | {ours_ms:>12.2f} | {hf_ms:>20.2f} | {hf_ms / floor:.1f}x"
        )
    print("\nthe MoE layers alone (as the lean step runs them) against the whole step a target allows:")
    print(
        f"{'batch':>5} | {'MoE layers ms/step':>18} | {'their share of ours':>19} | target | whole-step budget ms"
    )
    for B, (ours_tps, hf_tps, _) in results.items():
        moe_ms, ours_ms, hf_ms = moe_layers_ms(ours, B), B / ours_tps * 1e3, B / hf_tps * 1e3
        goal = TARGETS.get(B)
        budget = f"{goal:>5.0f}x | {hf_ms / goal:>20.2f}" if goal else f"{'-':>6} | {'-':>20}"
        print(f"{B:>5} | {moe_ms:>18.2f} | {moe_ms / ours_ms:>19.0%} | {budget}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    add_decode_threads_arg(ap)
    ap.add_argument(
        "--reference-decode",
        action="store_true",
        help="our engine decodes with the model's own forward instead of the lean step (nanoseek/infer/lean.py)",
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.new, args.rounds = "1,4", 16, 1
    torch.set_num_threads(args.threads)
    import nanoseek

    print("bench_infer: decode tokens/s, ours vs transformers generate() (same checkpoint, fp32, greedy)")
    print_machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp))
        ours = nanoseek.load(tmp)
    n_params = sum(p.numel() for p in ours.parameters())
    path = "the model's forward (--reference-decode)" if args.reference_decode else "the lean step"
    print(f"  model: {n_params / 1e6:.1f}M params, prompt {args.prompt} + {args.new} new tokens")
    print(f"  our decode path: {path}\n")
    lean_col = "" if args.reference_decode else " | lean step vs our model forward"
    print(
        f"{'batch':>5} | {'ours tok/s':>16} | {'transformers tok/s':>18} | {'speedup':>14} | same tokens{lean_col}"
    )
    print(f"{'':>5} | {'median (best)':>16} | {'median (best)':>18} | {'median (best)':>14} |")
    results = {B: compare(hf, ours, B, args) for B in [int(b) for b in args.batches.split(",")]}
    print_floor(ours, results, args)
    for B, target in TARGETS.items():
        if B in results:
            verdict = "met" if results[B][2] >= target else "NOT met"
            print(f"target >= {target:.0f}x at batch {B}: {verdict} ({results[B][2]:.2f}x)")


if __name__ == "__main__":
    main()
