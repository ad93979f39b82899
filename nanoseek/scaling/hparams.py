"""Hyperparameter scaling laws: `nanoseek scaling hparams` (DeepSeek LLM §3.1, eq. 1; arXiv 2401.02954).

DeepSeek LLM grid-searches batch size B and peak learning rate eta at several compute budgets, calls every
setting whose generalization error is within 0.25% of the budget's minimum "near-optimal", and fits power laws
through the near-optimal settings: eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 (B in tokens). The
near-optimal region is wide, which is why one law serves a whole range of model/data splits.

Here: at each budget, one model of the family (the size DeepSeek LLM's eq. 4 calls compute-optimal, unless told
otherwise) trains on D = C / M tokens for every (B, eta) of a grid of factors around a starting law (DeepSeek's
by default). The fit is least squares in log-log space over all near-optimal points of all budgets; the per-budget
best settings are reported too. The fitted law is saved as JSON for `nanoseek scaling sweep --hparams`.

What a reader gets wrong: B is rounded to whole sequences, so at tiny budgets neighbouring grid factors can give
the same batch (runs are keyed, so such duplicates train once); and a near-optimal band that touches the edge of
the grid means the grid did not bracket the optimum: the report flags it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanoseek.scaling.family import Family
from nanoseek.scaling.fit import FitError, as_positive, fit_power_law
from nanoseek.scaling.laws import DEEPSEEK_HPARAMS, DEEPSEEK_M_OPT, NEAR_OPTIMAL, HparamLaw, PowerLaw
from nanoseek.scaling.sweep import RunSettings, RunSpec, SweepError, make_spec

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def plan_hparams(
    family: Family,
    budgets: list[float],
    settings: RunSettings,
    lr_factors=FACTORS,
    batch_factors=FACTORS,
    law: HparamLaw = DEEPSEEK_HPARAMS,
    size: PowerLaw = DEEPSEEK_M_OPT,
) -> tuple[list[RunSpec], list[str]]:
    """The grid: per budget, the family member nearest size(C), at law(C) x every pair of factors."""
    if len(set(budgets)) < 2:
        raise SweepError("budgets: the hyperparameter laws need at least 2 distinct budgets")
    if any(f <= 0 for f in (*lr_factors, *batch_factors)):
        raise SweepError("factors: learning-rate and batch factors must be positive")
    specs, notes, seen = [], [], set()
    for c in sorted(set(budgets)):
        cfg = family.for_m(size(c))
        for bf in batch_factors:
            for lf in lr_factors:
                spec = make_spec(
                    "hparams", c, cfg, family, settings, law.eta(c) * lf, law.batch_tokens(c) * bf
                )
                if spec.steps < settings.min_steps:
                    notes.append(
                        f"C={c:.3g}: skipped batch x{bf} ({spec.steps} steps < {settings.min_steps})"
                    )
                elif spec.key not in seen:
                    seen.add(spec.key)
                    specs.append(spec)
    return specs, notes


@dataclass
class BudgetGrid:
    budget: float
    batch_tokens: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    near: np.ndarray  # bool: within the band of the minimum

    @property
    def best(self) -> int:
        return int(np.argmin(self.loss))

    @property
    def on_edge(self) -> bool:
        """Does the near-optimal region touch the grid's edge (so the optimum may lie outside it)?"""
        b, lr = self.batch_tokens[self.near], self.lr[self.near]
        return bool(
            b.min() <= self.batch_tokens.min()
            or b.max() >= self.batch_tokens.max()
            or lr.min() <= self.lr.min()
            or lr.max() >= self.lr.max()
        )


@dataclass
class HparamFit:
    grids: list[BudgetGrid]
    law: HparamLaw  # through all near-optimal points
    best_law: HparamLaw  # through each budget's single best setting
    band: float


def fit_hparams(budget, batch_tokens, lr, loss, band: float = NEAR_OPTIMAL) -> HparamFit:
    """eta_opt(C) and B_opt(C) power laws through the settings within `band` of each budget's minimum loss."""
    budget, batch_tokens = as_positive("budget", budget), as_positive("batch size", batch_tokens)
    lr, loss = as_positive("learning rate", lr), as_positive("loss", loss)
    if not len(budget) == len(batch_tokens) == len(lr) == len(loss):
        raise FitError("hparams: need one budget, batch size, learning rate and loss per run")
    if band < 0:
        raise FitError(f"band: must be >= 0, got {band}")
    grids = []
    for c in np.unique(budget):
        sel = budget == c
        if sel.sum() < 3:
            raise FitError(
                f"C={c:.3g}: {sel.sum()} run(s); a hyperparameter grid needs at least 3 per budget"
            )
        ll = loss[sel]
        grids.append(BudgetGrid(float(c), batch_tokens[sel], lr[sel], ll, ll <= ll.min() * (1 + band)))
    if len(grids) < 2:
        raise FitError(f"hparams: all runs share one budget (C={budget[0]:.3g}); a law of C needs at least 2")
    near_c = np.concatenate([np.full(g.near.sum(), g.budget) for g in grids])
    near_b = np.concatenate([g.batch_tokens[g.near] for g in grids])
    near_lr = np.concatenate([g.lr[g.near] for g in grids])
    best_c = [g.budget for g in grids]
    source = f"fitted here: near-optimal (within {band:.2%}) settings at {len(grids)} budgets"
    return HparamFit(
        grids=grids,
        law=HparamLaw(fit_power_law(near_c, near_lr), fit_power_law(near_c, near_b), source),
        best_law=HparamLaw(
            fit_power_law(best_c, [g.lr[g.best] for g in grids]),
            fit_power_law(best_c, [g.batch_tokens[g.best] for g in grids]),
            "fitted here: the best setting per budget",
        ),
        band=band,
    )


def fit_records(records: list[dict], metric: str = "val_bpb", band: float = NEAR_OPTIMAL) -> HparamFit:
    """fit_hparams over the finished `hparams` runs of a results file."""
    runs = [r for r in records if r.get("status") == "finished" and r.get(metric) is not None]
    if not runs:
        raise FitError(f"hparams: no finished run with {metric}")
    return fit_hparams(
        [r["budget"] for r in runs],
        [r["batch_size"] * r["seq_len"] for r in runs],
        [r["lr"] for r in runs],
        [r[metric] for r in runs],
        band,
    )
