"""GRPO end to end (nanoseek/post/grpo.py, rollout.py): log-prob alignment with the engine, batching, a tiny run
that raises its reward, no reference model at beta = 0, robustness to a failing reward, resume."""

import json

import pytest
import torch
from post_helpers import one_thread, save_run, small_cfg, tokenizer

from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.post.chat import prompt_format
from nanoseek.post.grpo import GRPOConfig, GRPOError, GRPOTrainer, sequence_batch, token_logprobs
from nanoseek.post.rollout import Completion, Sampler


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = one_thread()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = Transformer(small_cfg(initializer_range=0.05), seed=0)
    return save_run(tmp_path_factory.mktemp("base"), model)


def test_sequence_batch_masks_exactly_the_completion_targets():
    cs = [Completion([1, 2, 3], [4, 5], "", False), Completion([1], [6, 7, 8], "", True)]
    inputs, targets, mask = sequence_batch(cs, pad_id=0)
    assert inputs.tolist() == [[1, 2, 3, 4], [1, 6, 7, 8]]
    assert targets.tolist() == [[2, 3, 4, 5], [6, 7, 8, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_training_logprobs_match_the_engines_sampling_logprobs():
    """The classic off-by-one: pi(o_t | q, o_<t) from the training forward must equal what the engine sampled."""
    model = Transformer(small_cfg(initializer_range=0.05), seed=0).eval()
    engine = Engine(model, tokenizer(), max_batch=4, max_len=64)
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    reqs = engine.generate(
        prompts, SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=0, ignore_eos=True)
    )
    cs = [Completion(r.prompt, r.output, "", False) for r in reqs]
    inputs, targets, mask = sequence_batch(cs, pad_id=0)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, inputs, targets, start=0, temperature=1.0, with_entropy=True)
    for i, r in enumerate(reqs):
        got = logp[i][mask[i].bool()]
        want = torch.tensor([lp.logprob for lp in r.logprobs])
        assert torch.allclose(got, want, atol=1e-4)
    assert (entropy > 0).all()


def test_sampler_returns_g_completions_per_prompt_with_the_stop_token_kept(run_dir):
    from nanoseek.infer import load

    model, tok = load(run_dir)
    fmt = prompt_format(tok, "r1")
    groups = Sampler(model, fmt, max_new_tokens=6, max_batch=16).generate(
        [fmt.prompt_ids("What is 1+2?"), fmt.prompt_ids("What is 3*4?")], n=5, seed=1
    )
    assert [len(g) for g in groups] == [2 * 0 + 5, 5]
    for g in groups:
        for c in g:
            assert 1 <= len(c.ids) <= 6
            assert c.truncated == (fmt.stop_id not in c.ids)
            assert c.ids.count(fmt.stop_id) <= 1 and (c.truncated or c.ids[-1] == fmt.stop_id)
    again = Sampler(model, fmt, max_new_tokens=6, max_batch=3).generate(
        [fmt.prompt_ids("What is 1+2?")], n=5, seed=1
    )
    assert [c.ids for c in again[0]] == [c.ids for c in groups[0]]  # seeded per request: batch-independent


def _cfg(run_dir, out, **changes):
    base = dict(
        init=str(run_dir),
        task="add:digits=1",
        out=str(out),
        rewards=["post_helpers:digit_reward"],
        steps=12,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=8,
        lr=1e-2,
        eval_every=100,
        eval_problems=0,
        ckpt_every=100,
        device="cpu",
    )
    base.update(changes)
    return GRPOConfig(**base)


