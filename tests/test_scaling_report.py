import io
import sys

import pytest

from nanoseek.cli import main
from nanoseek.scaling.family import Family
from nanoseek.scaling.fit import FitError
from nanoseek.scaling.laws import DEEPSEEK_HPARAMS
from nanoseek.scaling.report import analyze, write_hparams_report
from nanoseek.scaling.sweep import RunSettings, plan_isoflop, run_sweep, save_plan
from tests.test_scaling_hparams import grid_runs
from tests.test_scaling_sweep import FAKE_WORKER

FAMILY = Family(head_dim=8, seq_len=32, vocab_size=256)
SETTINGS = RunSettings(data="unused", vocab_size=256, data_id="test", min_steps=1)


@pytest.fixture
def sweep(tmp_path):
    """A finished 3-budget sweep whose runs follow a known law (the fake worker of test_scaling_sweep)."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    out = tmp_path / "sweep"
    specs, _ = plan_isoflop(FAMILY, [1e10, 3e10, 1e11], SETTINGS, sizes=6, span=6)
    save_plan(
        out, FAMILY, SETTINGS, DEEPSEEK_HPARAMS, specs, command="nanoseek scaling sweep", train_tokens=10**6
    )
    run_sweep(specs, out, worker=[sys.executable, str(worker)], stream=io.StringIO(), poll=0.02)
    return out, [sys.executable, str(worker)]


def test_report_sets_our_exponents_next_to_the_published_ones_with_plots(sweep, tmp_path):
    out, _ = sweep
    a = analyze(out, n_boot=50, parametric_top=2, report_dir=tmp_path / "doc")
    assert a.fit.a + a.fit.b == pytest.approx(1.0) and len(a.fit.parabolas) == 3
    text = (tmp_path / "doc" / "scaling_report.md").read_text()
    for published in ("0.73", "0.49", "0.5243" if "0.5243" in text else "0.524", "0.450", "0.578"):
        assert published in text
    assert "ours, IsoFLOP" in text and "What differs" in text
    for png in ("isoflop.png", "optimal.png", "frontier.png"):
        assert (tmp_path / "doc" / png).stat().st_size > 1000
    # the report folder holds what it needs to be re-fitted on its own
    assert analyze(tmp_path / "doc", n_boot=20, parametric_top=2).fit.a == pytest.approx(a.fit.a)


def test_extrapolation_is_checked_by_a_real_run_at_the_larger_budget(sweep):
    out, worker = sweep
    a = analyze(
        out,
        n_boot=50,
        parametric_top=2,
        extrapolate=1e12,
        run_check=True,
        worker=worker,
        stream=io.StringIO(),
    )
    assert a.check["status"] == "finished" and a.check["kind"] == "check" and a.check["budget"] == 1e12
    assert a.check["m"] == pytest.approx(a.prediction["m_opt"], rel=0.5)  # nearest family member
    assert "Check run" in (out / "scaling_report.md").read_text()
    again = analyze(out, n_boot=20, parametric_top=2, extrapolate=1e12)  # shown again without re-running
    assert again.check["key"] == a.check["key"]


def test_a_sweep_without_finished_runs_cannot_be_fitted(tmp_path):
    specs, _ = plan_isoflop(FAMILY, [1e10, 3e10], SETTINGS, sizes=3, span=2)
    save_plan(tmp_path, FAMILY, SETTINGS, DEEPSEEK_HPARAMS, specs)
    with pytest.raises(FitError, match="no finished runs"):
        analyze(tmp_path)


def test_hparams_report_writes_the_law_for_the_sweep(tmp_path):
    from nanoseek.scaling.hparams import fit_hparams
    from nanoseek.scaling.laws import HparamLaw

    fit = fit_hparams(*grid_runs())
    path = write_hparams_report(fit, tmp_path, "val_bpb", "nanoseek scaling hparams")
    assert "0.3118 C^-0.1250" in path.read_text() and (tmp_path / "hparams.png").exists()
    assert HparamLaw.load(tmp_path / "hparams_law.json") == fit.law


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["scaling", "fit", "--out", str(tmp_path / "nothing")]) == 2
    assert "no sweep here" in capsys.readouterr().err
    assert main(["scaling", "fit", "--check"]) == 2
    assert "--check needs --extrapolate" in capsys.readouterr().err
    assert main(["scaling", "sweep", "--budgets", "1e11,-3"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["scaling"]) == 2
    assert "choose a scaling action" in capsys.readouterr().err
