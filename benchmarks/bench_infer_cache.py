"""MLA's latent cache against the naive full K/V cache, in our own engine: bytes per token and decode time.

    python benchmarks/bench_infer_cache.py            # contexts 256 .. 4096, batch 1 and 8 (a few minutes)
    python benchmarks/bench_infer_cache.py --quick    # smoke run

Same model, same weights, two caches (REFERENCE §3; DeepSeek-V2 §2.1, App. C):
  latent    the absorbed path: caches the normed c_KV and the roped k_R, kv_lora_rank + qk_rope_head_dim numbers
            per token per layer; W_UK is folded into the query and W_UV applied after attention.
  full K/V  [M]'s attn_impl="naive": caches every head's K (nope + rope) and V, n_heads * (qk_head_dim +
            v_head_dim) numbers per token per layer, and runs standard attention over them.
Both run the model's own decode forward (`Engine(lean=False)`), so the two columns differ only in the cache. A
third column runs the latent cache through the engine's default lean decode step (nanoseek/infer/lean.py:
folded weights, attention as MQA over [c_kv ; k_rope]), to show how that path grows with the context.
Bytes per token are read off the engine's preallocated cache and checked against those formulas. Decode time
is one token per sequence at the given context (the cache holds `context` tokens), timed over a few steps after
a prefill; both contenders are interleaved (see common.py). The model is bench_infer.py's (hidden 256, 4
layers, 8 heads, kv_lora_rank 64, qk_rope_head_dim 16, 64 experts top-6), with weights in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import add_decode_threads_arg, print_machine_info  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402


def decode_seconds(engine: Engine, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step with `context` tokens already cached in each of `batch` sequences."""
    gen = torch.Generator().manual_seed(context)
    prompts = torch.randint(0, engine.model.cfg.vocab_size, (batch, context), generator=gen).tolist()
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)  # 1 from prefill + steps
    reqs = [engine.add(p, params) for p in prompts]
    while engine.waiting:  # prefill everything first (long prompts take several prefill steps)
        engine.step()
    start = time.perf_counter()
    while not all(r.finished for r in reqs):
        engine.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="256,512,1024,2048,4096")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    add_decode_threads_arg(ap)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.contexts, args.batches, args.steps, args.rounds = "64,256", "1", 3, 1
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = get_preset("small").replace(
        num_hidden_layers=4, num_nextn_predict_layers=0, max_position_embeddings=max(contexts) + 64
    )
    model = Transformer(cfg, seed=0).eval()

    print("bench_infer_cache: MLA latent cache vs full K/V cache (same model, our engine, fp32)")
    print_machine_info()
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    theory = {
        "latent": L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,
        "full K/V": L * H * (cfg.qk_head_dim + cfg.v_head_dim) * 4,
    }
    print("\nbytes per token (fp32, all layers):")
    for name, full_kv in (("latent", False), ("full K/V", True)):
        engine = Engine(model, max_batch=1, max_len=16, full_kv=full_kv)
        ok = "= theory" if engine.bytes_per_token == theory[name] else f"!= theory {theory[name]}"
        print(f"  {name:9s} {engine.bytes_per_token:>7,} B  {ok}")
    print(
        f"  ratio     {theory['full K/V'] / theory['latent']:.1f}x  (V3 in BF16: 70,272 vs 4,997,120 B = 71.1x)"
    )

    for B in [int(b) for b in args.batches.split(",")]:
        print(f"\ndecode ms per step at batch {B} (median of {args.rounds}; cache held by the batch in MiB):")
        print(
            f"  {'context':>7} | {'latent':>8} | {'full K/V':>8} | {'full/latent':>11} | {'lean latent':>11} | "
            f"{'MiB latent':>10} | MiB full"
        )
        for ctx in contexts:
            engines = {
                name: Engine(model, max_batch=B, max_len=ctx + args.steps + 2, full_kv=fk, lean=lean)
                for name, fk, lean in (
                    ("latent", False, False),
                    ("full K/V", True, False),
                    ("lean", False, True),
                )
            }
            times: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):  # interleaved: a slow spell of the machine hits both
                for name, engine in engines.items():
                    times[name].append(decode_seconds(engine, B, ctx, args.steps))
            lat, full, lean = (statistics.median(times[n]) for n in ("latent", "full K/V", "lean"))
            mib = {n: B * ctx * theory[n] / 2**20 for n in theory}
            print(
                f"  {ctx:>7} | {lat * 1e3:>8.2f} | {full * 1e3:>8.2f} | {full / lat:>10.2f}x | {lean * 1e3:>11.2f} | "
                f"{mib['latent']:>10.1f} | {mib['full K/V']:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
