"""Fitting compute-optimal scaling laws to sweep results: IsoFLOP parabolas, power laws, approach 3, frontier.

1. IsoFLOP (Chinchilla approach 2, arXiv 2203.15556 §3.2; DeepSeek LLM §3.2, arXiv 2401.02954): per budget C,
   a parabola of loss against ln M; its vertex is M_opt(C), and D_opt(C) = C / M_opt(C). Then least squares in
   log-log space, `M_opt = M_base C^a`. D_opt is C / M_opt, so `D_opt = (1 / M_base) C^(1 - a)`: a + b = 1 and
   M_base x D_base = 1 hold by construction (DeepSeek's eq. 4 has 0.5243 + 0.4757 = 1, 0.1715 x 5.8316 = 1.0001).
   Confidence intervals: a residual bootstrap: each draw adds residuals, resampled from all budgets' parabola
   residuals (inflated by sqrt(n / (n - 3)) for the 3 fitted coefficients), to every fitted parabola and refits
   everything. With 5-7 runs per budget, resampling the runs themselves often leaves 3 distinct sizes and a
   vertex anywhere; keeping the sizes fixed and the noise (and misfit) as measured is the steadier choice.
2. Parametric (Chinchilla approach 3, §3.3, eq. 10 and App. D.2): `L(N, D) = E + A / N^alpha + B / D^beta`,
   fitted in log space, `log L = LSE(a - alpha log N, b - beta log D, e)` with A = e^a, B = e^b, E = e^e, by
   minimising the Huber loss (delta = 1e-3) of the residuals in log L with L-BFGS from a grid of starting points
   (the best result wins). Under C = k N D the optimum is `N_opt = G (C/k)^a`, `D_opt = G^-1 (C/k)^b` with
   `G = (alpha A / (beta B))^(1/(alpha+beta))`, a = beta / (alpha + beta), b = alpha / (alpha + beta).
   Here N is M (k = 1, C = M D), DeepSeek's scale; Chinchilla's N is parameters with k = 6.
3. Loss-vs-compute frontier (DeepSeek LLM Fig. 5): the parabolas' minimum losses against C, a power law
   `L_opt = k C^-gamma`, extrapolated to a larger budget (with a bootstrap interval) and checked by a real run.

What a reader gets wrong: the parabola is in ln M, not M; a parabola that opens downward (or a vertex far outside
the sizes tried) means the sizes did not bracket the optimum, and that is an error here, not a number. Huber with
delta = 1e-3 on *log* loss is nearly an L1 fit: one bad run moves it little; and its tiny values need tight
L-BFGS tolerances (`LBFGS_OPTIONS`), or the optimiser stops where it started.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from nanoseek.scaling.laws import PowerLaw

HUBER_DELTA = 1e-3  # Chinchilla App. D.2
# The summed Huber loss is ~1e-4 and its gradient far below scipy's default gtol (1e-5), which stops L-BFGS at
# (or near) its starting point: every start then "converges" somewhere else. Tight tolerances fix that.
LBFGS_OPTIONS = {"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000}
# Chinchilla App. D.2's initialisation grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}.
CHINCHILLA_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


class FitError(ValueError):
    """Data a fit cannot use; the message says what is wrong and how to fix the sweep."""


def as_positive(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or len(arr) == 0:
        raise FitError(f"{name}: need a non-empty list of numbers")
    bad = arr[~(np.isfinite(arr) & (arr > 0))]
    if len(bad):
        raise FitError(f"{name}: every value must be positive and finite, got {bad[0]!r}")
    return arr


# ---- power laws ------------------------------------------------------------------------------------------------
def fit_power_law(x, y) -> PowerLaw:
    """Least squares of ln y on ln x: y = coef x^exp."""
    x, y = as_positive("x", x), as_positive("y", y)
    if len(x) != len(y):
        raise FitError(f"power law: {len(x)} x values but {len(y)} y values")
    if len(np.unique(x)) < 2:
        raise FitError("power law: need at least two distinct x values")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    if abs(intercept) > 700:
        raise FitError(f"power law: coefficient e^{intercept:.0f} is out of range")
    return PowerLaw(float(math.exp(intercept)), float(slope))


# ---- IsoFLOP --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parabola:
    """loss = p2 (ln M)^2 + p1 ln M + p0 at one budget, and its vertex."""

    budget: float
    p2: float
    p1: float
    p0: float
    m_range: tuple[float, float]  # smallest and largest M tried
    n_points: int

    @property
    def m_opt(self) -> float:
        return math.exp(-self.p1 / (2 * self.p2))

    @property
    def loss_opt(self) -> float:
        return self.p0 - self.p1**2 / (4 * self.p2)

    @property
    def d_opt(self) -> float:
        return self.budget / self.m_opt

    @property
    def inside(self) -> bool:
        """Is the vertex within the sizes tried (not an extrapolation)?"""
        return self.m_range[0] <= self.m_opt <= self.m_range[1]

    def __call__(self, m):
        x = np.log(m)
        return self.p2 * x * x + self.p1 * x + self.p0


def fit_parabola(budget: float, m, loss) -> Parabola:
    m, loss = as_positive(f"M at C={budget:.3g}", m), as_positive(f"loss at C={budget:.3g}", loss)
    if len(np.unique(m)) < 3:
        raise FitError(
            f"C={budget:.3g}: {len(np.unique(m))} distinct model size(s); a parabola needs at least 3 per budget"
        )
    p2, p1, p0 = np.polyfit(np.log(m), loss, 2)
    if p2 <= 0:
        raise FitError(
            f"C={budget:.3g}: loss vs ln M curves downward (no minimum): the sizes tried "
            f"({m.min():.3g}..{m.max():.3g}) do not bracket the optimum; widen or move the size range"
        )
    if abs(p1 / (2 * p2)) > 700:  # e^700 overflows: a curve this flat has no usable vertex
        raise FitError(f"C={budget:.3g}: loss vs ln M is nearly flat; its vertex is out of range")
    return Parabola(float(budget), float(p2), float(p1), float(p0), (float(m.min()), float(m.max())), len(m))


def _group(budget, m, loss) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    budget = as_positive("budget", budget)
    m, loss = as_positive("M", m), as_positive("loss", loss)
    if not len(budget) == len(m) == len(loss):
        raise FitError(
            f"IsoFLOP: {len(budget)} budgets, {len(m)} sizes and {len(loss)} losses; need one each per run"
        )
    groups = {float(c): (m[budget == c], loss[budget == c]) for c in np.unique(budget)}
    if len(groups) < 2:
        raise FitError(
            f"IsoFLOP: all runs share one budget (C={budget[0]:.3g}); M_opt(C) needs at least 2 budgets"
        )
    for c, (mm, _) in groups.items():
        if len(mm) < 3:
            raise FitError(f"C={c:.3g}: {len(mm)} run(s); a parabola needs at least 3 per budget")
    return groups


@dataclass
class IsoFLOPFit:
    parabolas: list[Parabola]
    m_opt: PowerLaw  # M_opt = M_base C^a
    d_opt: PowerLaw  # D_opt = C / M_opt
    frontier: PowerLaw  # L_opt = k C^-gamma (exp = -gamma)
    ci: float
    a_ci: tuple[float, float]
    m_base_ci: tuple[float, float]
    frontier_exp_ci: tuple[float, float]
    n_boot: int
    boot_failed: int  # draws with no minimum, or one > 10x outside the sizes, at some budget (left out)
    boot: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    @property
    def a(self) -> float:
        return self.m_opt.exp

    @property
    def b(self) -> float:
        return self.d_opt.exp

    @property
    def b_ci(self) -> tuple[float, float]:
        return (1 - self.a_ci[1], 1 - self.a_ci[0])

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        lo, hi = (
            np.quantile(values, [(1 - self.ci) / 2, (1 + self.ci) / 2]) if len(values) else (math.nan,) * 2
        )
        return float(lo), float(hi)

    def predict(self, compute: float) -> dict:
        """M_opt, D_opt and the frontier loss at `compute`, each with its bootstrap interval."""
        b = self.boot
        m_boot = np.exp(b["ln_m_base"] + b["a"] * math.log(compute)) if len(b.get("a", [])) else np.array([])
        l_boot = (
            np.exp(b["ln_k"] + b["gamma_exp"] * math.log(compute)) if len(b.get("a", [])) else np.array([])
        )
        return {
            "compute": compute,
            "m_opt": self.m_opt(compute),
            "m_opt_ci": self.interval(m_boot),
            "d_opt": self.d_opt(compute),
            "loss": self.frontier(compute),
            "loss_ci": self.interval(l_boot),
        }


def _laws(parabolas: list[Parabola]) -> tuple[PowerLaw, PowerLaw]:
    c = [p.budget for p in parabolas]
    return fit_power_law(c, [p.m_opt for p in parabolas]), fit_power_law(c, [p.loss_opt for p in parabolas])


def fit_isoflop(budget, m, loss, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> IsoFLOPFit:
    """Parabolas per budget, M_opt(C) and D_opt(C) power laws and the frontier, with bootstrap intervals."""
    if not 0 < ci < 1:
        raise FitError(f"ci: must be in (0, 1), got {ci}")
    groups = _group(budget, m, loss)
    parabolas = [fit_parabola(c, mm, ll) for c, (mm, ll) in groups.items()]
    m_law, frontier = _laws(parabolas)
    rng = np.random.default_rng(seed)
    residuals = np.concatenate(
        [
            (ll - p(mm)) * math.sqrt(len(mm) / (len(mm) - 3))
            for p, (mm, ll) in zip(parabolas, groups.values())
            if len(mm) > 3
        ]
        or [np.zeros(1)]
    )
    draws: dict[str, list[float]] = {"a": [], "ln_m_base": [], "gamma_exp": [], "ln_k": []}
    failed = 0
    for _ in range(n_boot):
        try:
            resampled = [
                fit_parabola(p.budget, mm, p(mm) + rng.choice(residuals, len(mm)))
                for p, (mm, _) in zip(parabolas, groups.values())
            ]
            if any(not p.m_range[0] / 10 <= p.m_opt <= p.m_range[1] * 10 for p in resampled):
                raise FitError("vertex more than 10x outside the sizes tried")
            ml, fl = _laws(resampled)
        except FitError:  # a draw with no usable minimum at some budget: counted, left out of the intervals
            failed += 1
            continue
        draws["a"].append(ml.exp)
        draws["ln_m_base"].append(math.log(ml.coef))
        draws["gamma_exp"].append(fl.exp)
        draws["ln_k"].append(math.log(fl.coef))
    boot = {k: np.asarray(v) for k, v in draws.items()}
    fit = IsoFLOPFit(
        parabolas=parabolas,
        m_opt=m_law,
        d_opt=PowerLaw(1 / m_law.coef, 1 - m_law.exp),
        frontier=frontier,
        ci=ci,
        a_ci=(math.nan, math.nan),
        m_base_ci=(math.nan, math.nan),
        frontier_exp_ci=(math.nan, math.nan),
        n_boot=n_boot,
        boot_failed=failed,
        boot=boot,
    )
    fit.a_ci = fit.interval(boot["a"])
    lo, hi = fit.interval(boot["ln_m_base"])
    fit.m_base_ci = (math.exp(lo), math.exp(hi)) if math.isfinite(lo) else (math.nan, math.nan)
    fit.frontier_exp_ci = fit.interval(boot["gamma_exp"])
    return fit


# ---- Chinchilla approach 3 ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum
    n_starts: int
    n_agree: int  # starts that reached the best objective (to 1e-6 relative): robustness to initialisation
    k: float = 1.0  # C = k N D

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def loss(self, n, d):
        return (
            self.E
            + self.A / np.asarray(n, dtype=float) ** self.alpha
            + self.B / np.asarray(d, dtype=float) ** self.beta
        )

    def optimum(self, compute: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L(N, D) subject to k N D = compute."""
        c = compute / self.k
        return self.G * c**self.a, c**self.b / self.G


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def _score_starts(starts: np.ndarray, ln_n, ln_d, ln_l, delta: float) -> np.ndarray:
    """The summed Huber loss at each row (a, b, e, alpha, beta) of starts [S, 5], all at once."""
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))  # each [S, 1]
    pred = np.logaddexp(np.logaddexp(a - alpha * ln_n, b - beta * ln_d), e)  # [S, n]
    return _huber(pred - ln_l, delta).sum(axis=1)


