import pytest
import torch

from nanoseek.model import Transformer
from nanoseek.model.attention import GQA, KVCache
from nanoseek.model.rope import RotaryEmbedding


@pytest.mark.parametrize("kind,n_kv", [("mha", None), ("gqa", 2), ("gqa", 1)])
def test_gqa_decode_equals_full_and_gradients_flow(tiny_cfg, kind, n_kv):
    cfg = tiny_cfg.replace(attention=kind, n_kv_heads=n_kv)
    m = GQA(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    rope = RotaryEmbedding(cfg.qk_head_dim, cfg.rope_theta)
    B, T = 2, 16
    x = torch.randn(B, T, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(T).expand(B, T)
    full = m(x, *rope(pos))
    full.square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in m.parameters())
    with torch.no_grad():
        cache = KVCache(cfg, B, T)
        steps = [m(x[:, t : t + 1], *rope(pos[:, t : t + 1]), pos[:, t : t + 1], cache) for t in range(T)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    assert cache.k.shape[2] == cfg.kv_heads


def test_mha_model_trains_and_decodes(tiny_cfg):
    model = Transformer(tiny_cfg.replace(attention="mha", ffn="dense", initializer_range=0.05))
    x = torch.randint(0, 256, (2, 12))
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    model.eval()
    with torch.no_grad():
        full = model(x).logits
        cache = model.make_cache(2, 12)
        steps = [
            model(x[:, t : t + 1], positions=torch.full((2, 1), t), cache=cache).logits for t in range(12)
        ]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


# ---- causal_attention: SDPA's fused kernel, or two GEMMs + softmax inside hardware.fast_matmul() ------------
def _qkv(v_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, 20, 24, generator=g), torch.randn(2, 3, 20, 24, generator=g)
    return q.requires_grad_(), k.requires_grad_(), torch.randn(2, 3, 20, v_dim, generator=g).requires_grad_()


def _attend(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("v_dim", [24, 16])  # MLA's v is narrower than its q/k
def test_causal_attention_paths_agree_with_sdpa(v_dim, monkeypatch):
    import torch.nn.functional as F

    from nanoseek import hardware
    from nanoseek.model import layers

    if not hardware.onednn_matmul_is_exact():
        pytest.skip("no exact oneDNN fp32 matmul switch here")
    q, k, v = _qkv(v_dim)
    want, want_grads = _attend(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), q, k, v
    )
    sdpa = F.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    for limit, fused in (
        (1 << 23, False),
        (2 * 3 * 20 * 20 - 1, True),
    ):  # the scores fit / do not fit the limit
        monkeypatch.setattr(layers, "MATH_ATTENTION_MAX_SCORES", limit)
        calls.clear()
        with hardware.fast_matmul(True):
            got, grads = _attend(lambda q, k, v: layers.causal_attention(q, k, v, 0.3), q, k, v)
        assert bool(calls) == fused
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    calls.clear()
    got, _ = _attend(lambda q, k, v: layers.causal_attention(q, k, v, 0.3), q, k, v)  # outside the switch
    assert calls and torch.allclose(got, want, atol=1e-5)
