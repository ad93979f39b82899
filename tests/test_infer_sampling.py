"""Sampling (nanoseek/infer/sampling.py) and the speculative accept/reject rule (nanoseek/infer/speculative.py)."""

import torch

from nanoseek.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    draw,
    make_generator,
    probabilities,
    residual,
)
from nanoseek.infer.speculative import verify


def test_speculative_rule_outputs_exactly_the_target_distribution():
    """Draft d ~ q, accept with min(1, p/q), else resample from norm(max(0, p - q)): the token is ~ p."""
    torch.manual_seed(0)
    V, N = 6, 20_000
    p0 = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
    q = torch.tensor([0.05, 0.10, 0.40, 0.30, 0.05, 0.10])  # a poor drafter
    p1 = torch.tensor([0.10, 0.10, 0.50, 0.10, 0.10, 0.10])
    logits = torch.stack([p0.log(), p1.log()]).expand(N, 2, V)
    drafts = torch.multinomial(q, N, replacement=True)
    params = [SamplingParams(temperature=1.0)] * N
    gens = [make_generator(i) for i in range(N)]
    accepted, first, bonus = verify(logits, drafts, q.expand(N, V), params, [()] * N, gens)
    freq = torch.bincount(first, minlength=V).float() / N
    assert (freq - p0).abs().max() < 0.015  # ~4 standard errors at N = 20k
    expected_acceptance = torch.minimum(p0, q).sum()  # sum_x min(p, q)
    assert abs(accepted.float().mean() - expected_acceptance) < 0.015
    bonus_freq = torch.bincount(bonus[accepted], minlength=V).float() / int(accepted.sum())
    assert (bonus_freq - p1).abs().max() < 0.025


def test_greedy_verification_accepts_exactly_the_argmax():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]], [[2.0, 0.0, 1.0], [0.0, 0.0, 4.0]]])
    drafts = torch.tensor([1, 2])
    q = torch.nn.functional.one_hot(drafts, 3).float()
    params = [SamplingParams(temperature=0)] * 2
    accepted, first, bonus = verify(logits, drafts, q, params, [(), ()], [make_generator(0)] * 2)
    assert accepted.tolist() == [True, False] and first.tolist() == [1, 0] and bonus.tolist() == [0, 2]


def test_probabilities_apply_temperature_top_k_and_top_p_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(4, 1)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=2.0),
    ]
    probs = probabilities(logits, params, [()] * 4)
    assert probs[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (probs[1, 2:] == 0).all() and torch.allclose(probs[1, :2], logits[0, :2].softmax(-1))
    full = logits[0].softmax(-1)  # [0.644, 0.237, 0.087, 0.032]: 0.9 needs the first three
    assert (probs[2] > 0).tolist() == [True, True, True, False]
    assert torch.allclose(probs[2, :3], full[:3] / full[:3].sum())
    assert torch.allclose(probs[3], (logits[0] / 2).softmax(-1))
    assert torch.allclose(probs.sum(-1), torch.ones(4))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = apply_repetition_penalty(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[0, 1, 1]])
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_draw_inverts_the_cdf_and_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).repeat(5, 1)
    u = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.999999])
    assert draw(probs, u).tolist() == [1, 1, 1, 3, 3]
    r = residual(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.9, 0.05, 0.05]]))
    assert torch.allclose(r, torch.tensor([[0.0, 1.0, 0.0]]))
