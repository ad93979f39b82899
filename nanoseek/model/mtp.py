"""Multi-token prediction (MTP). DeepSeek-V3 §2.2 eqs 21-25, REFERENCE §6.

D sequential modules; module k (1..D) predicts token i+k+1 at position i:
    h'^k_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      embedding FIRST: the order of released checkpoints
    h^k    = TRM_k(h'^k)                                             (the paper writes [h ; emb]; HF and vLLM do this)
    P^k    = OutHead(norm_k(h^k))                                    shared embedding and output head
    L_MTP  = lambda / D * sum_k CE(P^k_i, t_{i+k+1})
h^0 is the main model's hidden state after its final norm, as the released weights were trained (REFERENCE §6).
The causal chain is kept: depth k consumes depth k-1's output, so only positions 0..T-1-k exist at depth k.

Indexing with inputs t_0..t_{T-1} and targets y_i = t_{i+1}: depth k uses h^{k-1}[:, :T-k], the embeddings of
t_k..t_{T-1} (inputs[:, k:]) and the targets y[:, k:]. Getting this shift wrong still trains, just on the wrong
task — `tests/test_mtp.py` pins it down.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)  # M_k
        self.block = block  # TRM_k: a full decoder layer (MoE FFN in V3)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(
        self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, positions=None, cache=None, absorb=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev, emb_next [B, T', d] -> (h^k [B, T', d] before norm_k, balance loss).

        positions/cache/absorb go to the block's attention as in the main model: speculative decoding keeps a
        cache for the MTP block too (nanoseek/infer/speculative.py)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin, positions, cache, absorb)
