import io
import json
import sys
import textwrap

import pytest

from nanoseek.scaling.family import Family
from nanoseek.scaling.laws import DEEPSEEK_HPARAMS
from nanoseek.scaling.sweep import (
    RunSettings,
    SweepError,
    load_plan,
    make_spec,
    plan_isoflop,
    read_results,
    run_sweep,
    save_plan,
)

FAMILY = Family(head_dim=8, seq_len=32, vocab_size=256)
SETTINGS = RunSettings(data="unused", vocab_size=256, data_id="test", min_steps=1)

# A stand-in for `python -m nanoseek.scaling.worker`: same arguments, same result.json, no torch. It logs each
# call, fails (exit 1) for runs whose lr is 0.5, and is "interrupted" (exit 3) while a STOP file exists.
FAKE_WORKER = textwrap.dedent(
    """
    import json, pathlib, sys
    run_dir = pathlib.Path(sys.argv[1])
    spec = json.loads((run_dir / "spec.json").read_text())
    sweep = run_dir.parent.parent
    with open(sweep / "calls.txt", "a") as f:
        f.write(spec["key"] + "\\n")
    if (sweep / "STOP").exists():
        sys.exit(3)
    if spec["lr"] == 0.5:
        print("RuntimeError: boom")
        sys.exit(1)
    m, d = spec["m"], spec["tokens"]
    bpb = 1.5 + 80 / m**0.35 + 300 / d**0.30
    (run_dir / "result.json").write_text(json.dumps({"status": "finished", "val_bpb": bpb, "val_loss": bpb,
                                                     "train_seconds": 0.1, "tokens": d, "steps": spec["steps"]}))
    """
)


@pytest.fixture
def fake_worker(tmp_path):
    path = tmp_path / "fake_worker.py"
    path.write_text(FAKE_WORKER)
    return [sys.executable, str(path)]


def calls(out):
    path = out / "calls.txt"
    return path.read_text().split() if path.exists() else []


def test_plan_sets_tokens_from_the_budget_and_batch_and_lr_from_deepseeks_law():
    specs, notes = plan_isoflop(FAMILY, [3e10, 1e10], SETTINGS, sizes=5, span=4)
    assert [s.budget for s in specs] == sorted(s.budget for s in specs) and not notes
    for s in specs:
        tokens_per_step = s.batch_size * s.seq_len
        assert abs(s.m * s.tokens - s.budget) <= s.m * tokens_per_step / 2  # D = C / M to half a step
        assert s.lr == pytest.approx(DEEPSEEK_HPARAMS.eta(s.budget))
        assert s.batch_size == max(1, round(DEEPSEEK_HPARAMS.batch_tokens(s.budget) / 32))
    assert len({s.key for s in specs}) == len(specs)


def test_plan_leaves_out_runs_too_short_to_mean_anything_and_says_so():
    specs, notes = plan_isoflop(FAMILY, [1e9], RunSettings(min_steps=200), sizes=5, span=8)
    assert notes and all("steps < 200" in n for n in notes)
    assert all(s.steps >= 200 for s in specs)


def test_plan_rejects_bad_budgets():
    for budgets in ([], [1e11, -1.0], [float("nan")]):
        with pytest.raises(SweepError, match="budget"):
            plan_isoflop(FAMILY, budgets, SETTINGS)


def test_run_key_is_the_config_not_the_purpose():
    cfg = FAMILY.for_m(1e5)
    a = make_spec("isoflop", 1e10, cfg, FAMILY, SETTINGS, 1e-2, 256)
    assert make_spec("check", 1e10, cfg, FAMILY, SETTINGS, 1e-2, 256).key == a.key
    assert make_spec("isoflop", 1e10, cfg, FAMILY, SETTINGS, 2e-2, 256).key != a.key
    assert make_spec("isoflop", 1e10, cfg.replace(name="renamed"), FAMILY, SETTINGS, 1e-2, 256).key == a.key


def test_sweep_runs_in_parallel_then_a_rerun_skips_every_finished_run(tmp_path, fake_worker):
    specs, _ = plan_isoflop(FAMILY, [1e10, 3e10], SETTINGS, sizes=4, span=4)
    out, log = tmp_path / "sweep", io.StringIO()
    records = run_sweep(specs, out, jobs=2, worker=fake_worker, stream=log, poll=0.02)
    assert [r["status"] for r in records] == ["finished"] * len(specs)
    assert sorted(calls(out)) == sorted(s.key for s in specs)
    assert "done" in log.getvalue() and "left" in log.getvalue() and "ETA" in log.getvalue()
    again = run_sweep(specs, out, jobs=2, worker=fake_worker, stream=io.StringIO(), poll=0.02)
    assert len(calls(out)) == len(specs)  # nothing ran twice
    assert [r["val_bpb"] for r in again] == [r["val_bpb"] for r in records]
    assert set(read_results(out / "results.jsonl")) == {s.key for s in specs}


