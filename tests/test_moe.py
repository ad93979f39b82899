import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import get_preset
from nanoseek.model.moe import MoE, max_vio


def _moe(cfg, std=0.1):
    torch.manual_seed(0)
    m = MoE(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=std)
    return m


@pytest.fixture
def cfg():
    # 32 experts in 8 groups of 4, keep 3 groups, top-6
    return get_preset("tiny").replace(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)


def test_each_token_gets_exactly_k_distinct_experts(cfg):
    gate = _moe(cfg).gate
    idx, w, _ = gate(torch.randn(500, cfg.hidden_size))
    assert idx.shape == (500, 6)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct


def test_group_limit_is_respected_even_with_bias(cfg):
    gate = _moe(cfg).gate
    gate.e_score_bias.copy_(torch.randn(32) * 0.5)
    idx, _, _ = gate(torch.randn(500, cfg.hidden_size))
    groups = idx // (32 // 8)
    n_groups = torch.tensor([len(set(g.tolist())) for g in groups])
    assert n_groups.max() <= cfg.topk_group
    assert n_groups.max() == cfg.topk_group  # the limit is reached (not vacuous)


def test_selection_follows_v3_group_rule(cfg):
    """Groups ranked by the sum of their top-2 biased scores; experts top-k within kept groups."""
    gate = _moe(cfg).gate
    gate.e_score_bias.copy_(torch.randn(32) * 0.2)
    x = torch.randn(64, cfg.hidden_size)
    idx, _, scores = gate(x)
    biased = scores + gate.e_score_bias
    for t in range(64):
        g = biased[t].view(8, 4)
        kept = g.topk(2, -1).values.sum(-1).topk(3).indices
        allowed = torch.full((32,), float("-inf"))
        for k in kept:
            allowed[k * 4 : (k + 1) * 4] = biased[t, k * 4 : (k + 1) * 4]
        assert set(idx[t].tolist()) == set(allowed.topk(6).indices.tolist())


def test_bias_changes_selection_but_never_gate_weights(cfg):
    gate = _moe(cfg).gate
    x = torch.randn(200, cfg.hidden_size)
    idx0, w0, scores = gate(x)
    gate.e_score_bias[7] = 10.0  # force expert 7 into every selection
    idx1, w1, _ = gate(x)
    assert (idx1 == 7).any(-1).all() and not (idx0 == 7).any(-1).all()
    # weights are the unbiased scores of the chosen experts, normalized, times the route scale
    s = scores.gather(1, idx1)
    torch.testing.assert_close(w1, s / s.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    assert torch.allclose(w1.sum(-1), torch.full((200,), cfg.routed_scaling_factor))


def test_softmax_max_group_routing_v2_style(cfg):
    cfg2 = cfg.replace(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
    gate = _moe(cfg2).gate
    idx, w, scores = gate(torch.randn(100, cfg.hidden_size))
    assert torch.allclose(scores.sum(-1), torch.ones(100))
    torch.testing.assert_close(w, scores.gather(1, idx) * cfg2.routed_scaling_factor)


def test_experts_match_a_per_token_reference_and_gradients_flow(cfg):
    moe = _moe(cfg)
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    out, _ = moe(x)
    x_TD = x.detach().reshape(-1, cfg.hidden_size)
    idx, w, _ = moe.gate(x_TD)
    ref = moe.shared_experts(x_TD)
    E = moe.experts
    for t in range(x_TD.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            h = F.silu(x_TD[t] @ E.w1[e].T) * (x_TD[t] @ E.w3[e].T)
            ref[t] += w[t, k] * (h @ E.w2[e].T)
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), ref, atol=1e-5, rtol=1e-4)
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in moe.named_parameters():
        assert p.grad is not None, name
    assert moe.gate.weight.grad.abs().sum() > 0  # the gate learns through the gate weights


def test_bias_update_lowers_max_vio_on_skewed_routing(cfg):
    """Aux-loss-free balancing: b += gamma * sign(mean - load) from each step's counts [V3 §2.1.2]."""

    def run(gamma):
        moe = _moe(cfg)
        skew = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(5))
        skew /= skew.norm()
        moe.gate.weight.data[:4] += 1.0 * skew  # experts 0-3 love the skewed direction
        gen = torch.Generator().manual_seed(1)
        vios = []
        for _ in range(300):
            x = torch.randn(256, cfg.hidden_size, generator=gen) + 2 * skew
            with torch.no_grad():
                idx, _, _ = moe.gate(x)
            moe.tokens_per_expert += torch.bincount(idx.flatten(), minlength=32).float()
            vios.append(moe.update_bias(gamma=gamma))
        return vios, moe

    vios, moe = run(0.01)
    control, _ = run(0.0)
    assert vios[0] > 2.0  # strongly skewed at start
    late, late_control = sum(vios[-50:]) / 50, sum(control[-50:]) / 50
    assert late < 0.2 * vios[0] and late < 0.2 * late_control  # balanced, and not by chance
    assert moe.gate.e_score_bias[:4].max() < 0  # overloaded experts were pushed down


