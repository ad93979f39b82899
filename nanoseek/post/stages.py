"""The speedrun's post-training stages (DeepSeek-R1's pipeline in miniature, §2.3): a short SFT cold start on
generated reasoning traces, then GRPO with rule rewards, then a report section with held-out accuracy before and
after RL, reward/accuracy/length curves and sample traces.

Why a cold start at all: RL only sharpens what is already there (DeepSeekMath Fig. 7; REFERENCE §11). A
two-layer model pretrained on Shakespeare never writes `<think>`/`<answer>` on its own, so R1-Zero-style RL from
it would see all-zero rewards and all-zero advantages. The SFT stage is kept deliberately short: the model ends
it only partly able to solve the RL task, which leaves GRPO something to do. Sizes are chosen for the 2-core CPU
budget of `make run` (SFT ~1.5 min, GRPO 10 min, evaluations ~1-2 min).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.post.grpo import GRPOConfig, GRPOTrainer
from nanoseek.post.report import eval_table, grpo_summary, sample_traces
from nanoseek.post.sft import build_sft_trainer, task_conversations
from nanoseek.post.tasks import make_task
from nanoseek.train.trainer import TrainConfig


@dataclass
class StageConfig:
    sft_task: str
    rl_task: str
    sft_examples: int
    sft: dict = field(default_factory=dict)  # TrainConfig fields
    grpo: dict = field(default_factory=dict)  # GRPOConfig fields


def stage_config(quick: bool) -> StageConfig:
    if quick:
        return StageConfig(
            sft_task="add:digits=2",
            rl_task="add:digits=2",
            sft_examples=400,
            sft=dict(seq_len=64, batch_size=16, steps=10, lr=3e-3, warmup_steps=2),
            grpo=dict(
                steps=2, prompts_per_step=4, group_size=4, max_new_tokens=16, eval_problems=8, pass_k=2
            ),
        )
    return StageConfig(
        sft_task="add:digits=3",
        # RL on 2-digit sums, which the SFT model half solves (greedy ~32%, pass@8 ~52%): room for RL to sharpen.
        # On 3-digit sums (greedy ~22%, pass@8 ~31%) four GRPO settings gained nothing (docs/post_training.md).
        rl_task="add:digits=2",
        sft_examples=30000,
        sft=dict(seq_len=256, batch_size=32, steps=400, lr=3e-3, warmup_steps=20),
        grpo=dict(
            # The 10-minute RL budget binds, not the step count (~1,000-2,000 steps on 2 cores).
            steps=5000,
            max_minutes=10.0,
            prompts_per_step=8,
            group_size=8,
            max_new_tokens=64,
            lr=1e-4,
            # DAPO's dynamic sampling: groups whose 8 rewards are all equal carry no advantage, so they are
            # dropped and more problems drawn (up to 3 rounds). On the weakest SFT checkpoint so far this took
            # greedy accuracy +15.5 points in 600 steps, where plain sampling needed 1,500 steps for +12.
            dynamic_sampling=True,
            eval_every=200,
            eval_problems=200,
            pass_k=8,
        ),
    )


def post_training(
    run_dir: str | Path, quick: bool = False, resume: bool = False, log=print, progress=True
) -> list[str]:
    """SFT then GRPO from the pretrained run in `run_dir`; returns the report section (Markdown lines)."""
    run_dir = Path(run_dir)
    cfg = stage_config(quick)
    t0 = time.perf_counter()
    sft_cfg = TrainConfig(
        out=str(run_dir / "sft"),
        schedule="cosine",
        weight_decay=0.0,
        eval_every=10**9,
        ckpt_every=10**9,
        keep_last=1,
        **cfg.sft,
    )
    convs = task_conversations(make_task(cfg.sft_task), cfg.sft_examples, seed=0)
    log(f"post-training 1/2: SFT cold start on {len(convs)} worked `{cfg.sft_task}` solutions")
    trainer = build_sft_trainer(str(run_dir), convs, sft_cfg, resume=resume, log=log, progress=progress)
    trainer.fit()
    sft_seconds = time.perf_counter() - t0

    log(f"post-training 2/2: GRPO on `{cfg.rl_task}`")
    t1 = time.perf_counter()
    grpo_cfg = GRPOConfig(init=str(run_dir / "sft"), task=cfg.rl_task, out=str(run_dir / "grpo"), **cfg.grpo)
    rl = GRPOTrainer(grpo_cfg, log=log, progress=progress)
    if resume:
        rl.resume()
    result = rl.fit()
    grpo_seconds = time.perf_counter() - t1
    return report_section(run_dir, cfg, sft_seconds, grpo_seconds, result)


def report_section(
    run_dir: Path, cfg: StageConfig, sft_seconds: float, grpo_seconds: float, result: dict
) -> list[str]:
    s = grpo_summary(run_dir / "grpo")
    g = s["config"]
    steps = s["steps"]
    gen = sum(r["gen_s"] for r in steps)
    rl = sum(r["dt"] for r in steps)
    lines = [
        "## Post-training: SFT cold start, then GRPO (issue 6)",
        "",
        f"- SFT: {cfg.sft_examples:,} generated `{cfg.sft_task}` problems with worked `<think>` traces, "
        f"{cfg.sft['steps']} steps ({sft_seconds / 60:.1f} min), loss on assistant tokens only",
        f"- GRPO on `{cfg.rl_task}`: {result['step']} steps x {g['prompts_per_step']} prompts x G = "
        f"{g['group_size']} in {rl / 60:.1f} min of RL ({gen / max(rl, 1e-9):.0%} of it generating), "
        f"{grpo_seconds / 60:.1f} min with evaluations; loss `{g['loss_type']}`, beta {g['beta']}, "
        f"eps [{g['epsilon']}, {g['epsilon_high']}], lr {g['lr']}, rewards {', '.join(g['rewards'])}",
        "",
        f"Held-out accuracy on {g['eval_problems']} test problems (disjoint from training):",
        "",
        *eval_table(s["evals"], s["k"], labels=("after SFT, before RL", "after RL")),
        "",
        "![GRPO rewards and held-out accuracy](grpo/rewards.png)",
        "",
        "![response length](grpo/length.png)",
        "",
    ]
    return lines + sample_traces(s["samples"], n=2, heading="###")
