"""Multi-head Latent Attention (MLA), DeepSeek-V2 §2.1 / DeepSeek-V3 eqs 1-11, REFERENCE §3.

Keys and values are compressed jointly into one small latent per token; RoPE is carried by a separate, shared key.

    c_Q            = q_norm(wq_a h)                          (q_lora_rank; or plain wq when q_lora_rank = 0)
    [q_C ; q_R]    = wq_b c_Q                                 per head [qk_nope_head_dim | qk_rope_head_dim]
    [c_KV ; k_R]   = wkv_a h                                  [kv_lora_rank | qk_rope_head_dim]
    c_KV           = kv_norm(c_KV)                            the norm is on the latent ONLY, never on k_R
    k_R            = RoPE(k_R)                                ONE rope key, shared by all heads
    [k_C ; v]      = wkv_b c_KV                               per head [qk_nope_head_dim | v_head_dim] rows
    o_i            = softmax(q_i . [k_C,i ; k_R] * scale) v_i, u = wo(concat_i o_i)

Two paths share the same weights and compute the same function:
- training / prefill (`cache=None` or `absorb=False`): expand k_C and v for every head, run SDPA.
- absorbed decode ([V2] App. C, [M] attn_impl="absorb"): the cache holds only the normed c_KV and the roped k_R,
  `kv_lora_rank + qk_rope_head_dim` numbers per token (576 for V3, vs 40,960 for an MHA twin). W_UK is folded into
  the query (q_lat = q_C W_UK, 512 wide) and W_UV is applied after attention, so K/V are never materialized.
  RoPE is why W_UK cannot be folded into the query weights offline ([V2] §2.1.3): it sits between them.
- naive decode over a full K/V cache ([M] attn_impl="naive"; pass a `KVCache`): k = [k_C ; k_R] and v expanded
  for every head and cached, n_heads * (qk_head_dim + v_head_dim) numbers per token. Kept as the baseline that
  the latent cache is measured against (benchmarks/bench_infer_cache.py).

Easy to get wrong: the softmax scale multiplies the whole (nope + rope) dot product and carries YaRN's mscale^2;
`wkv_b.weight.view(n_heads, nope + v, kv_lora_rank)` puts the K rows before the V rows within each head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import KVCache
from nanoseek.model.layers import RMSNorm, causal_attention
from nanoseek.model.rope import apply_rope


class LatentCache:
    """Per-layer MLA cache: normed latent c_kv [B, T_max, kv_lora_rank] and roped key k_rope [B, T_max, d_R].

    Slot t of row b holds position t of sequence b; positions of a row are written contiguously from 0.
    Both live side by side in one tensor `kv` [B, T_max, kv_lora_rank + d_R]: the lean decode step
    (nanoseek/infer/lean.py) scores a query against [c_kv ; k_rope] in one batched matmul, as FlashMLA does.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        self.kv = torch.zeros(
            batch, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device, dtype=dtype
        )
        self.rank = cfg.kv_lora_rank

    @property
    def c_kv(self) -> torch.Tensor:
        return self.kv[..., : self.rank]

    @property
    def k_rope(self) -> torch.Tensor:
        return self.kv[..., self.rank :]

    def write(self, positions: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        self.kv[rows, positions] = torch.cat([c_kv, k_rope], dim=-1).to(self.kv.dtype)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank or 0
        self.scale = cfg.softmax_scale
        d, H = cfg.hidden_size, self.n_heads
        if self.q_lora_rank:
            self.wq_a = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        else:
            self.wq = nn.Linear(d, H * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, d, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, d] -> q_nope [B,T,H,nope], q_rope [B,T,H,R] (roped), c_kv [B,T,r] (normed), k_rope [B,T,R]."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)
        k_rope = apply_rope(k_rope, cos, sin)
        return q_nope, q_rope, c_kv, k_rope

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LatentCache | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin)
        if isinstance(cache, KVCache):
            return self._naive_cached(q_nope, q_rope, c_kv, k_rope, cache, positions)
        if cache is not None:
            cache.write(positions, c_kv, k_rope)
        if absorb is None:
            absorb = cache is not None
        if absorb:
            return self._absorbed(q_nope, q_rope, cache, positions)
        return self._naive(q_nope, q_rope, c_kv, k_rope)

    def _naive(self, q_nope, q_rope, c_kv, k_rope) -> torch.Tensor:
        """Training / prefill path: causal attention over the T tokens given (positions 0..T-1 of each row)."""
        B, T, H, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, T, qk]
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1).transpose(1, 2)
        o = causal_attention(q, k, v.transpose(1, 2), self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _naive_cached(self, q_nope, q_rope, c_kv, k_rope, cache: KVCache, positions) -> torch.Tensor:
        """Decode over a cache of the expanded per-head K and V ([M] attn_impl="naive")."""
        B, S, H, _ = q_nope.shape
        kv = self.wkv_b(c_kv).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        cache.write(positions, torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, H, self.rope_dim)], -1), v)
        kv_len = int(positions.max()) + 1
        k = cache.k[:B, :kv_len].to(q_nope.dtype).transpose(1, 2)  # [B, H, T, qk]
        v = cache.v[:B, :kv_len].to(q_nope.dtype).transpose(1, 2)  # [B, H, T, v]
        key_pos = torch.arange(kv_len, device=positions.device)
        visible = key_pos.view(1, 1, 1, -1) <= positions.view(B, 1, S, 1)  # causal + unwritten slots
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # [B, H, S, qk]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def _absorbed(self, q_nope, q_rope, cache: LatentCache, positions: torch.Tensor) -> torch.Tensor:
        """Decode path over the latent cache; W_UK folded into the query, W_UV applied after attention."""
        B, S, H, _ = q_nope.shape
        kv_len = int(positions.max()) + 1
        c_kv = cache.c_kv[:B, :kv_len].to(q_nope.dtype)  # [B, T, r]
        k_rope = cache.k_rope[:B, :kv_len].to(q_nope.dtype)  # [B, T, R]
        w = self.wkv_b.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bshd,hdr->bshr", q_nope, w_uk)  # [B, S, H, r]
        scores = torch.einsum("bshr,btr->bsht", q_lat, c_kv) + torch.einsum("bshd,btd->bsht", q_rope, k_rope)
        key_pos = torch.arange(kv_len, device=positions.device)
        visible = key_pos.view(1, 1, 1, -1) <= positions.view(B, S, 1, 1)  # causal + unwritten slots
        scores = (scores.float() * self.scale).masked_fill(~visible, float("-inf"))
        p = scores.softmax(dim=-1).to(q_nope.dtype)
        o_lat = torch.einsum("bsht,btr->bshr", p, c_kv)  # [B, S, H, r]
        o = torch.einsum("bshr,hvr->bshv", o_lat, w_uv)  # [B, S, H, v]
        return self.wo(o.reshape(B, S, H * self.v_dim))