def test_a_failed_run_is_recorded_reported_and_retried_next_time(tmp_path, fake_worker):
    cfg = FAMILY.for_m(1e5)
    good = make_spec("isoflop", 1e10, cfg, FAMILY, SETTINGS, 1e-2, 256)
    bad = make_spec("isoflop", 1e10, cfg, FAMILY, SETTINGS, 0.5, 256)
    out, log = tmp_path / "sweep", io.StringIO()
    records = run_sweep([good, bad], out, worker=fake_worker, stream=log, poll=0.02)
    assert [r["status"] for r in records] == ["finished", "failed"]
    assert "boom" in records[1]["error"] and "failed" in log.getvalue() and bad.key in log.getvalue()
    run_sweep([good, bad], out, worker=fake_worker, stream=io.StringIO(), poll=0.02)
    assert calls(out).count(bad.key) == 2 and calls(out).count(good.key) == 1


def test_an_interrupted_run_is_not_a_result_and_resumes_on_the_next_sweep(tmp_path, fake_worker):
    spec = make_spec("isoflop", 1e10, FAMILY.for_m(1e5), FAMILY, SETTINGS, 1e-2, 256)
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "STOP").write_text("")
    with pytest.raises(KeyboardInterrupt):
        run_sweep([spec], out, worker=fake_worker, stream=io.StringIO(), poll=0.02)
    assert read_results(out / "results.jsonl") == {}
    (out / "STOP").unlink()
    assert (
        run_sweep([spec], out, worker=fake_worker, stream=io.StringIO(), poll=0.02)[0]["status"] == "finished"
    )


def test_plan_round_trips_through_sweep_json(tmp_path):
    specs, _ = plan_isoflop(FAMILY, [1e10, 3e10], SETTINGS, sizes=3, span=2)
    save_plan(tmp_path, FAMILY, SETTINGS, DEEPSEEK_HPARAMS, specs, command="nanoseek scaling sweep")
    plan = load_plan(tmp_path)
    assert plan["family"] == FAMILY and plan["settings"] == SETTINGS and plan["law"] == DEEPSEEK_HPARAMS
    assert plan["keys"] == [s.key for s in specs] and plan["budgets"] == [1e10, 3e10]
    with pytest.raises(SweepError, match="no sweep here"):
        load_plan(tmp_path / "elsewhere")


def test_a_corrupt_results_line_names_the_file_and_line(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"key": "a"}) + "\n{oops\n")
    with pytest.raises(SweepError, match="results.jsonl:2"):
        read_results(tmp_path / "results.jsonl")


@pytest.mark.slow
def test_real_worker_trains_tiny_runs_and_a_rerun_skips_them(tmp_path, monkeypatch):
    from nanoseek.train.run import prepare_data

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(20):
        (data / f"{i}.txt").write_text(" ".join(f"w{(i * j) % 37}" for j in range(300)))
    prepared = prepare_data(str(data), None, 300, log=lambda *a: None, progress=False)
    settings = RunSettings(data=str(data), vocab_size=300, data_id=prepared.data_dir.name, min_steps=1)
    fam = Family(head_dim=8, seq_len=16, vocab_size=prepared.tokenizer.vocab_size)
    cfg = fam.for_m(2e4)
    budget = fam.m(cfg.num_hidden_layers, cfg.hidden_size) * 64  # 64 tokens: 2 steps of 2 x 16
    spec = make_spec("isoflop", budget, cfg, fam, settings, 1e-2, 32)
    assert spec.steps == 2
    rec = run_sweep([spec], tmp_path / "sweep", stream=io.StringIO(), poll=0.1)[0]
    assert rec["status"] == "finished" and rec["val_bpb"] > 0 and rec["tokens"] == 64
    assert not (tmp_path / "sweep" / "runs" / spec.key / "checkpoints").exists()
    again = run_sweep([spec], tmp_path / "sweep", stream=io.StringIO(), poll=0.1)[0]
    assert again == rec
