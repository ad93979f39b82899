"""Standard multi-head (MHA) and grouped-query (GQA) attention: the ablation baselines MLA is measured against.

DeepSeek-V2 Table 1 compares MLA with MHA, GQA and MQA by KV cache per token: MHA `2 n_h d_h`, GQA `2 n_g d_h`
elements per layer. Here the head sizes match MLA's for a fair twin: query/key heads of
`qk_nope_head_dim + qk_rope_head_dim` with RoPE (interleaved pairs) over the whole head, value heads of `v_head_dim`.
The cache holds full K and V: `n_kv_heads * (qk_head_dim + v_head_dim)` numbers per token per layer.
MHA is GQA with n_kv_heads = n_heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import causal_attention
from nanoseek.model.rope import apply_rope


class KVCache:
    """Per-layer K/V cache: k [B, T_max, H_kv, qk_head_dim], v [B, T_max, H_kv, v_head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        self.k = torch.zeros(batch, max_len, cfg.kv_heads, cfg.qk_head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, max_len, cfg.kv_heads, cfg.v_head_dim, device=device, dtype=dtype)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        self.k[rows, positions] = k.to(self.k.dtype)
        self.v[rows, positions] = v.to(self.v.dtype)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class GQA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.kv_heads
        self.qk_dim, self.v_dim = cfg.qk_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        d = cfg.hidden_size
        self.wq = nn.Linear(d, self.n_heads * self.qk_dim, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * self.qk_dim, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * self.v_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_dim, d, bias=False)

    def forward(self, x, cos, sin, positions=None, cache: KVCache | None = None, absorb=None) -> torch.Tensor:
        B, S, _ = x.shape
        q = apply_rope(self.wq(x).view(B, S, self.n_heads, self.qk_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, S, self.n_kv_heads, self.qk_dim), cos, sin)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.v_dim)
        rep = self.n_heads // self.n_kv_heads
        if cache is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            o = causal_attention(q, k, v, self.scale)
        else:
            cache.write(positions, k, v)
            kv_len = int(positions.max()) + 1
            k = cache.k[:B, :kv_len].to(q.dtype).transpose(1, 2)  # [B, H_kv, T, qk]
            v = cache.v[:B, :kv_len].to(q.dtype).transpose(1, 2)
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            visible = torch.arange(kv_len, device=x.device).view(1, 1, 1, -1) <= positions.view(B, 1, S, 1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=visible, scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))
