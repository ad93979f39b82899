"""PNG plots of a scaling sweep (matplotlib, headless): the figures of DeepSeek LLM §3 (arXiv 2401.02954).

- `isoflop.png`: loss against M per budget with the fitted parabolas and their vertices (DeepSeek LLM Fig. 4a,
  Chinchilla Fig. 3 left).
- `optimal.png`: M_opt(C) and D_opt(C) on log-log axes with our fit, DeepSeek LLM's eq. 4 as published (an
  extrapolation far below its 1e17..3e20 range) and the published exponents as slopes through our data's centre
  (Fig. 4b/4c; Table 4).
- `frontier.png`: every run's loss against its compute, the per-budget optimum, the fitted power law extended
  to the extrapolation budget, and the check run if there is one (Fig. 5).
- `hparams.png`: near-optimal learning rates and batch sizes against C with the fitted and DeepSeek laws (Fig. 3).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

from nanoseek.scaling.fit import IsoFLOPFit  # noqa: E402
from nanoseek.scaling.hparams import HparamFit  # noqa: E402
from nanoseek.scaling.laws import DEEPSEEK_D_OPT, DEEPSEEK_HPARAMS, DEEPSEEK_M_OPT, PUBLISHED, PowerLaw  # noqa: E402


def _colors(n: int):
    return plt.cm.viridis(np.linspace(0.05, 0.9, max(n, 1)))


def _log(ax, y: bool = True) -> None:
    """Log axes; no minor-tick labels on x (they overlap there on short ranges)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if y:
        ax.set_yscale("log")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_isoflop(fit: IsoFLOPFit, runs: list[dict], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for p, color in zip(fit.parabolas, _colors(len(fit.parabolas))):
        pts = [(r["m"], r[metric]) for r in runs if r["budget"] == p.budget]
        ax.scatter(*zip(*pts), color=color, s=22, zorder=3)
        grid = np.geomspace(p.m_range[0] / 1.3, p.m_range[1] * 1.3, 100)
        ax.plot(grid, p(grid), color=color, label=f"C = {p.budget:.2g}")
        ax.plot([p.m_opt], [p.loss_opt], marker="*", color=color, ms=12, mec="k", zorder=4)
    _log(ax, y=False)
    ax.set_xlabel("M: non-embedding FLOPs per token")
    ax.set_ylabel(f"final validation {metric.replace('val_', '')}")
    ax.set_title("IsoFLOP curves: parabolas in ln M, vertices = M_opt(C)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _slope_through(law: PowerLaw, exp: float, budgets: np.ndarray, c: np.ndarray) -> np.ndarray:
    """A line of slope `exp` through `law` at the geometric middle of the budgets, over c."""
    mid = math.exp(np.log(budgets).mean())
    return law(mid) * (c / mid) ** exp


def plot_optimal(fit: IsoFLOPFit, path: Path, check: dict | None = None) -> Path:
    budgets = np.array([p.budget for p in fit.parabolas])
    hi = max(budgets.max(), check["budget"] if check else 0)
    c = np.geomspace(budgets.min() / 2, hi * 2, 50)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, what, law, ours, ds in (
        (axes[0], "M_opt", fit.m_opt, [p.m_opt for p in fit.parabolas], DEEPSEEK_M_OPT),
        (axes[1], "D_opt", fit.d_opt, [p.d_opt for p in fit.parabolas], DEEPSEEK_D_OPT),
    ):
        exp_ci = fit.a_ci if what == "M_opt" else fit.b_ci
        ax.scatter(budgets, ours, color="C0", zorder=3, label="parabola vertices")
        ax.plot(
            c,
            law(c),
            color="C0",
            label=f"ours: {law.coef:.3g} C^{law.exp:.3f} [{exp_ci[0]:.2f}, {exp_ci[1]:.2f}]",
        )
        ax.plot(c, ds(c), "k:", label=f"DeepSeek LLM eq. 4: {ds.coef:.4g} C^{ds.exp:.4f}")
        for pub, style in zip(PUBLISHED, ("--", "-.", (0, (3, 1, 1, 1)), (0, (5, 2)), (0, (1, 2)))):
            e = pub.a if what == "M_opt" else pub.b
            ax.plot(
                c,
                _slope_through(law, e, budgets, c),
                linestyle=style,
                lw=0.9,
                alpha=0.7,
                label=f"slope {e} ({pub.name})",
            )
        if check:
            ax.scatter(
                [check["budget"]],
                [check["m"] if what == "M_opt" else check["tokens"]],
                marker="D",
                color="C3",
                zorder=4,
                label="check run",
            )
        _log(ax)
        ax.set_xlabel("C: compute (FLOPs = M x D)")
        ax.set_ylabel(what + (" (FLOPs/token)" if what == "M_opt" else " (tokens)"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5)
    fig.suptitle("Compute-optimal model and data scale")
    return _save(fig, path)


def plot_frontier(
    fit: IsoFLOPFit,
    runs: list[dict],
    metric: str,
    path: Path,
    extrapolate: float | None = None,
    check: dict | None = None,
) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.scatter(
        [r["m"] * r["tokens"] for r in runs],
        [r[metric] for r in runs],
        color="0.6",
        s=14,
        label="runs (real M x D)",
    )
    budgets = np.array([p.budget for p in fit.parabolas])
    ax.scatter(budgets, [p.loss_opt for p in fit.parabolas], color="C0", zorder=3, label="parabola minima")
    hi = max(budgets.max(), extrapolate or 0)
    c = np.geomspace(budgets.min() / 1.5, hi * 1.5, 50)
    ax.plot(c, fit.frontier(c), color="C0", label=f"fit: {fit.frontier.coef:.3g} C^{fit.frontier.exp:.4f}")
    if extrapolate:
        pred = fit.predict(extrapolate)
        lo, up = pred["loss_ci"]
        ax.errorbar(
            [extrapolate],
            [pred["loss"]],
            yerr=[[pred["loss"] - lo], [up - pred["loss"]]],
            fmt="s",
            color="C1",
            capsize=4,
            label=f"prediction at C = {extrapolate:.2g}",
        )
    if check and check.get(metric) is not None:
        ax.scatter(
            [check["m"] * check["tokens"]],
            [check[metric]],
            marker="D",
            color="C3",
            zorder=4,
            label="check run (measured)",
        )
    _log(ax)
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.2f"))  # losses span a short range: plain numbers, not 2.4 x 10^0
    ax.set_xlabel("C: compute (FLOPs)")
    ax.set_ylabel(f"final validation {metric.replace('val_', '')}")
    ax.set_title("Loss vs compute frontier")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_hparams(fit: HparamFit, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = np.array([g.budget for g in fit.grids])
    c = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50)
    for ax, name, get, ours, ds in (
        (axes[0], "peak learning rate", lambda g: g.lr, fit.law.eta, DEEPSEEK_HPARAMS.eta),
        (
            axes[1],
            "batch size (tokens)",
            lambda g: g.batch_tokens,
            fit.law.batch_tokens,
            DEEPSEEK_HPARAMS.batch_tokens,
        ),
    ):
        for i, g in enumerate(fit.grids):
            v = get(g)
            ax.scatter(
                np.full((~g.near).sum(), g.budget),
                v[~g.near],
                color="0.8",
                s=12,
                label="grid" if i == 0 else None,
            )
            ax.scatter(
                np.full(g.near.sum(), g.budget),
                v[g.near],
                color="C0",
                s=18,
                label=f"within {fit.band:.2%}" if i == 0 else None,
            )
            ax.scatter(
                [g.budget],
                [v[g.best]],
                marker="*",
                color="C3",
                s=90,
                zorder=4,
                label="best" if i == 0 else None,
            )
        ax.plot(c, ours(c), color="C0", label=f"fit: {ours.coef:.3g} C^{ours.exp:.4f}")
        ax.plot(c, ds(c), "k:", label=f"DeepSeek LLM eq. 1: {ds.coef} C^{ds.exp}")
        _log(ax)
        ax.set_xlabel("C: compute (FLOPs)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Hyperparameter scaling (near-optimal band)")
    return _save(fig, path)