def test_update_bias_uses_sign_of_mean_minus_load(cfg):
    moe = _moe(cfg)
    moe.tokens_per_expert.copy_(torch.arange(32.0))
    vio = moe.update_bias(gamma=0.1)
    assert vio == pytest.approx((31 - 15.5) / 15.5)
    assert torch.allclose(moe.gate.e_score_bias, 0.1 * torch.sign(15.5 - torch.arange(32.0)))
    assert moe.tokens_per_expert.sum() == 0  # counts reset for the next step


def test_load_counts_accumulate_only_in_training(cfg):
    moe = _moe(cfg)
    x = torch.randn(1, 10, cfg.hidden_size)
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0
    moe.train()
    moe(x)
    moe(x)
    assert moe.tokens_per_expert.sum() == 2 * 10 * 6


def test_sequence_wise_balance_loss_matches_eqs_17_to_20(cfg):
    moe = _moe(cfg.replace(seq_aux_alpha=0.5)).train()
    x = torch.randn(3, 9, cfg.hidden_size)
    _, loss = moe(x)
    idx, _, s = moe.gate(x.view(-1, cfg.hidden_size))
    E, K, T = 32, 6, 9
    ref = 0.0
    for b in range(3):
        sel = torch.zeros(E)
        for e in idx[b * T : (b + 1) * T].flatten():
            sel[e] += 1
        f = E / (K * T) * sel
        P = (s[b * T : (b + 1) * T] / s[b * T : (b + 1) * T].sum(-1, keepdim=True)).mean(0)
        ref += 0.5 * (f * P).sum()
    assert loss.item() == pytest.approx(ref.item() / 3, rel=1e-5)
    # perfectly uniform routing gives f_i P_i summing to 1 per sequence: the loss is ~alpha at balance
    assert 0 < loss.item()


def test_classic_aux_loss_and_none(cfg):
    x = torch.randn(2, 8, cfg.hidden_size)
    assert _moe(cfg.replace(balancing="none")).train()(x)[1].item() == 0
    loss = _moe(cfg.replace(balancing="aux_loss", scoring_func="softmax", aux_loss_alpha=0.01)).train()(x)[1]
    assert loss.requires_grad and loss.item() > 0


def test_max_vio():
    assert max_vio(torch.tensor([5.0, 5.0, 5.0])) == 0
    assert max_vio(torch.tensor([0.0, 0.0, 9.0])) == pytest.approx(2.0)


def test_padded_expert_rows_give_the_same_output_and_gradients(monkeypatch):
    """Inside fast_matmul() each expert's rows are padded to a multiple of PAD_ROWS (token 0, gate weight 0)."""
    from nanoseek.model import moe as moe_module

    torch.manual_seed(0)
    experts = moe_module.Experts(8, 16, 12)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(37, 16)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(37)])
    weights = torch.rand(37, 3)
    results = []
    for padded in (False, True):
        monkeypatch.setattr(moe_module, "fast_matmul_active", lambda p=padded: p)
        xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = experts(xs, idx, ws)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), [xs, ws, *experts.parameters()])
        results.append((out.detach(), grads))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    token, gate, counts = moe_module._pad_rows(
        torch.tensor([5, 6, 7, 8]), torch.ones(4, 1), torch.tensor([3, 0, 1]), 4
    )
    assert counts.tolist() == [4, 0, 4]
    assert token.tolist() == [5, 6, 7, 0, 8, 0, 0, 0]
    assert gate.squeeze(1).tolist() == [1, 1, 1, 0, 1, 0, 0, 0]
