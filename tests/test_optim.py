import pytest
import torch

from nanoseek.model import Transformer
from nanoseek.train.optim import deepseek_hparams, lr_multiplier, make_optimizer


def test_multistep_schedule_values():
    # DeepSeek LLM §2.3: warmup, then x1, x0.316 from 80%, x0.1 from 90% of training
    f = [lr_multiplier(s, 100, 10, "multistep") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == f[79] == 1.0
    assert f[80] == f[89] == 0.316
    assert f[90] == f[99] == 0.1


def test_cosine_and_wsd_schedules():
    cos = [lr_multiplier(s, 110, 10, "cosine", min_lr_ratio=0.1) for s in range(111)]
    assert cos[10] == pytest.approx(1.0) and cos[110] == pytest.approx(0.1)
    assert cos[60] == pytest.approx(0.55)
    wsd = [lr_multiplier(s, 100, 10, "wsd", min_lr_ratio=0.0, decay_frac=0.2) for s in range(101)]
    assert wsd[50] == wsd[79] == 1.0 and wsd[90] == pytest.approx(0.5) and wsd[100] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(0, 10, 1, "linear")


def test_weight_decay_on_matrices_only(tiny_cfg):
    model = Transformer(tiny_cfg)
    opt = make_optimizer(model, 1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params()
    # the routing bias is a buffer: never seen by the optimizer
    bias = model.moe_layers()[0].gate.e_score_bias
    assert not any(p is bias for g in opt.param_groups for p in g["params"])
    assert opt.defaults["fused"]  # plain (unsharded) tensors: the one-kernel AdamW


def test_fused_adamw_matches_foreach(tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg, seed=0)
    twin = Transformer(tiny_cfg, seed=0)
    fused, ref = make_optimizer(model, 1e-2), make_optimizer(twin, 1e-2)
    ref = torch.optim.AdamW(ref.param_groups, lr=1e-2, betas=(0.9, 0.95), foreach=True)
    for _ in range(3):
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.ones_like(p) * 0.1 + p.detach() * 0.5  # same deterministic gradient for both
        fused.step()
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deepseek_llm_hyperparameter_law():
    # REFERENCE §12.1: at C = 1e17... eq. 1; spot values derived there for C = 1e13
    eta, batch = deepseek_hparams(1e13)
    assert eta == pytest.approx(7.4e-3, rel=0.02) and batch == pytest.approx(5.2e3, rel=0.03)


def test_one_step_reduces_loss_on_a_fixed_batch(tiny_cfg):
    model = Transformer(tiny_cfg)
    opt = make_optimizer(model, 3e-3)
    tokens = torch.randint(0, 256, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(3):
        out = model(x, targets=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[2] < losses[0]
