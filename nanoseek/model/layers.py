"""The small shared pieces: RMSNorm and the SwiGLU feed-forward network.

RMSNorm (REFERENCE §2): `x / sqrt(mean(x^2) + eps) * weight`, computed in fp32 whatever the input dtype, then cast
back, as DeepSeek's and Hugging Face's code do. No bias anywhere.

SwiGLU (REFERENCE §2): `w2(silu(w1 x) * w3 x)`. Official names: w1 = gate_proj, w3 = up_proj, w2 = down_proj.
Every FFN in DeepSeek-V3 is one: the dense FFN of the first layers, each routed expert, the shared experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
