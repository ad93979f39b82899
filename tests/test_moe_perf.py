"""The fast expert path (sort once, grouped GEMMs, one scatter) computes exactly the naive per-token sum."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import moe as moe_module
from nanoseek.model.moe import Experts


def _naive(ex: Experts, x, idx, weights):
    """out[t] = sum_k weights[t,k] * SwiGLU_{idx[t,k]}(x[t]), one (token, slot) pair at a time."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for k in range(idx.shape[1]):
            e = idx[t, k]
            h = F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])
            acc = acc + weights[t, k] * (ex.w2[e] @ h)
        rows.append(acc)
    return torch.stack(rows)


def _run(ex, fn, x0, idx, w0, grad_out):
    ex.zero_grad(set_to_none=True)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    out = fn(ex, x, idx, w)
    (out * grad_out).sum().backward()
    return out.detach(), x.grad, w.grad, ex.w1.grad.clone(), ex.w2.grad.clone(), ex.w3.grad.clone()


@pytest.mark.parametrize("grouped_kernel", [True, False], ids=["grouped_mm", "fallback_loop"])
@pytest.mark.parametrize("used_experts", [16, 3], ids=["all_experts", "most_experts_empty"])
def test_experts_equal_naive_per_token_sum_forward_and_gradients(grouped_kernel, used_experts, monkeypatch):
    if not grouped_kernel:
        monkeypatch.setattr(moe_module, "_grouped_mm_ok", lambda x, w: False)
    torch.manual_seed(0)
    T, K, d, inter, E = 37, 3, 16, 8, 16
    ex = Experts(E, d, inter)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    # distinct experts per token, drawn from the first `used_experts` only: the others get no rows at all
    idx = torch.rand(T, used_experts).argsort(dim=-1)[:, :K]
    weights, x, grad_out = torch.rand(T, K), torch.randn(T, d), torch.randn(T, d)

    fast = _run(ex, lambda m, x, i, w: m(x, i, w), x, idx, weights, grad_out)
    slow = _run(ex, _naive, x, idx, weights, grad_out)
    for name, a, b in zip(("output", "d input", "d gate weights", "d w1", "d w2", "d w3"), fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert (fast[3][used_experts:] == 0).all()  # experts that got no tokens get zero gradient
