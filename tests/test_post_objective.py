"""The GRPO objective (nanoseek/post/objective.py), checked on hand-computed examples and by gradients."""

import math

import pytest
import torch

from nanoseek.post.objective import aggregate, clipped_surrogate, group_advantages, grpo_loss, k3_kl


# ---- advantages ---------------------------------------------------------------------------------------------
def test_group_advantages_use_the_bessel_corrected_group_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 4.0, 6.0, 8.0]])
    a = group_advantages(r, "group", std_eps=0.0)
    std0 = math.sqrt((4 * 0.25) / 3)  # deviations +-0.5, divided by G - 1 = 3
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std0)
    std1 = math.sqrt((9 + 1 + 1 + 9) / 3)
    assert torch.allclose(a[1], torch.tensor([-3.0, -1.0, 1.0, 3.0]) / std1)
    with_eps = group_advantages(r, "group")  # default std_eps = 1e-4 (TRL)
    assert torch.allclose(with_eps[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_an_all_equal_group_gets_exactly_zero_advantage(scale):
    r = torch.tensor([[0.3, 0.3, 0.3], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    a = group_advantages(r, scale)
    assert torch.equal(a[0], torch.zeros(3)) and torch.equal(a[2], torch.zeros(3))
    assert a[1, 1] > 0 > a[1, 0]
    assert torch.allclose(a.sum(dim=1), torch.zeros(3), atol=1e-6)  # centered per group


def test_batch_scaling_divides_by_the_std_of_all_rewards_and_none_only_centers():
    r = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    centered = torch.tensor([[-0.5, 0.5], [-1.5, 1.5]])
    assert torch.allclose(group_advantages(r, "none"), centered)
    assert torch.allclose(group_advantages(r, "batch", std_eps=0.0), centered / r.std())


def test_group_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.ones(2, 2), "std")


# ---- k3 -----------------------------------------------------------------------------------------------------
def test_k3_is_nonnegative_and_zero_iff_policy_equals_reference():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g) * 5
    ref = -torch.rand(1000, generator=g) * 5
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all() and (kl > 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    # by hand: pi_ref/pi = e^{-1}: e^{-1} - (-1) - 1 = e^{-1}
    assert torch.isclose(k3_kl(torch.tensor(0.0), torch.tensor(-1.0)), torch.tensor(math.exp(-1)))


# ---- aggregation --------------------------------------------------------------------------------------------
VALUES = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_grpo_aggregation_averages_tokens_then_sequences():
    # (1/G) sum_i (1/|o_i|) sum_t: ((1+2+3)/3 + 4/1) / 2 = 3
    assert aggregate(VALUES, MASK, "grpo", max_completion_length=4).item() == pytest.approx(3.0)


def test_dapo_aggregation_divides_by_the_token_count():
    # (1+2+3+4) / 4 tokens = 2.5
    assert aggregate(VALUES, MASK, "dapo", max_completion_length=4).item() == pytest.approx(2.5)


def test_dr_grpo_aggregation_divides_by_sequences_times_max_length():
    # (1+2+3+4) / (2 sequences * L_max 8) = 0.625, whatever the actual lengths
    assert aggregate(VALUES, MASK, "dr_grpo", max_completion_length=8).item() == pytest.approx(0.625)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_aggregating_in_pieces_with_global_normalizers_equals_the_whole(loss_type):
    g = torch.Generator().manual_seed(1)
    v, m = torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.3).float()
    whole = aggregate(v, m, loss_type, 5)
    pieces = sum(
        aggregate(v[i : i + 2], m[i : i + 2], loss_type, 5, num_sequences=6, num_tokens=m.sum())
        for i in (0, 2, 4)
    )
    assert torch.allclose(whole, pieces)


# ---- the clip -----------------------------------------------------------------------------------------------
def test_the_clip_is_inactive_on_policy():
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5]).unsqueeze(-1)
    obj, low, high = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    assert not low.any() and not high.any()
    obj.sum().backward()
    assert torch.allclose(logp.grad, adv.expand(3, 4))  # d(r A)/d logp = r A = A at r = 1


