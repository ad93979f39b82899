import math

import numpy as np
import pytest

from nanoseek.scaling.fit import (
    FitError,
    fit_isoflop,
    fit_parabola,
    fit_parametric,
    fit_power_law,
)

# A known law, in M (C = M D): the compute-optimal exponent is a = beta / (alpha + beta) = 0.4615...
TRUE = {"E": 1.5, "A": 80.0, "B": 300.0, "alpha": 0.35, "beta": 0.30}
SMALL_GRID = {"alpha": (0.5, 1.0), "beta": (0.5, 1.0), "e": (0.0,), "a": (5.0, 10.0), "b": (5.0, 10.0)}


def law_runs(budgets=(1e11, 3e11, 1e12, 3e12), per_budget=7, noise=0.003, seed=1):
    """IsoFLOP runs around the true optimum of TRUE, with multiplicative noise on the loss."""
    E, A, B, al, be = (TRUE[k] for k in ("E", "A", "B", "alpha", "beta"))
    G = (al * A / (be * B)) ** (1 / (al + be))
    rng = np.random.default_rng(seed)
    c_, m_, d_, l_ = [], [], [], []
    for c in budgets:
        for f in np.geomspace(1 / 8, 8, per_budget):
            m = G * c ** (be / (al + be)) * f
            d = c / m
            c_.append(c), m_.append(m), d_.append(d)
            l_.append((E + A / m**al + B / d**be) * math.exp(rng.normal(0, noise)))
    return np.array(c_), np.array(m_), np.array(d_), np.array(l_)


def test_power_law_fit_is_exact_on_a_power_law():
    c = np.geomspace(1e10, 1e14, 5)
    law = fit_power_law(c, 0.1715 * c**0.5243)
    assert law.coef == pytest.approx(0.1715) and law.exp == pytest.approx(0.5243)


def test_parabola_recovers_a_known_optimum():
    m = np.geomspace(1e4, 1e7, 8)
    loss = 3.0 + 0.05 * (np.log(m) - math.log(3e5)) ** 2
    p = fit_parabola(1e12, m, loss)
    assert p.m_opt == pytest.approx(3e5, rel=1e-6) and p.loss_opt == pytest.approx(3.0)
    assert p.inside and p.d_opt == pytest.approx(1e12 / 3e5)


def test_isoflop_recovers_known_exponents_from_noisy_runs_with_the_truth_inside_the_interval():
    c, m, _, loss = law_runs()
    fit = fit_isoflop(c, m, loss, n_boot=300, seed=0)
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit.a == pytest.approx(a_true, abs=0.03)
    assert fit.a_ci[0] < a_true < fit.a_ci[1]
    assert all(p.inside for p in fit.parabolas)


def test_a_plus_b_is_one_and_m_base_times_d_base_is_one_by_construction():
    c, m, _, loss = law_runs(noise=0.01, seed=7)
    fit = fit_isoflop(c, m, loss, n_boot=50)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-12)
    assert fit.m_opt.coef * fit.d_opt.coef == pytest.approx(1.0, abs=1e-12)
    assert fit.b_ci[0] == pytest.approx(1 - fit.a_ci[1]) and fit.b_ci[1] == pytest.approx(1 - fit.a_ci[0])
    pred = fit.predict(1e13)
    assert pred["m_opt"] * pred["d_opt"] == pytest.approx(1e13)
    assert pred["loss_ci"][0] <= pred["loss"] <= pred["loss_ci"][1]


def test_parametric_fit_recovers_the_law_and_its_implied_exponent():
    _, m, d, loss = law_runs(noise=0.001)
    fit = fit_parametric(m, d, loss, grid=SMALL_GRID, top=4)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.03)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=0.03)
    assert fit.a == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.02)
    assert fit.a + fit.b == pytest.approx(1.0)
    n_opt, d_opt = fit.optimum(1e12)
    assert n_opt * d_opt == pytest.approx(1e12)


def test_parametric_fit_is_robust_to_starting_points():
    _, m, d, loss = law_runs(noise=0.003, seed=3)
    other = {"alpha": (0.1, 2.0), "beta": (0.2, 1.5), "e": (-1.0, 1.0), "a": (0.0, 20.0), "b": (2.0, 25.0)}
    fits = [fit_parametric(m, d, loss, grid=g, top=3) for g in (SMALL_GRID, other)]
    for key in ("alpha", "beta", "E"):
        assert getattr(fits[0], key) == pytest.approx(getattr(fits[1], key), rel=1e-3)
    assert fits[0].a == pytest.approx(fits[1].a, abs=1e-4)
    assert all(f.n_agree >= 2 for f in fits)  # the optimum is reached from more than one start


@pytest.mark.parametrize(
    "budget, m, loss, match",
    [
        ([1e11] * 2 + [1e12] * 3, [1e4, 1e5, 1e4, 1e5, 1e6], [3.0] * 5, "at least 3 per budget"),
        ([1e11] * 3 + [1e12] * 3, [1e4, 1e5, 1e6] * 2, [3.0, 2.9, -1.0, 3.0, 2.9, 3.0], "positive"),
        ([1e11] * 3 + [0.0] * 3, [1e4, 1e5, 1e6] * 2, [3.0] * 6, "positive"),
        ([1e11] * 4, [1e4, 1e5, 1e6, 1e7], [3.0, 2.9, 2.95, 3.1], "at least 2 budgets"),
        ([1e11] * 3 + [1e12] * 3, [1e4, 1e5, 1e6] * 2, [3.0, 3.2, 3.0, 3.0, 2.9, 3.0], "bracket the optimum"),
    ],
)
def test_bad_isoflop_input_gives_a_clear_error(budget, m, loss, match):
    with pytest.raises(FitError, match=match):
        fit_isoflop(budget, m, loss, n_boot=10)


def test_bad_parametric_input_gives_a_clear_error():
    with pytest.raises(FitError, match="at least 5"):
        fit_parametric([1e5] * 4, [1e6] * 4, [3.0] * 4)
    m = np.geomspace(1e4, 1e6, 6)
    with pytest.raises(FitError, match="single budget"):
        fit_parametric(m, 1e12 / m, np.full(6, 3.0), grid=SMALL_GRID)
    with pytest.raises(FitError, match="positive"):
        fit_parametric(m, m, [3.0, 3.0, 3.0, 0.0, 3.0, 3.0])
