"""Turn a run directory into pictures and a `report.md`: loss curves, balance (MaxVio + expert load), throughput.

Reads only what the trainer wrote (`metrics.jsonl`, `config.json`, `train_config.json`), so it works on any run,
finished or not. Plots are PNGs next to the report; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nanoseek.accounting import inspect_report  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.inspect_format import format_report  # noqa: E402


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) from metrics.jsonl; a half-written last line is ignored."""
    steps, evals = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return steps, evals
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "eval":
            evals.append(rec)
        elif rec.get("event") is None:
            steps.append(rec)
    return steps, evals


def _smooth(xs: list[float], beta: float = 0.9) -> list[float]:
    out, avg = [], None
    for i, x in enumerate(xs):
        avg = x if avg is None else beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (i + 1)) if i < 50 else avg)  # bias-corrected EMA, like TensorBoard
    return out


def plot_losses(steps: list[dict], evals: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["step"] for r in steps]
    ax.plot(x, _smooth([r["lm_loss"] for r in steps]), label="train: main next-token loss (EMA)")
    if any(r.get("mtp_loss") for r in steps):
        ax.plot(x, _smooth([r["mtp_loss"] for r in steps]), label="train: MTP loss, lambda-weighted (EMA)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_balance(steps: list[dict], path: Path) -> bool:
    with_vio = [r for r in steps if "max_vio" in r]
    loads = [r for r in steps if "expert_load" in r]
    if not with_vio:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([r["step"] for r in with_vio], _smooth([r["max_vio"] for r in with_vio], 0.8))
    a.set_xlabel("optimizer step")
    a.set_ylabel("MaxVio (mean over MoE layers, EMA)")
    a.set_title("load violation: (max load - mean) / mean")
    a.grid(alpha=0.3)
    if loads:
        first, last = loads[0], loads[-1]
        for rec, style in ((first, ":"), (last, "-")):
            load = torch.tensor(rec["expert_load"][0])
            share = (load / load.sum()).sort(descending=True).values * len(load)
            b.plot(share.tolist(), style, label=f"layer 1, step {rec['step']}")
        b.axhline(1.0, color="gray", lw=0.8)
        b.set_xlabel("expert rank (most loaded first)")
        b.set_ylabel("load / mean load")
        b.set_title("expert-load histogram")
        b.legend()
        b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {dev}, torch {torch.__version__}, Python {platform.python_version()}"


def write_report(
    run_dir: str | Path, samples: list[str] | None = None, extra: dict[str, Any] | None = None
) -> Path:
    run_dir = Path(run_dir)
    cfg = ModelConfig.load(run_dir / "config.json")
    tcfg = json.loads((run_dir / "train_config.json").read_text())
    steps, evals = read_metrics(run_dir)
    plot_losses(steps, evals, run_dir / "loss.png")
    has_balance = plot_balance(steps, run_dir / "balance.png")
    timed = steps[min(3, len(steps) - 1) :] if steps else []  # skip warm-up steps
    tok_s = sum(r["tok_s"] for r in timed) / max(len(timed), 1)
    mfu = sum(r["mfu"] for r in timed) / max(len(timed), 1)
    wall = sum(r["dt"] for r in steps)
    lines = [f"# nanoseek run: `{run_dir.name}`", ""]
    lines += [f"Machine: {machine_info()}", ""]
    if extra:
        lines += [f"- {k}: {v}" for k, v in extra.items()] + [""]
    lines += ["## Result", ""]
    if evals:
        e = evals[-1]
        bpb = f", **{e['val_bpb']:.4f} bits/byte**" if "val_bpb" in e else ""
        lines += [f"Validation loss at step {e['step']}: **{e['val_loss']:.4f} nats/token**{bpb}.", ""]
    if steps:
        last = steps[-1]
        lines += [
            f"- steps: {last['step']}, tokens: {last['tokens']:,}, training time: {wall / 60:.2f} min",
            f"- final train loss (main / MTP / balance): {last['lm_loss']:.4f} / {last['mtp_loss']:.4f} / "
            f"{last['balance_loss']:.2e}",
            f"- throughput: {tok_s:,.0f} tokens/s, MFU {mfu:.1%} (model FLOPs of every matmul vs the measured peak)",
        ]
        if "max_vio" in last:
            lines.append(f"- MaxVio (last step, mean over MoE layers): {last['max_vio']:.3f}")
        lines.append("")
    lines += ["![loss curves](loss.png)", ""]
    if has_balance:
        lines += ["## Load balance", "", "![MaxVio and expert load](balance.png)", ""]
    if samples:
        lines += ["## Samples", ""]
        for s in samples:
            lines += ["```", s.strip(), "```", ""]
    lines += ["## Training config", "", "```json", json.dumps(tcfg, indent=1), "```", ""]
    lines += [
        "## Model accounting",
        "",
        "```",
        format_report(inspect_report(cfg, seq_len=tcfg["seq_len"])),
        "```",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