def _huber_objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray, delta: float):
    """Summed Huber loss of log-space residuals and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])  # [3, n]
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - ln_l
    w /= total  # d LSE / d term
    loss = _huber(r, delta).sum()
    g = np.where(np.abs(r) <= delta, r, delta * np.sign(r))
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * ln_n).sum(),
            -(g * w[1] * ln_d).sum(),
        ]
    )
    return loss, grad


def fit_parametric(
    n,
    d,
    loss,
    delta: float = HUBER_DELTA,
    grid: dict | None = None,
    k: float = 1.0,
    top: int | None = 32,
) -> ParametricFit:
    """Chinchilla approach 3 with Huber(delta) on log loss, L-BFGS from the grid's starting points.

    Chinchilla runs L-BFGS from all 4,500 points of its grid; that takes minutes on a busy CPU, and most starts
    end in the same few basins. With `top` set, every grid point is scored first (one objective evaluation
    each) and L-BFGS runs from the `top` best; `top=None` runs from all of them, as the paper does."""
    from scipy.optimize import minimize

    n, d, loss = as_positive("N", n), as_positive("D", d), as_positive("loss", loss)
    if not len(n) == len(d) == len(loss):
        raise FitError(f"parametric: {len(n)} N, {len(d)} D and {len(loss)} losses; need one each per run")
    if len(n) < 5:
        raise FitError(f"parametric: {len(n)} runs; L(N, D) has 5 parameters, so it needs at least 5")
    ln_n, ln_d, ln_l = np.log(n), np.log(d), np.log(loss)
    if np.ptp(ln_n + ln_d) < 1e-9:
        raise FitError(
            "parametric: every run has the same compute N x D; a single budget cannot separate alpha "
            "from beta; add a budget"
        )
    grid = grid or CHINCHILLA_GRID
    starts = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))
    if top is not None and top < len(starts):
        scores = _score_starts(starts, ln_n, ln_d, ln_l, delta)
        starts = starts[np.argsort(scores, kind="stable")[:top]]
    results = []
    for x0 in starts:
        res = minimize(
            _huber_objective,
            x0,
            args=(ln_n, ln_d, ln_l, delta),
            jac=True,
            method="L-BFGS-B",
            options=LBFGS_OPTIONS,
        )
        if np.all(np.isfinite(res.x)) and np.isfinite(res.fun):
            results.append((float(res.fun), res.x))
    if not results:
        raise FitError("parametric: L-BFGS failed from every starting point")
    best_f, best = min(results, key=lambda t: t[0])
    agree = sum(f <= best_f * (1 + 1e-6) + 1e-12 for f, _ in results)
    a, b, e, alpha, beta = (float(v) for v in best)
    if alpha <= 0 or beta <= 0:
        raise FitError(
            f"parametric: the best fit has alpha={alpha:.3g}, beta={beta:.3g}; loss does not fall with "
            "both N and D in these runs, so no compute-optimal split exists"
        )
    return ParametricFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, best_f, len(starts), agree, k)
