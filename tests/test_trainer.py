import json
import math
import shutil

import pytest
import torch

from nanoseek.train.checkpoint import latest_valid_checkpoint, list_checkpoints
from nanoseek.train.trainer import TrainConfig, Trainer, TrainError


class ArrayLoader:
    """A deterministic in-memory loader with the trainer's loader protocol."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens, self.B, self.T = tokens, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)
        self.i = 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        starts = torch.randint(0, len(self.tokens) - self.T - 1, (self.B,), generator=g)
        w = torch.stack([self.tokens[s : s + self.T + 1] for s in starts])
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (5000,), generator=g)


def _trainer(cfg, out, **kw):
    tc = TrainConfig(
        out=str(out),
        seq_len=32,
        batch_size=4,
        steps=6,
        warmup_steps=2,
        eval_every=3,
        ckpt_every=3,
        lr=3e-3,
        **kw,
    )
    val = lambda: [next(ArrayLoader(_tokens(), 4, 32, 0)) for _ in range(2)]  # noqa: E731
    return Trainer(
        cfg, tc, ArrayLoader(_tokens(), 4, 32), val, bytes_per_token=2.0, log=lambda *a: None, progress=False
    )


def _losses(run_dir):
    recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [r["loss"] for r in recs if "loss" in r and r.get("event") is None]


def test_training_logs_metrics_evals_and_checkpoints(tiny_cfg, tmp_path):
    result = _trainer(tiny_cfg, tmp_path).fit()
    assert result["status"] == "finished" and result["step"] == 6
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in recs if r.get("event") is None]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tok_s", "mfu", "max_vio"):
        assert key in steps[0], key
    assert "expert_load" in steps[0] and len(steps[0]["expert_load"]) == 2
    evals = [r for r in recs if r.get("event") == "eval"]
    assert [e["step"] for e in evals] == [3, 6] and evals[0]["val_bpb"] == pytest.approx(
        evals[0]["val_loss"] / (2.0 * math.log(2)), rel=1e-3
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000006"]


def test_resume_is_bit_identical(tiny_cfg, tmp_path):
    # On CPU. CUDA's index_add_ (the MoE scatter) accumulates with atomics, so GPU runs agree only to rounding.
    _trainer(tiny_cfg, tmp_path / "a", device="cpu").fit()
    interrupted = _trainer(tiny_cfg, tmp_path / "b", device="cpu").fit(stop_at=4)
    assert interrupted["status"] == "interrupted"
    resumed = _trainer(tiny_cfg, tmp_path / "b", device="cpu")
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    a = latest_valid_checkpoint(tmp_path / "a") / "model.safetensors"
    b = latest_valid_checkpoint(tmp_path / "b") / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_steps_lost_after_the_last_checkpoint_are_not_logged_twice(tiny_cfg, tmp_path):
    _trainer(tiny_cfg, tmp_path / "a", device="cpu").fit()
    _trainer(tiny_cfg, tmp_path / "b", device="cpu").fit(stop_at=5)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_0000005")  # as if it crashed after step 5: back to 3
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # and cut a record in half
    resumed = _trainer(tiny_cfg, tmp_path / "b", device="cpu")
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # steps 4 and 5 once, from the resumed run


def test_a_fresh_start_moves_the_earlier_run_aside(tiny_cfg, tmp_path):
    _trainer(tiny_cfg, tmp_path).fit()
    first = (tmp_path / "metrics.jsonl").read_text()
    said = []
    t = _trainer(tiny_cfg, tmp_path)
    t.log = said.append
    t.fit()  # not resumed: a new run in the same folder
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]  # this run's records only
    assert (tmp_path / "previous" / "metrics.jsonl").read_text() == first  # the earlier one's, kept
    assert [p.name for p in list_checkpoints(tmp_path / "previous")] == ["step_0000003", "step_0000006"]
    assert any("moved to" in line for line in said)
    second = (tmp_path / "metrics.jsonl").read_text()
    _trainer(tiny_cfg, tmp_path).fit()  # a third: the second moves aside, the first moves on, nothing is lost
    assert (tmp_path / "previous" / "metrics.jsonl").read_text() == second
    assert (tmp_path / "previous.1" / "metrics.jsonl").read_text() == first
    assert [p.name for p in list_checkpoints(tmp_path / "previous.1")] == ["step_0000003", "step_0000006"]
    _trainer(tiny_cfg, tmp_path).fit()  # a fourth
    assert (tmp_path / "previous.1" / "metrics.jsonl").read_text() == second
    assert (tmp_path / "previous.2" / "metrics.jsonl").read_text() == first


def _records(run_dir):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r.get("event") is None]


def test_nonfinite_step_is_skipped_and_never_checkpointed(tiny_cfg, tmp_path):
    t = _trainer(tiny_cfg, tmp_path)
    t.fit(stop_at=3)
    good = latest_valid_checkpoint(tmp_path)
    with torch.no_grad():
        t.model.norm.weight[0] = float("nan")  # poison: every later loss is NaN
    t.cfg.max_bad_steps = 2
    result = t.fit()
    assert result["status"] == "diverged" and t.step == 5
    assert latest_valid_checkpoint(tmp_path) == good
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any(r.get("event") == "nonfinite" for r in recs)


def test_transient_nan_skips_one_update(tiny_cfg, tmp_path, monkeypatch):
    t = _trainer(tiny_cfg, tmp_path)
    real = t.forward
    calls = {"n": 0}

    def flaky(x, targets=None, **kw):
        out = real(x, targets=targets, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    t.forward = flaky
    result = t.fit()
    assert result["status"] == "finished"
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert len(_losses(tmp_path)) == 5  # 6 steps, one skipped


def test_bad_train_configs(tiny_cfg, tmp_path):
    with pytest.raises(TrainError, match="seq_len"):
        TrainConfig(seq_len=4096, steps=1).validate(tiny_cfg)
    with pytest.raises(TrainError, match="steps"):
        TrainConfig(seq_len=64).validate(tiny_cfg)
    with pytest.raises(TrainError, match="batch_size"):
        TrainConfig(seq_len=64, batch_size=0, steps=1).validate(tiny_cfg)
    assert TrainConfig(tokens=10_000, seq_len=100, batch_size=10).validate(tiny_cfg).steps == 10


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_cfg, tmp_path):
    """`train --compile` on a CPU: the fp32 grouped GEMM stays outside the graph (its fake-tensor rule is bf16-only),
    and the compiled step gives the eager step's losses (~1 min, most of it compiling)."""
    _trainer(tiny_cfg, tmp_path / "eager").fit()
    _trainer(tiny_cfg, tmp_path / "compiled", compile=True).fit()
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(compiled) == len(eager) == 6
    assert compiled == pytest.approx(eager, rel=1e-4)
