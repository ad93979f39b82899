"""GRPO rollouts through the inference engine, and where the time of a GRPO step goes.

    python benchmarks/bench_grpo.py                      # tiny model, 64 rollouts x 64 tokens, 4 GRPO steps
    python benchmarks/bench_grpo.py --run runs/speedrun/sft   # a trained policy: natural completion lengths
    python benchmarks/bench_grpo.py --quick              # smoke run

1. Rollout throughput: B x G = 64 requests (8 prompts x 8 samples) of `--new` tokens each, sampled at temperature
   1 with the stop token ignored, so every contender generates the same number of tokens. Contenders: the engine
   (one batch: a prefill of all 64 prompts, then batched decode steps over the latent cache) and the sequential
   loop of nanoseek/sample.py (one request at a time, the same model cache), which is what rollouts would cost
   without batching. Interleaved rounds, median and best (benchmarks/common.py).
2. A GRPO step: `GRPOTrainer.train_step` on mul:digits=2 with the default settings (B = 8, G = 8, dapo loss,
   mu = 1), split into rollout generation + rewards (`gen_s`) and the policy update (`train_s`: log-prob
   forward, backward, AdamW). Completions stop at the end-of-turn token, so their lengths depend on the policy:
   a random model runs to `max_new_tokens`, a trained one stops after its answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import print_machine_info, time_interleaved  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.sample import generate  # noqa: E402


def random_run(path: Path) -> Path:
    """The tiny preset, random init, with a tokenizer trained on task text, saved as a run folder."""
    from nanoseek.post.tasks import make_task
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.checkpoint import save_checkpoint

    text = [p.prompt + p.solution() for p in make_task("add+mul:digits=2").problems("train", 500)]
    tok = train_tokenizer(text * 4, vocab_size=512)
    model = Transformer(get_preset("tiny").replace(vocab_size=tok.vocab_size), seed=0)
    tok.save(path / "tokenizer.json")
    save_checkpoint(path, 0, model, config=model.cfg.to_dict(), tokenizer_path=path / "tokenizer.json")
    return path


def rollout_throughput(model, prompts: list[list[int]], new: int, rounds: int) -> dict[str, list[float]]:
    params = [
        SamplingParams(max_tokens=new, temperature=1.0, seed=i, ignore_eos=True) for i in range(len(prompts))
    ]
    engine = Engine(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + new + 1)

    def batched():
        engine.generate(prompts, params)

    def sequential():
        for i, p in enumerate(prompts):
            generate(model, p, new, temperature=1.0, top_k=None, stop_ids=None, seed=i)

    return time_interleaved(
        {"engine (batched)": batched, "sequential loop": sequential}, warmup=1, iters=rounds
    )


def grpo_step_split(run: Path, steps: int, max_new: int, out: Path) -> list[dict]:
    from nanoseek.post.grpo import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(
        init=str(run),
        task="mul:digits=2",
        out=str(out),
        steps=steps,
        max_new_tokens=max_new,
        eval_problems=0,
        ckpt_every=10**6,
        device="cpu",
    )
    trainer = GRPOTrainer(cfg, log=lambda *a: None, progress=False)
    trainer.train_step()  # warm-up: allocates the engine's cache pool
    return [trainer.train_step() for _ in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", help="a trained policy (run folder); default: the tiny preset, random init")
    ap.add_argument("--new", type=int, default=64, help="new tokens per rollout (64)")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (3)")
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps timed (4)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.new, args.rounds, args.steps = 8, 1, 1
    print("machine:")
    print_machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else random_run(Path(tmp))
        from nanoseek.infer import load
        from nanoseek.post.chat import prompt_format
        from nanoseek.post.tasks import make_task

        model, tok = load(run)
        fmt = prompt_format(tok, "r1")
        questions = [p.prompt for p in make_task("mul:digits=2").problems("train", 8)]
        prompts = [fmt.prompt_ids(q) for q in questions for _ in range(8)]
        print(
            f"\nrollouts: {len(prompts)} requests x {args.new} new tokens, prompts of ~{len(prompts[0])} tokens "
            f"({'random init' if not args.run else run})"
        )
        times = rollout_throughput(model, prompts, args.new, args.rounds)
        n_tokens = len(prompts) * args.new
        print("| generator | median s | best s | tokens/s (median) |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name} | {med:.2f} | {min(ts):.2f} | {n_tokens / med:,.0f} |")
        speedup = statistics.median(times["sequential loop"]) / statistics.median(times["engine (batched)"])
        print(f"engine speedup over the sequential loop: {speedup:.1f}x")

        recs = grpo_step_split(run, args.steps, args.new, Path(tmp) / "grpo")
        gen = statistics.median(r["gen_s"] for r in recs)
        train = statistics.median(r["train_s"] for r in recs)
        length = statistics.mean(r["length"] for r in recs)
        tok_s = statistics.median(r["gen_tok_s"] for r in recs)
        print(
            f"\nGRPO step (8 prompts x G=8, mean completion {length:.0f} tokens, median of {len(recs)} steps):"
        )
        print("| part | seconds | share |")
        print("|---|---|---|")
        print(f"| rollouts + rewards | {gen:.2f} | {gen / (gen + train):.0%} |")
        print(f"| policy update (forward, backward, AdamW) | {train:.2f} | {train / (gen + train):.0%} |")
        print(f"rollout throughput inside the step: {tok_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
