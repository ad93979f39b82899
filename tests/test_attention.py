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
