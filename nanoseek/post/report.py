"""Plots and a Markdown report for a GRPO run, from what the run wrote (metrics.jsonl, samples.jsonl).

Three figures next to the report: `rewards.png` (training reward and accuracy per step, held-out greedy pass@1,
mean@k and pass@k at each evaluation), `length.png` (mean and max response length; R1-Zero's Fig. 3 is this
curve), `stability.png` (entropy, clip fraction, KL when beta > 0, and the fraction of groups with zero reward
std, i.e. no learning signal).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanoseek.train.report import _smooth, read_metrics  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rewards(steps: list[dict], evals: list[dict], path: Path, k: int | None) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["step"] for r in steps]
    a.plot(x, _smooth([r["reward"] for r in steps], 0.8), label="reward (EMA)")
    a.plot(x, _smooth([r["accuracy"] for r in steps], 0.8), label="accuracy of samples (EMA)")
    a.plot(x, _smooth([r["format"] for r in steps], 0.8), ":", label="format rate (EMA)")
    a.set_xlabel("RL step")
    a.set_title("training rollouts")
    a.grid(alpha=0.3)
    a.legend()
    if evals:
        ex = [e["step"] for e in evals]
        b.plot(ex, [e["greedy_pass1"] for e in evals], "o-", label="greedy pass@1")
        if k and f"pass{k}" in evals[0]:
            b.plot(ex, [e[f"mean{k}"] for e in evals], "s-", label=f"sampled mean@{k}")
            b.plot(ex, [e[f"pass{k}"] for e in evals], "^-", label=f"pass@{k}")
        b.set_ylim(0, 1)
        b.legend()
    b.set_xlabel("RL step")
    b.set_title("held-out test problems")
    b.grid(alpha=0.3)
    _save(fig, path)


def plot_length(steps: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["step"] for r in steps]
    ax.plot(x, _smooth([r["length"] for r in steps], 0.8), label="mean (EMA)")
    ax.plot(x, [r["length_max"] for r in steps], ":", alpha=0.6, label="max")
    ax.set_xlabel("RL step")
    ax.set_ylabel("response length (tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_stability(steps: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["step"] for r in steps]
    for key, label in (
        ("entropy", "entropy (nats/token)"),
        ("frac_zero_std", "groups with zero reward std"),
        ("clip_low", "clipped low (token fraction)"),
        ("clip_high", "clipped high (token fraction)"),
        ("kl", "k3 KL to reference (per token)"),
    ):
        if any(key in r for r in steps):
            ax.plot(x, _smooth([r.get(key, 0.0) for r in steps], 0.8), label=label)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def read_samples(run_dir: Path) -> list[dict]:
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def grpo_summary(run_dir: str | Path) -> dict:
    """Plots written into run_dir, plus the numbers a report needs."""
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "grpo_config.json").read_text())
    steps, evals = read_metrics(run_dir)
    k = cfg.get("pass_k") or None
    if steps:
        plot_rewards(steps, evals, run_dir / "rewards.png", k)
        plot_length(steps, run_dir / "length.png")
        plot_stability(steps, run_dir / "stability.png")
    return {"config": cfg, "steps": steps, "evals": evals, "samples": read_samples(run_dir), "k": k}


def eval_table(
    evals: list[dict], k: int | None, labels: tuple[str, str] = ("before RL", "after RL")
) -> list[str]:
    """Markdown rows comparing the first and last evaluation."""
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    cols = [("greedy pass@1", "greedy_pass1")]
    if k and f"pass{k}" in first:
        cols += [(f"sampled mean@{k}", f"mean{k}"), (f"pass@{k}", f"pass{k}")]
    cols += [("format (greedy)", "greedy_format"), ("length (greedy, tokens)", "greedy_length")]
    rows = [
        f"| | {labels[0]} (step {first['step']}) | {labels[1]} (step {last['step']}) | change |",
        "|---|---|---|---|",
    ]
    for name, key in cols:
        a, b = first.get(key, 0.0), last.get(key, 0.0)
        if key == "greedy_length":
            rows.append(f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        else:
            rows.append(f"| {name} | {a:.1%} | {b:.1%} | {100 * (b - a):+.1f} points |")
    return rows


def write_grpo_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    s = grpo_summary(run_dir)
    cfg, steps, evals = s["config"], s["steps"], s["evals"]
    lines = [
        f"# GRPO run `{run_dir.name}`",
        "",
        f"Task `{cfg['task']}`, mode {cfg['mode']}, from `{cfg['init']}`.",
        "",
    ]
    if steps:
        last = steps[-1]
        gen = sum(r["gen_s"] for r in steps)
        total = sum(r["dt"] for r in steps)
        lines += [
            f"- {last['step']} steps in {last['rl_seconds'] / 60:.1f} min of RL ({gen / max(total, 1e-9):.0%} "
            f"of it generating rollouts), {cfg['prompts_per_step']} prompts x G = {cfg['group_size']}",
            f"- loss `{cfg['loss_type']}`, scale_rewards `{cfg['scale_rewards']}`, beta {cfg['beta']}, "
            f"eps [{cfg['epsilon']}, {cfg['epsilon_high']}], mu {cfg['mu']}, lr {cfg['lr']}",
            "",
        ]
    lines += ["## Held-out accuracy", ""] + eval_table(evals, s["k"]) + [""]
    lines += ["![rewards](rewards.png)", "", "![length](length.png)", "", "![stability](stability.png)", ""]
    lines += sample_traces(s["samples"])
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def sample_traces(samples: list[dict], n: int = 3, heading: str = "##") -> list[str]:
    """Markdown blocks with the held-out traces of the first and the last evaluation."""
    if not samples:
        return []
    lines = [f"{heading} Sample traces (held-out, greedy)", ""]
    for rec in (samples[0], samples[-1]) if len(samples) > 1 else (samples[0],):
        lines += [f"Step {rec['step']}:", ""]
        for ex in rec["examples"][:n]:
            mark = "correct" if ex["correct"] else f"wrong (answer {ex['answer']})"
            lines += ["```", f"{ex['prompt']}", f"{ex['completion']}", f"-> {mark}", "```", ""]
    return lines
