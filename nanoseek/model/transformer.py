"""The DeepSeek-V3 decoder: embedding, pre-norm blocks (MLA + dense FFN or DeepSeekMoE), final norm, head, MTP.

REFERENCE §2: `x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))`, then `norm` and an untied `head`.
The first `first_k_dense_replace` layers use a dense SwiGLU FFN, the rest DeepSeekMoE.

`Transformer.forward(input_ids, targets)` returns a `ModelOutput`: main logits, the loss
`L = L_main + lambda/D sum_k L_MTP^k + balance losses` with its parts, and the MTP logits. Without targets it
skips MTP (inference). With a cache it runs the decode path (MLA: absorbed, over the latent cache).
Init [V3 §4.2]: every weight ~ N(0, 0.006); norms 1; routing bias 0. Deterministic given a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import GQA, KVCache
from nanoseek.model.head_loss import linear_cross_entropy
from nanoseek.model.layers import MLP, RMSNorm
from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.moe import Experts, MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg) if cfg.attention == "mla" else GQA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x, cos, sin, positions=None, cache=None, absorb=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin, positions, cache, absorb)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            out, aux = self.ffn(h)
        else:
            out, aux = self.ffn(h), x.new_zeros((), dtype=torch.float32)
        return x + out, aux


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None from the fused-loss path (forward(..., logits=False))
    loss: torch.Tensor | None = None  # total training loss
    lm_loss: torch.Tensor | None = None  # main next-token loss
    mtp_loss: torch.Tensor | None = None  # lambda/D sum_k L^k
    balance_loss: torch.Tensor | None = None  # sum of MoE balance terms
    hidden: torch.Tensor | None = None  # final normed hidden state [B, T, d] (h^0 for MTP)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = 0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPModule(cfg, Block(cfg, L + k)) for k in range(cfg.num_nextn_predict_layers)
        )
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.qk_head_dim
        self.rope = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.yarn)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        if self.embed.weight.is_meta:
            return
        gen = torch.Generator(device=self.embed.weight.device)
        gen.manual_seed(0 if seed is None else seed)
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
        for m in self.modules():
            if isinstance(m, MoE):
                m.gate.e_score_bias.zero_()

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: list | None = None,
        absorb: bool | None = None,
        logits: bool = True,
    ) -> ModelOutput:
        """Logits (and with `targets`, the losses) for input_ids [B, T].

        logits=False (with targets) computes the head and cross-entropy fused and chunked (head_loss.py): the
        trainer's path, faster on CPU and without the [B, T, V] logits; out.logits / out.mtp_logits stay empty.
        Under autocast (bf16 on GPU) the plain head is used either way."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions)
        x = self.embed(input_ids)
        balance = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, positions, None if cache is None else cache[i], absorb)
            balance = balance + aux
        h = self.norm(x)
        fused = targets is not None and not logits and self._fused_head_ok(h)
        out = ModelOutput(logits=None if fused else self.head(h), hidden=h)
        if targets is None:
            return out

        lm_loss = self._loss(h, out.logits, targets)
        mtp_loss = h.new_zeros((), dtype=torch.float32)
        h_prev, D = h, len(self.mtp)
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            emb_next = self.embed(input_ids[:, k:])  # Emb(t_{i+k}) for i = 0..T-1-k
            h_prev, aux = module(h_prev[:, : T - k], emb_next, cos[:, : T - k], sin[:, : T - k])
            balance = balance + aux
            h_k = module.norm(h_prev)
            mtp_logits = None if fused else self.head(h_k)
            if mtp_logits is not None:
                out.mtp_logits.append(mtp_logits)
            mtp_loss = mtp_loss + self._loss(h_k, mtp_logits, targets[:, k:])
        if D:
            mtp_loss = mtp_loss * (self.cfg.mtp_lambda / D)
        out.lm_loss, out.mtp_loss, out.balance_loss = lm_loss, mtp_loss, balance
        out.loss = lm_loss + mtp_loss + balance
        return out

    def _fused_head_ok(self, h: torch.Tensor) -> bool:
        return (
            type(self.head) is nn.Linear
            and self.head.bias is None
            and not torch.is_autocast_enabled(h.device.type)
        )

    def _loss(self, h: torch.Tensor, logits: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        if logits is None:
            return linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten())
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # ---- helpers -------------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_balance_bias(self, gamma: float | None = None) -> list[float]:
        """Aux-loss-free bias step for every MoE layer (call once per optimizer step); returns per-layer MaxVio."""
        if gamma is None:
            gamma = self.cfg.bias_update_speed if self.cfg.balancing == "aux_free" else 0.0
        return [m.update_bias(gamma) for m in self.moe_layers()]

    def make_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, full_kv: bool = False, layers=None
    ) -> list:
        """Preallocated per-layer cache: MLA latent (c_kv + k_rope) or full K/V for the mha/gqa baselines.

        full_kv=True gives MLA the naive full per-head K/V cache instead (the baseline of the latent cache);
        `layers` defaults to one cache per main layer (pass e.g. 1 for an MTP block's cache)."""
        dev = self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        kind = LatentCache if self.cfg.attention == "mla" and not full_kv else KVCache
        n = len(self.layers) if layers is None else layers
        return [kind(self.cfg, batch, max_len, dev, dtype) for _ in range(n)]

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n


__all__ = ["Block", "Experts", "ModelOutput", "Transformer"]
