"""MTP speculative decoding on a trained model: draft acceptance and decode speedup (DeepSeek-V3 §5.4.3).

    python benchmarks/bench_infer_spec.py                  # runs/speedrun if it exists, else trains one (minutes)
    python benchmarks/bench_infer_spec.py --model DIR      # any nanoseek run or HF folder with an MTP module
    python benchmarks/bench_infer_spec.py --quick          # smoke run on a model trained for a few steps

DeepSeek-V3 reports 85-90% acceptance of the second token and 1.8x tokens/s. Here: the speedrun's model (the
`tiny` preset: d128, 2 layers, 16 experts, one MTP module) on Shakespeare. Without `runs/speedrun`, the same
configuration is trained for --train-steps steps into runs/bench_infer_spec (reused on the next run).

For each batch size and decoding mode (greedy; temperature 0.8 with top-k 50), plain and speculative decoding
generate the same requests, interleaved round by round. Reported: tokens/s of each, the speedup, the acceptance
rate (accepted drafts / drafts), and for greedy whether the two outputs are identical token for token (they must
be: the rule is lossless). A speculative step costs one main forward over 2 tokens plus the MTP block, and yields
1 + (accepted) tokens, so the speedup is about (1 + acceptance) / (cost of that step / cost of a plain step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import print_machine_info  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.infer.engine import load  # noqa: E402

PROMPTS = [
    "ROMEO:\n",
    "To be, or not to be",
    "KING HENRY V:\nOnce more",
    "JULIET:\nO Romeo, Romeo!",
    "HAMLET:\nThe play's the thing",
    "First Citizen:\nBefore we proceed",
    "MACBETH:\nIs this a dagger",
    "PORTIA:\nThe quality of mercy",
]


def trained_model(args) -> Path:
    """A trained run folder: --model, runs/speedrun, or one trained (and kept) here."""
    if args.model:
        return Path(args.model)
    if not args.quick and (Path("runs/speedrun") / "checkpoints").is_dir():
        return Path("runs/speedrun")
    out = Path("runs/bench_infer_spec_quick" if args.quick else "runs/bench_infer_spec")
    if (out / "checkpoints").is_dir():
        return out
    from nanoseek.speedrun import speedrun_configs
    from nanoseek.train.run import build_trainer, prepare_data

    steps = 20 if args.quick else args.train_steps
    model_cfg, train_cfg, vocab = speedrun_configs(args.quick, str(out), steps)
    print(f"training the speedrun model for {steps} steps into {out} (kept for the next run) ...", flush=True)
    t = time.perf_counter()
    prepared = prepare_data("default", None, vocab, progress=False)
    build_trainer(model_cfg, train_cfg, prepared, progress=False, log=lambda *a: None).fit()
    print(f"trained in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list, float]:
    """(seconds, outputs, acceptance rate of this run)."""
    d0, a0 = engine.stats.draft_tokens, engine.stats.accepted_tokens
    t = time.perf_counter()
    reqs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t
    drafts = engine.stats.draft_tokens - d0
    rate = (engine.stats.accepted_tokens - a0) / drafts if drafts else float("nan")
    return seconds, [r.output for r in reqs], rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a trained run/HF folder with an MTP module")
    ap.add_argument("--train-steps", type=int, default=400, help="steps when a model has to be trained (400)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: decode is latency-bound)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.new, args.rounds = "1", 16, 1
    torch.set_num_threads(args.threads)
    path = trained_model(args)
    model, tok = load(path)
    if not len(model.mtp):
        sys.exit(f"{path}: this model has no MTP module")
    print(f"bench_infer_spec: MTP speculative decoding on {path} ({model.num_params() / 1e6:.2f}M params)")
    print_machine_info()
    bos = [tok.bos_id] if tok.bos_id is not None else []
    modes = {
        "greedy": SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True),
        "T=0.8 top-k 50": SamplingParams(
            max_tokens=args.new, temperature=0.8, top_k=50, seed=0, ignore_eos=True
        ),
    }
    print(f"\n{'batch':>5} | {'mode':>14} | {'plain tok/s':>11} | {'spec tok/s':>10} | {'speedup':>7} | "
          f"{'accepted':>8} | identical")  # fmt: skip
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [bos + tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(B)]
        max_len = max(map(len, prompts)) + args.new + 2
        plain = Engine(model, tok, max_batch=B, max_len=max_len)
        spec = Engine(model, tok, max_batch=B, max_len=max_len, speculative=True)
        for mode, params in modes.items():
            t_plain, t_spec, rates = [], [], []
            for _ in range(args.rounds):
                s, out_plain, _ = run(plain, prompts, params)
                t_plain.append(s)
                s, out_spec, rate = run(spec, prompts, params)
                t_spec.append(s)
                rates.append(rate)
            tokens = B * args.new
            speedups = [p / s for p, s in zip(t_plain, t_spec)]
            same = "yes" if out_plain == out_spec else "NO"
            print(
                f"{B:>5} | {mode:>14} | {tokens / statistics.median(t_plain):>11.0f} | "
                f"{tokens / statistics.median(t_spec):>10.0f} | {statistics.median(speedups):>6.2f}x | "
                f"{statistics.median(rates):>7.1%} | {same if params.greedy else 'n/a (sampled)'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