def _steps(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_grpo_on_a_tiny_task_increases_reward(run_dir, tmp_path):
    trainer = GRPOTrainer(_cfg(run_dir, tmp_path / "rl"), log=lambda *a: None, progress=False)
    assert trainer.ref is None  # beta = 0 keeps no reference model
    result = trainer.fit()
    steps = _steps(tmp_path / "rl")
    assert result["status"] == "finished" and len(steps) == 12
    first = sum(r["reward"] for r in steps[:3]) / 3
    last = sum(r["reward"] for r in steps[-3:]) / 3
    assert last > first + 0.1, (first, last)
    for key in (
        "reward_std",
        "accuracy",
        "format",
        "frac_zero_std",
        "length",
        "clip_low",
        "entropy",
        "gen_s",
    ):
        assert key in steps[0]
    assert "kl" not in steps[0]
    assert (tmp_path / "rl" / "checkpoints").is_dir()


def test_beta_keeps_a_frozen_reference_and_logs_kl(run_dir, tmp_path):
    trainer = GRPOTrainer(
        _cfg(run_dir, tmp_path / "kl", steps=2, beta=0.04, mu=2), progress=False, log=lambda *a: None
    )
    assert trainer.ref is not None and not any(p.requires_grad for p in trainer.ref.parameters())
    before = [p.clone() for p in trainer.ref.parameters()]
    trainer.fit()
    steps = _steps(tmp_path / "kl")
    assert all("kl" in r and r["kl"] >= 0 for r in steps) and steps[-1]["kl"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref.parameters()))


def test_a_reward_failing_on_every_sample_of_the_first_step_stops_the_run(run_dir, tmp_path):
    # broken, not unlucky: all-zero rewards would make the whole run learn nothing (a reward failing on some
    # samples is counted and logged, and the run goes on: test_post_rewards)
    cfg = _cfg(run_dir, tmp_path / "fail", steps=2, rewards=["post_helpers:raising_reward", "format"])
    with pytest.raises(GRPOError, match="failed on every sample of the first step.*always fails"):
        GRPOTrainer(cfg, progress=False, log=lambda *a: None).fit()


def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal(run_dir, tmp_path):
    cfg = _cfg(
        run_dir,
        tmp_path / "dyn",
        steps=1,
        rewards=["post_helpers:constant_reward"],
        dynamic_sampling=True,
        max_sampling_rounds=2,
    )
    GRPOTrainer(cfg, progress=False, log=lambda *a: None).fit()
    (rec,) = _steps(tmp_path / "dyn")
    assert rec["frac_zero_std"] == 1.0 and rec["groups"] == 0 and rec["rounds"] == 2


def test_resume_continues_the_same_run(run_dir, tmp_path):
    out = tmp_path / "resume"
    full = GRPOTrainer(_cfg(run_dir, tmp_path / "full", steps=4), progress=False, log=lambda *a: None)
    full.fit()
    first = GRPOTrainer(_cfg(run_dir, out, steps=4, ckpt_every=2), progress=False, log=lambda *a: None)
    first.cfg.steps = 2
    first.fit()
    second = GRPOTrainer(_cfg(run_dir, out, steps=4, ckpt_every=2), progress=False, log=lambda *a: None)
    assert second.resume() and second.step == 2
    second.fit()
    a, b = _steps(tmp_path / "full"), _steps(out)
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    assert all(torch.equal(p, q) for p, q in zip(full.model.parameters(), second.model.parameters()))


def test_a_fresh_run_in_a_used_folder_logs_only_its_own_steps(run_dir, tmp_path):
    out = tmp_path / "again"
    for _ in range(2):  # e.g. `make run` twice
        GRPOTrainer(_cfg(run_dir, out, steps=2, ckpt_every=2), progress=False, log=lambda *a: None).fit()
    assert [r["step"] for r in _steps(out)] == [1, 2]
    assert [r["step"] for r in _steps(out / "previous")] == [1, 2]  # the first run, moved aside


@pytest.mark.parametrize(
    "change,message",
    [
        ({"group_size": 1}, "G >= 2"),
        ({"loss_type": "ppo"}, "loss_type"),
        ({"scale_rewards": "std"}, "scale"),
        ({"mode": "zero"}, "mode"),
        ({"temperature": 0.0}, "temperature"),
        ({"mu": 0}, "mu"),
    ],
)
def test_bad_settings_raise_grpo_error(change, message):
    with pytest.raises(GRPOError, match=message):
        GRPOConfig(init="x", task="add", **change).validate()
