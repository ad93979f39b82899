"""A model family for scaling sweeps: one depth/width rule that turns a target compute per token into a config.

A scaling law is fitted over *one* family, so every size must have the same shape and only grow: here the
width d_model is `aspect x n_layer` (nanochat's one-dial rule, d = 64 x depth, at a CPU-sized ratio; DeepSeek
LLM Table 2's 7B and 67B have d/n_layer = 137 and 86), heads of fixed size `head_dim`, no MTP, no tied
embedding. The scale of a model is DeepSeek LLM's M (arXiv 2401.02954 §3.2, eq. 2): non-embedding training
FLOPs per token, attention over l_seq included, counted by `nanoseek.accounting.count_flops` (activated experts
only for MoE). Kinds:
- `dense` (the default): DeepSeek LLM's own architecture: MHA with d = H x head_dim and a SwiGLU FFN of width
  round(8d/3), so M = 72 n_layer d^2 + 12 n_layer d l_seq (eq. 2) holds exactly whenever 3 divides 8d.
- `mla`: DeepSeek-V3's attention (MLA, V3 §2.1.1) with the same dense FFN.
- `moe`: MLA + DeepSeekMoE (V3 §2.1.2): 16 routed experts, top-2, 1 shared, first layer dense, each expert of
  width round(8d/9), so the activated FFN matches the dense family's 8d^2 weights per layer.

Initialisation: DeepSeek-V3's std 0.006 (V3 §4.2) is 0.5/sqrt(d) at its d = 7168; the family keeps that
multiple, std = 0.5/sqrt(d), at every width. The absolute 0.006 starves tiny models: at d = 40..64 and ~250
steps it cost 0.2-0.3 bits per byte against 0.5/sqrt(d) (docs/scaling.md), which bent the IsoFLOP curves.

What a reader gets wrong: n_layer and d are integers (d a multiple of head_dim), so a target M is only met
approximately; everything downstream uses the config's exact M, never the target. At CPU scale the head and
embedding (vocab x d) are not in M and can cost more than the whole body; that is DeepSeek's convention, and
docs/scaling.md discusses what it changes (Pearce & Song, arXiv 2406.12907).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from nanoseek.accounting import build_meta, count_flops, count_params
from nanoseek.config import ModelConfig

KINDS = ("dense", "mla", "moe")


class FamilyError(ValueError):
    """A family or size request that cannot be met; the message names the field."""


@dataclass(frozen=True)
class Family:
    kind: str = "dense"
    aspect: float = 32.0  # d_model / n_layer that the rule aims for
    head_dim: int = 8  # every head is this wide; d_model is a multiple of it (8: fine size steps on CPU)
    seq_len: int = 128  # l_seq of M's attention term and of training
    vocab_size: int = 512  # replaced by the tokenizer's at training time
    max_layers: int = 64

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FamilyError(f"family: unknown kind {self.kind!r}; choose from {', '.join(KINDS)}")
        for name in ("aspect", "head_dim", "seq_len", "vocab_size", "max_layers"):
            if getattr(self, name) <= 0:
                raise FamilyError(f"family {name}: must be positive, got {getattr(self, name)}")
        if self.head_dim % 4:
            raise FamilyError(f"family head_dim: must be a multiple of 4 (RoPE pairs), got {self.head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- one shape -----------------------------------------------------------------------------------------
    def config(self, n_layer: int, d_model: int) -> ModelConfig:
        """The family member with `n_layer` blocks of width `d_model` (a multiple of head_dim)."""
        if n_layer < 1 or d_model < self.head_dim or d_model % self.head_dim:
            raise FamilyError(
                f"family: need n_layer >= 1 and d_model a positive multiple of head_dim={self.head_dim}, "
                f"got n_layer={n_layer}, d_model={d_model}"
            )
        hd = self.head_dim
        common = dict(
            name=f"{self.kind}-L{n_layer}-d{d_model}",
            vocab_size=self.vocab_size,
            hidden_size=d_model,
            num_hidden_layers=n_layer,
            num_attention_heads=d_model // hd,
            intermediate_size=round(8 * d_model / 3),
            max_position_embeddings=self.seq_len,
            num_nextn_predict_layers=0,
            tie_word_embeddings=False,
            v_head_dim=hd,
            first_k_dense_replace=0,
            initializer_range=round(0.5 / math.sqrt(d_model), 6),
        )
        if self.kind == "dense":
            # MHA with RoPE over the whole head: q/k heads of nope + rope = head_dim, so wq, wk, wv, wo are d x d.
            return ModelConfig(
                **common, attention="mha", ffn="dense", qk_nope_head_dim=hd // 2, qk_rope_head_dim=hd // 2
            ).validate()
        mla = dict(
            attention="mla",
            qk_nope_head_dim=hd,
            qk_rope_head_dim=hd // 2,
            kv_lora_rank=max(hd, d_model // 4),
            q_lora_rank=max(hd, d_model // 2),
        )
        if self.kind == "mla":
            return ModelConfig(**common, **mla, ffn="dense").validate()
        return ModelConfig(
            **{**common, "first_k_dense_replace": 1 if n_layer > 1 else 0},
            **mla,
            ffn="moe",
            n_routed_experts=16,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=max(1, round(8 * d_model / 9)),
            n_group=4,
            topk_group=2,
            topk_method="noaux_tc",
            routed_scaling_factor=1.0,
        ).validate()

    def m(self, n_layer: int, d_model: int) -> int:
        """DeepSeek LLM's M of that shape (exact, from the model's own matmuls)."""
        return _m(self, n_layer, d_model)

    # ---- the rule --------------------------------------------------------------------------------------------
    def for_m(self, target_m: float) -> ModelConfig:
        """The member on the depth/width rule whose M is nearest `target_m` (see the module docstring).

        Depth comes from the rule alone (so it never decreases as M grows); width is then the multiple of
        head_dim that brings M nearest the target at that depth."""
        if not (target_m > 0 and math.isfinite(target_m)):
            raise FamilyError(f"target M: must be a positive number of FLOPs per token, got {target_m}")
        # With d = aspect * L and M ~ 72 L d^2, the rule wants L ~ (M / (72 aspect^2))^(1/3).
        n_layer = max(1, min(self.max_layers, round((target_m / (72 * self.aspect**2)) ** (1 / 3))))
        return self.config(n_layer, self._width_for(n_layer, target_m))

    def _width_for(self, n_layer: int, target_m: float) -> int:
        """The multiple of head_dim whose M (at this depth) is nearest target_m in log distance.

        M is close to quadratic in d at a fixed depth (matmuls ~ d^2, attention scores ~ d l_seq), so two
        exact counts give a first guess; exact counts of its neighbours then settle it (each count builds the
        model on the meta device, so they are kept few)."""
        step = self.head_dim
        d1, d2 = 4 * step, 16 * step
        m1, m2 = self.m(n_layer, d1), self.m(n_layer, d2)
        p = (m2 / d2 - m1 / d1) / (d2 - d1)  # M = p d^2 + q d through (d1, m1) and (d2, m2)
        q = m1 / d1 - p * d1
        guess = (-q + math.sqrt(q * q + 4 * p * target_m)) / (2 * p) if p > 0 else target_m / max(q, 1e-9)
        k = max(1, round(guess / step))

        def error(k: int) -> float:
            return abs(math.log(self.m(n_layer, k * step) / target_m))

        while k > 1 and error(k - 1) < error(k):
            k -= 1
        while error(k + 1) < error(k):
            k += 1
        return k * step

    def sizes(self, m_low: float, m_high: float, n: int) -> list[ModelConfig]:
        """Up to n members with M log-spaced over [m_low, m_high]; shapes that round to the same one count once."""
        if n < 1:
            raise FamilyError(f"sizes: need at least one size, got {n}")
        if not (0 < m_low <= m_high):
            raise FamilyError(f"sizes: need 0 < M_low <= M_high, got {m_low:g}, {m_high:g}")
        targets = [m_low * (m_high / m_low) ** (i / max(n - 1, 1)) for i in range(n)]
        out: dict[tuple[int, int], ModelConfig] = {}
        for t in targets:
            cfg = self.for_m(t)
            out.setdefault((cfg.num_hidden_layers, cfg.hidden_size), cfg)
        return sorted(out.values(), key=lambda c: self.m(c.num_hidden_layers, c.hidden_size))


@functools.lru_cache(maxsize=4096)
def _m(family: Family, n_layer: int, d_model: int) -> int:
    return count_flops(family.config(n_layer, d_model), family.seq_len).m


def describe(cfg: ModelConfig, seq_len: int) -> dict:
    """The numbers a sweep records for one config: shape, M, non-embedding and total parameters."""
    model = build_meta(cfg)
    params = count_params(cfg, model)
    return {
        "n_layer": cfg.num_hidden_layers,
        "d_model": cfg.hidden_size,
        "m": count_flops(cfg, seq_len, model).m,
        "params_non_embedding": params.activated_non_embedding,
        "params_total": params.main,
    }
