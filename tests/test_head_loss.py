import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import Transformer
from nanoseek.model.head_loss import linear_cross_entropy


def _reference(h, w, y):
    return F.cross_entropy(h @ w.t(), y, ignore_index=-100)


@pytest.mark.parametrize("chunk", [7, 64, 1000])  # ragged last chunk, several chunks, one chunk
def test_value_and_gradients_match_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(150, 24, requires_grad=True)
    w = torch.randn(300, 24, requires_grad=True)
    y = torch.randint(0, 300, (150,))
    y[::5] = -100  # ignored rows: no loss, no gradient, not in the mean's denominator
    ref = _reference(h, w, y)
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w))  # a non-unit upstream gradient
    got = linear_cross_entropy(h, w, y, chunk=chunk)
    got_grads = torch.autograd.grad(got * 3.0, (h, w))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert got_grads[0][::5].abs().max() == 0  # ignored rows get exactly zero gradient


def test_only_requested_gradients_and_none_under_no_grad():
    torch.manual_seed(0)
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(50, 8)  # frozen head
    y = torch.randint(0, 50, (40,))
    (g,) = torch.autograd.grad(linear_cross_entropy(h, w, y, chunk=16), (h,))
    torch.testing.assert_close(g, torch.autograd.grad(_reference(h, w, y), (h,))[0], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h, w, y).detach(), rtol=1e-6, atol=1e-6)


def test_all_rows_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    y = torch.full((4,), -100)
    assert math.isnan(linear_cross_entropy(h, w, y).item())
    assert math.isnan(_reference(h, w, y).item())


@pytest.mark.parametrize("tied", [False, True])
def test_model_fused_loss_equals_the_plain_head(tiny_cfg, tied):
    """Transformer(..., logits=False): same main, MTP and total losses and the same gradients as the plain path."""
    cfg = tiny_cfg.replace(num_nextn_predict_layers=2, tie_word_embeddings=tied, initializer_range=0.05)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, :3] = -100
    outs, grads = [], []
    for logits in (True, False):
        model = Transformer(cfg, seed=0)
        out = model(x, targets=y, logits=logits)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    plain, fused = outs
    assert fused.logits is None and fused.mtp_logits == []
    for k in ("loss", "lm_loss", "mtp_loss", "balance_loss"):
        torch.testing.assert_close(getattr(fused, k), getattr(plain, k), rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_rows_gives_zero_weight_gradient():
    w = torch.randn(40, 8, requires_grad=True)
    loss = linear_cross_entropy(torch.zeros(0, 8, requires_grad=True), w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert torch.isnan(loss) and torch.equal(w.grad, torch.zeros_like(w))