def test_the_clip_stops_the_gradient_only_off_policy_in_the_advantages_direction():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_()  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    obj, low, high = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert high.tolist() == [True, False, False, False] and low.tolist() == [False, False, True, False]
    obj.sum().backward()
    # clipped (ratio past the bound in the direction A pushes): zero gradient; otherwise d(rA)/dlogp = r A
    assert torch.allclose(logp.grad, torch.tensor([0.0, -1.5, 0.0, 0.5]))


def test_clip_higher_uses_separate_low_and_high_bounds():
    old = torch.zeros(2)
    logp = torch.log(torch.tensor([1.25, 1.25]))
    _, _, high_dapo = clipped_surrogate(logp, old, torch.ones(2), 0.2, 0.28)
    _, _, high_ppo = clipped_surrogate(logp, old, torch.ones(2), 0.2, 0.2)
    assert not high_dapo.any() and high_ppo.all()


# ---- the whole loss: gradients, not values ---------------------------------------------------------------------
def _toy(seed=0):
    """Free logits of 3 sequences x 5 tokens over 7 symbols, sampled tokens and a ragged completion mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]).float()
    return logits, tokens, mask


def _logp(logits, tokens):
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _grad(loss, logits):
    return torch.autograd.grad(loss, logits)[0]


def test_on_policy_grpo_loss_is_zero_but_its_gradient_is_the_policy_gradient():
    logits, tokens, mask = _toy()
    logp = _logp(logits, tokens)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]), "group").flatten()
    loss = grpo_loss(logp, logp.detach(), adv, mask, loss_type="grpo").loss
    assert abs(loss.item()) < 1e-6  # ratio 1, advantages centered, per-sequence means: exactly 0
    got = _grad(loss, logits)
    # REINFORCE with the grpo normalizer: -(1/G) sum_i A_i / |o_i| sum_t grad log pi(o_it)
    manual = -((adv.unsqueeze(-1) * _logp(logits, tokens) * mask).sum(-1) / mask.sum(-1)).sum() / 3
    assert got.abs().sum() > 0 and torch.allclose(got, _grad(manual, logits), atol=1e-6)


@pytest.mark.parametrize("loss_type,normalizer", [("dapo", 10.0), ("dr_grpo", 3 * 8.0)])
def test_token_level_losses_weight_every_token_equally(loss_type, normalizer):
    logits, tokens, mask = _toy()
    logp = _logp(logits, tokens)
    adv = torch.tensor([1.0, -0.5, -0.5])
    loss = grpo_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, max_completion_length=8).loss
    manual = -(adv.unsqueeze(-1) * _logp(logits, tokens) * mask).sum() / normalizer
    assert torch.allclose(_grad(loss, logits), _grad(manual, logits), atol=1e-6)


def test_kl_term_adds_beta_times_the_k3_gradient():
    logits, tokens, mask = _toy()
    logp = _logp(logits, tokens)
    ref = logp.detach() - 0.3
    beta = 0.04
    terms = grpo_loss(logp, logp.detach(), torch.zeros(3), mask, ref_logp=ref, beta=beta, loss_type="dapo")
    assert terms.kl is not None and (terms.kl[mask.bool()] > 0).all()
    # d k3 / d logp = 1 - exp(ref - logp), per token, under the dapo normalizer
    weight = beta * (1 - torch.exp(ref - logp.detach()))
    manual = (weight * _logp(logits, tokens) * mask).sum() / mask.sum()
    assert torch.allclose(_grad(terms.loss, logits), _grad(manual, logits), atol=1e-6)


def test_beta_needs_reference_logprobs():
    logits, tokens, mask = _toy()
    logp = _logp(logits, tokens)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp.detach(), torch.zeros(3), mask, beta=0.1)
