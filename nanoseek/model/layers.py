"""The small shared pieces: RMSNorm, the SwiGLU feed-forward network, causal attention over a full sequence.

RMSNorm (REFERENCE §2): `x / sqrt(mean(x^2) + eps) * weight`, computed in fp32 whatever the input dtype, then cast
back, as DeepSeek's and Hugging Face's code do. No bias anywhere.

SwiGLU (REFERENCE §2): `w2(silu(w1 x) * w3 x)`. Official names: w1 = gate_proj, w3 = up_proj, w2 = down_proj.
Every FFN in DeepSeek-V3 is one: the dense FFN of the first layers, each routed expert, the shared experts.

Causal attention (training and prefill, `causal_attention`): softmax(q k^T * scale + causal mask) v. Usually SDPA's
fused kernel; on a CPU inside `hardware.fast_matmul()` (fp32 GEMMs on oneDNN), two batched GEMMs and a softmax,
which run on the faster kernels where the fused kernel's own block GEMMs stay on MKL: a `small` training step
769 vs 843 ms, `tiny` 245 vs 266 (without the switch the fused kernel is 3% faster). They hold the scores
[B, H, T, T] and the probabilities for backward, so only while those stay under `MATH_ATTENTION_MAX_SCORES`.
The scale and the mask go into the score GEMM (`baddbmm`): full training steps 1.04-1.07x against a separate
scale and `masked_fill_` (in-process, fresh batches, `small` and `tiny`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.hardware import fast_matmul_active

MATH_ATTENTION_MAX_SCORES = 1 << 23  # 32 MB of fp32 scores per layer (the `small` preset's step: 4M)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B, H, T, d_qk], v [B, H, T, d_v] -> [B, H, T, d_v], each query attending to keys 0..its position."""
    B, H, T, _ = q.shape
    if q.device.type == "cpu" and B * H * T * T <= MATH_ATTENTION_MAX_SCORES and fast_matmul_active():
        # The scale and the causal mask ride in the score GEMM (beta * mask + alpha * q k^T), so neither costs a
        # pass over the scores, forward or backward (fwd+bwd of a `small` layer's attention ~20% faster).
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        scores = torch.baddbmm(
            mask, q.reshape(B * H, T, -1), k.reshape(B * H, T, -1).transpose(1, 2), alpha=scale
        )
        return torch.matmul(scores.softmax(dim=-1).view(B, H, T, T), v)
    pad = q.shape[-1] - v.shape[-1]
    if pad > 0:
        # SDPA's fused (flash) kernels need one head width for q, k and v; otherwise it falls back to the
        # unfused math path. Zero columns in V give zero output columns, cut off below (the same result;
        # a `small` training step's attention runs 1.2-1.5x faster on CPU).
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=scale)[
            ..., : v.shape[-1]
        ]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
