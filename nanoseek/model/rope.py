"""Rotary position embedding with DeepSeek's interleaved pairs, and YaRN context extension.

REFERENCE §4, [M] `precompute_freqs_cis` / `apply_rotary_emb`, [HFR] `_compute_yarn_parameters`.

- Pairs are ADJACENT: (x[2i], x[2i+1]) rotated by angle pos * theta_i, theta_i = base^(-2i/d). Pairing (i, i+d/2)
  ("rotate_half") on released weights is wrong. Hugging Face's `rope_interleave=True` writes its result as
  [evens | odds], a fixed permutation of ours applied to both q and k, so attention scores are identical.
- YaRN [V3 §4.3]: frequencies between the correction dims `low`/`high` are blended between extrapolation (theta)
  and interpolation (theta / s): `theta'_i = theta_i/s * ramp_i + theta_i * (1 - ramp_i)`,
  `ramp_i = clamp((i - low) / (high - low), 0, 1)`, `cd(r) = d ln(L_orig / (2 pi r)) / (2 ln base)`,
  low = floor(cd(beta_fast)), high = ceil(cd(beta_slow)).
  The attention temperature mscale^2 lives in the softmax scale (`ModelConfig.softmax_scale`), not here;
  cos/sin are scaled only by HF's `attention_factor` = mscale(s, mscale)/mscale(s, mscale_all_dim), which is 1
  for every released DeepSeek config.

cos/sin are computed on the fly from integer positions (no max_len table: V3 allows 163,840 positions).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.config import yarn_mscale


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, orig_len: int
) -> tuple[int, int]:
    def cd(num_rotations: float) -> float:
        return dim * math.log(orig_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(cd(beta_fast)), 0)
    high = min(math.ceil(cd(beta_slow)), dim - 1)
    return low, high


def rope_inv_freq(dim: int, base: float, yarn: dict | None = None) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [dim/2] (fp32) and the cos/sin magnitude factor."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not yarn:
        return inv_freq, 1.0
    s = float(yarn["factor"])
    orig_len = int(yarn.get("original_max_position_embeddings", 4096))
    low, high = yarn_correction_range(
        float(yarn.get("beta_fast", 32)), float(yarn.get("beta_slow", 1)), dim, base, orig_len
    )
    if low == high:
        high += 0.001  # avoid 0/0, as HF does
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    factor = yarn.get("attention_factor")
    if factor is None:
        factor = (
            yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all) if (mscale and mscale_all) else yarn_mscale(s)
        )
    return inv_freq, float(factor)


class RotaryEmbedding(nn.Module):
    """Maps positions [B, T] to (cos, sin) [B, T, dim/2] in fp32."""

    def __init__(self, dim: int, base: float, yarn: dict | None = None):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(dim, base, yarn)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, dim/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, T, H, d] (or [B, T, d]) by cos/sin [B, T, d/2]; computed in fp32."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x32 = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x32[..., 0], x32[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
