import numpy as np
import pytest

from nanoseek.scaling.family import Family
from nanoseek.scaling.fit import FitError
from nanoseek.scaling.hparams import fit_hparams, fit_records, plan_hparams
from nanoseek.scaling.laws import DEEPSEEK_HPARAMS, HparamLaw, PowerLaw
from nanoseek.scaling.sweep import RunSettings, SweepError

FAMILY = Family(head_dim=8, seq_len=32, vocab_size=256)
SETTINGS = RunSettings(data="unused", vocab_size=256, data_id="test", min_steps=1)
FACTORS = np.geomspace(0.125, 8, 9)


ETA, BATCH = PowerLaw(0.3, -0.12), PowerLaw(0.3, 0.33)


def grid_runs(eta=ETA, batch=BATCH, budgets=(1e17, 1e18, 1e19, 1e20), seed=0):
    """A loss bowl in (ln B, ln eta) whose bottom follows known laws, with a little noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for fb in FACTORS:
            for fl in FACTORS:
                loss = (
                    2.0 * (1 + 0.002 * np.log(fb) ** 2 + 0.003 * np.log(fl) ** 2) * (1 + rng.normal(0, 1e-4))
                )
                rows.append((c, batch(c) * fb, eta(c) * fl, loss))
    return [np.array(col) for col in zip(*rows)]


def test_grid_is_the_law_times_every_pair_of_factors_around_one_model_per_budget():
    specs, notes = plan_hparams(FAMILY, [1e10, 3e10], SETTINGS, lr_factors=(0.5, 1, 2), batch_factors=(1, 4))
    assert not notes and len(specs) == 2 * 3 * 2
    for c in (1e10, 3e10):
        runs = [s for s in specs if s.budget == c]
        assert len({s.model["name"] for s in runs}) == 1
        lrs = sorted({s.lr for s in runs})
        assert lrs == pytest.approx([DEEPSEEK_HPARAMS.eta(c) * f for f in (0.5, 1, 2)])


def test_duplicate_batches_after_rounding_train_once():
    # at a tiny budget, x0.25 and x0.5 of B_opt both round to one sequence
    specs, _ = plan_hparams(FAMILY, [1e7, 3e7], SETTINGS, lr_factors=(1,), batch_factors=(0.01, 0.02))
    assert len(specs) == 2 and len({s.key for s in specs}) == 2


def test_hparams_plan_needs_two_budgets():
    with pytest.raises(SweepError, match="2 distinct budgets"):
        plan_hparams(FAMILY, [1e10, 1e10], SETTINGS)


def test_fit_recovers_known_hparam_laws_from_the_near_optimal_band():
    c, b, lr, loss = grid_runs()
    fit = fit_hparams(c, b, lr, loss)
    assert fit.law.eta.exp == pytest.approx(-0.12, abs=0.02)
    assert fit.law.batch_tokens.exp == pytest.approx(0.33, abs=0.02)
    assert fit.best_law.eta.exp == pytest.approx(-0.12, abs=0.03)
    for g in fit.grids:
        assert g.near[g.best] and np.all(g.loss[g.near] <= g.loss.min() * 1.0025)
        assert 1 < g.near.sum() < len(g.loss) and not g.on_edge


def test_fitted_law_round_trips_through_json(tmp_path):
    c, b, lr, loss = grid_runs()
    law = fit_hparams(c, b, lr, loss).law
    law.save(tmp_path / "law.json")
    assert HparamLaw.load(tmp_path / "law.json") == law
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a hyperparameter law"):
        HparamLaw.load(tmp_path / "bad.json")


def test_bad_hparam_input_gives_a_clear_error():
    c, b, lr, loss = grid_runs(budgets=(1e17,))
    with pytest.raises(FitError, match="at least 2"):
        fit_hparams(c, b, lr, loss)
    with pytest.raises(FitError, match="at least 3 per budget"):
        fit_hparams([1e17, 1e17, 1e18, 1e18, 1e18], [1, 2, 1, 2, 3], [1, 1, 1, 1, 1], [3, 3, 3, 3, 3])
    with pytest.raises(FitError, match="positive"):
        fit_hparams([1e17] * 3 + [1e18] * 3, [1, 2, 3] * 2, [1, 0, 1] * 2, [3] * 6)
    with pytest.raises(FitError, match="no finished run"):
        fit_records([{"status": "failed"}])
