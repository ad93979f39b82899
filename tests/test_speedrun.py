import json
import random

from nanoseek.speedrun import speedrun
from nanoseek.train.report import read_metrics


def _corpus(path):
    rng = random.Random(0)
    words = "the king queen lord love night day sword crown heart death fair sweet honour blood".split()
    path.mkdir()
    for i in range(30):
        lines = (" ".join(rng.choice(words) for _ in range(12)) for _ in range(50))
        (path / f"doc{i}.txt").write_text("\n".join(lines))
    return path


def test_speedrun_quick_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    report = speedrun(
        out=str(tmp_path / "run"),
        data=str(_corpus(tmp_path / "data")),
        quick=True,
        progress=False,
        log=lambda *a: None,
    )
    run = tmp_path / "run"
    text = report.read_text()
    for needle in (
        "Validation loss",
        "bits/byte",
        "MFU",
        "MaxVio",
        "## Samples",
        "Model accounting",
        "loss.png",
    ):
        assert needle in text, needle
    assert (run / "loss.png").stat().st_size > 1000 and (run / "balance.png").stat().st_size > 1000
    steps, evals = read_metrics(run)
    assert len(steps) == 30 and evals[-1]["val_loss"] < evals[0]["val_loss"] < 7
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"]
    assert json.loads((run / "config.json").read_text())["vocab_size"] <= 512


def test_an_interrupted_pretraining_stops_the_speedrun(tmp_path, monkeypatch, capsys):
    """Ctrl-C during pretraining: the trainer saves and stops, and the speedrun post-trains nothing on the
    half-trained model and exits 130, as a shell reports Ctrl-C."""
    from nanoseek.cli import main
    from nanoseek.train.trainer import Trainer

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    fit = Trainer.fit
    monkeypatch.setattr(
        Trainer, "fit", lambda self, **kw: fit(self, stop_at=3, **kw)
    )  # as if Ctrl-C at step 3
    run = tmp_path / "run"
    code = main(
        ["speedrun", "--quick", "--no-progress", "--out", str(run), "--data", str(_corpus(tmp_path / "d"))]
    )
    assert code == 130 and "continue it with --resume" in capsys.readouterr().err
    assert (run / "checkpoints").is_dir() and not (run / "sft").exists() and not (run / "report.md").exists()


def test_post_training_resumes_only_on_the_model_it_started_from(tmp_path, monkeypatch):
    import nanoseek.speedrun as sr

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(sr, "post_training", lambda out, quick, resume, **kw: calls.append(resume) or [])
    kw = dict(out=str(tmp_path / "run"), data=str(_corpus(tmp_path / "d")), quick=True, progress=False)
    sr.speedrun(steps=3, log=lambda *a: None, **kw)
    sr.speedrun(
        steps=3, resume=True, log=lambda *a: None, **kw
    )  # nothing more to pretrain: post-training resumes
    sr.speedrun(
        steps=5, resume=True, log=lambda *a: None, **kw
    )  # pretrained further: SFT and GRPO start over
    assert calls == [False, True, False]
