"""The speedrun's post-training stages (DeepSeek-R1's pipeline in miniature, §2.3): a short SFT cold start on
generated reasoning traces, then GRPO with rule rewards, then a report section with held-out accuracy before and
after RL, reward/accuracy/length curves and sample traces.

Why a cold start at all: RL only sharpens what is already there (DeepSeekMath Fig. 7; REFERENCE §11). A
two-layer model pretrained on Shakespeare never writes `<think>`/`<answer>` on its own, so R1-Zero-style RL from
it would see all-zero rewards and all-zero advantages. The SFT stage is kept deliberately short: the model ends
it only partly able to solve the RL task, which leaves GRPO something to do. Sizes are chosen for the 2-core CPU
budget of `make run` (SFT ~1.5 min, GRPO 10 min, evaluations ~1-2 min).

Which RL task? How well the SFT model does varies a lot between pretrained models of equal validation loss:
four from session 2 scored 32.5-35% greedy on 2-digit sums after SFT, the current code's one 94%. So the RL task
is chosen by measurement, not fixed: the SFT model is probed on a ladder of sums (2, 3, 4 digits) and GRPO runs on
the one with the largest pass@8 - pass@1 gap among those it solves at most 80% greedily. That gap is the room RL
has: it mostly sharpens the policy toward answers it can already sample (DeepSeekMath §5.2.2; docs/post_training.md
has the runs where a small gap gave no gain).
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
    rl_tasks: tuple[str, ...]  # candidates, easiest first; one = no probe
    sft_examples: int
    sft: dict = field(default_factory=dict)  # TrainConfig fields
    grpo: dict = field(default_factory=dict)  # GRPOConfig fields


def stage_config(quick: bool) -> StageConfig:
    if quick:
        return StageConfig(
            sft_task="add:digits=2",
            rl_tasks=("add:digits=2",),
            sft_examples=400,
            sft=dict(seq_len=64, batch_size=16, steps=10, lr=3e-3, warmup_steps=2),
            grpo=dict(
                steps=2, prompts_per_step=4, group_size=4, max_new_tokens=16, eval_problems=8, pass_k=2
            ),
        )
    return StageConfig(
        sft_task="add:digits=3",
        # Typical SFT models half solve 2-digit sums (greedy ~33%, pass@8 ~52%) and barely 3-digit ones (22% /
        # 31%: four GRPO settings gained nothing there); a stronger one solved 94% of 2-digit sums. The probe picks.
        rl_tasks=("add:digits=2", "add:digits=3", "add:digits=4"),
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

    t1 = time.perf_counter()
    probes = []
    if len(cfg.rl_tasks) > 1:
        log(f"probing the SFT model on {', '.join(cfg.rl_tasks)} to choose the RL task")
        g = cfg.grpo
        probes = probe_tasks(
            run_dir / "sft", cfg.rl_tasks, g["eval_problems"], g["pass_k"], g["max_new_tokens"]
        )
        for task, greedy, passk in probes:
            log(f"  {task}: greedy pass@1 {greedy:.1%}, pass@{cfg.grpo['pass_k']} {passk:.1%}")
    rl_task = choose_rl_task(probes) if probes else cfg.rl_tasks[0]
    log(f"post-training 2/2: GRPO on `{rl_task}`")
    grpo_cfg = GRPOConfig(init=str(run_dir / "sft"), task=rl_task, out=str(run_dir / "grpo"), **cfg.grpo)
    rl = GRPOTrainer(grpo_cfg, log=log, progress=progress)
    if resume:
        rl.resume()
    result = rl.fit()
    grpo_seconds = time.perf_counter() - t1
    return report_section(run_dir, cfg, sft_seconds, grpo_seconds, result, rl_task, probes)


def probe_tasks(
    init: str | Path, tasks, problems: int, k: int, max_new_tokens: int = 64
) -> list[tuple[str, float, float]]:
    """(task, greedy pass@1, pass@k) of the policy in `init` on each task's held-out problems, generated as
    GRPO's own evaluations do (same problems, same completion cap)."""
    from nanoseek.infer import load
    from nanoseek.post.chat import prompt_format
    from nanoseek.post.evaluate import evaluate
    from nanoseek.post.rollout import Sampler

    model, tokenizer = load(str(init))
    model.float().eval()
    sampler = Sampler(model, prompt_format(tokenizer, "r1"), max_new_tokens=max_new_tokens)
    rows = []
    for task in tasks:
        r = evaluate(sampler, make_task(task).problems("test", problems, seed=0), k=k, examples=0)
        rows.append((task, r["greedy_pass1"], r[f"pass{k}"]))
    return rows


def choose_rl_task(probes: list[tuple[str, float, float]], max_solved: float = 0.8) -> str:
    """The task with the most room for RL (pass@k - greedy pass@1) among those solved at most `max_solved`
    greedily; the hardest (last) one if the model solves them all beyond that."""
    open_tasks = [p for p in probes if p[1] <= max_solved] or probes[-1:]
    return max(open_tasks, key=lambda p: p[2] - p[1])[0]


def report_section(
    run_dir: Path,
    cfg: StageConfig,
    sft_seconds: float,
    grpo_seconds: float,
    result: dict,
    rl_task: str,
    probes: list[tuple[str, float, float]] = (),
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
        f"- GRPO on `{rl_task}`: {result['step']} steps x {g['prompts_per_step']} prompts x G = "
        f"{g['group_size']} in {rl / 60:.1f} min of RL ({gen / max(rl, 1e-9):.0%} of it generating), "
        f"{grpo_seconds / 60:.1f} min with evaluations; loss `{g['loss_type']}`, beta {g['beta']}, "
        f"eps [{g['epsilon']}, {g['epsilon_high']}], lr {g['lr']}, rewards {', '.join(g['rewards'])}",
        *(
            [
                "- RL task chosen by probing the SFT model (largest pass@k - pass@1 gap among tasks it solves "
                "<= 80% greedily): "
                + "; ".join(f"`{t}` {gr:.1%} / {pk:.1%}" for t, gr, pk in probes)
                + " (greedy pass@1 / pass@k)"
            ]
            if probes
            else []
        ),
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
