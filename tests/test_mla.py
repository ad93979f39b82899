import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model import Transformer
from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.rope import RotaryEmbedding

YARN = {
    "type": "yarn",
    "factor": 4,
    "original_max_position_embeddings": 32,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def _mla(cfg):
    torch.manual_seed(0)
    m = MLA(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    return m, RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn)


@pytest.mark.parametrize("q_lora_rank", [64, 0])
def test_mla_shapes_and_gradients(tiny_cfg, q_lora_rank):
    cfg = tiny_cfg.replace(q_lora_rank=q_lora_rank)
    m, rope = _mla(cfg)
    x = torch.randn(2, 10, cfg.hidden_size, requires_grad=True)
    cos, sin = rope(torch.arange(10).expand(2, 10))
    y = m(x, cos, sin)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("q_lora_rank,rope_scaling", [(64, None), (0, YARN)])
def test_absorbed_decode_equals_training_path_token_by_token(tiny_cfg, q_lora_rank, rope_scaling):
    cfg = tiny_cfg.replace(q_lora_rank=q_lora_rank, rope_scaling=rope_scaling)
    m, rope = _mla(cfg)
    B, T = 2, 24
    x = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        full = m(x, *rope(pos))
        cache = LatentCache(cfg, B, T)
        steps = [m(x[:, t : t + 1], *rope(pos[:, t : t + 1]), pos[:, t : t + 1], cache) for t in range(T)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_absorbed_prefill_chunk_then_decode_matches(tiny_cfg):
    m, rope = _mla(tiny_cfg)
    x = torch.randn(1, 12, tiny_cfg.hidden_size)
    pos = torch.arange(12).view(1, 12)
    with torch.no_grad():
        full = m(x, *rope(pos))
        cache = LatentCache(tiny_cfg, 1, 16)
        a = m(x[:, :8], *rope(pos[:, :8]), pos[:, :8], cache)  # causal mask inside the chunk
        b = m(x[:, 8:], *rope(pos[:, 8:]), pos[:, 8:], cache)
    assert (torch.cat([a, b], 1) - full).abs().max() <= 1e-5


def test_cache_holds_only_latent_and_rope_key():
    cfg = get_preset("deepseek-v3")
    cache = LatentCache(cfg, batch=1, max_len=1, device="meta", dtype=torch.bfloat16)
    assert cache.c_kv.shape[-1] + cache.k_rope.shape[-1] == 576  # REFERENCE §3
    assert cache.nbytes * cfg.num_hidden_layers == 70272  # bytes/token in BF16


def test_ragged_rows_decode_independently(tiny_cfg):
    """Two sequences at different positions in one decode batch give the same logits as each alone."""
    model = Transformer(tiny_cfg.replace(initializer_range=0.05)).eval()
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits[:, -1], model(b).logits[:, -1]
        cache = model.make_cache(2, 16)
        model(a[:, :8], positions=torch.arange(8).view(1, 8), cache=[_row(c, 0) for c in cache])
        model(b[:, :4], positions=torch.arange(4).view(1, 4), cache=[_row(c, 1) for c in cache])
        step = torch.cat([a[:, 8:], b[:, 4:]])
        out = model(step, positions=torch.tensor([[8], [4]]), cache=cache).logits[:, -1]
    assert (out[0] - ref_a[0]).abs().max() <= 1e-5
    assert (out[1] - ref_b[0]).abs().max() <= 1e-5


def _row(cache, b):
    """A view of one row of a batched cache (writes go through to the batch)."""
    view = LatentCache.__new__(LatentCache)
    view.kv, view.rank = cache.kv[b : b + 1], cache.rank
    return view
