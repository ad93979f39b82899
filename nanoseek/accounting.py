"""Accounting: parameters, activated parameters, FLOPs per token, KV cache and the cost of a training run.

Everything is derived from the model itself, built on torch's meta device (shapes, no memory), so an
ablation config is counted by the same code as the 671B preset. Published figures it reproduces:
DeepSeek-V3 671B total / 37B activated [V3 abstract, §4.2], KV cache of 576 elements per layer per token
(REFERENCE §3), 2.788M H800 GPU-hours = $5.576M [V3 §1, Table 1].

Conventions (the numbers below change with them, so the output always names them):
- A *parameter count* is what a nanoseek checkpoint stores: parameters plus persistent buffers. The only such
  buffer is the routing bias b of aux-loss-free balancing (256 per V3 MoE layer): the released V3 checkpoint
  stores it too (`e_score_correction_bias`), and the main model then counts exactly 671,026,419,200.
  (V2's checkpoints have no such bias; our V2 preset carries 9,440 extra, 0.000004%.)
- *Activated per token*: embedding, head, norms, attention, dense FFNs, and in each MoE layer the router, the
  shared experts and K of the N_r routed experts (V3: 8 of 256). Printed three ways, because the papers'
  rounded headlines sit closest to the count without the input embedding (a lookup, no FLOPs): V3 36.63B
  ("37B"), V2 20.85B ("21B"), V2-Lite 2.45B ("2.4B"); with embedding and head they are 37.55B, 21.38B, 2.66B.
- *FLOPs*: one multiply-add = 2 FLOPs; only matmuls count (norms, softmax, SiLU, RoPE are ignored); training =
  3 x forward (the backward pass computes gradients for inputs and weights). The attention term counts every
  query against all l_seq keys, `2 * H * (qk_head_dim + v_head_dim) * l_seq` per layer forward, without the
  causal halving: this is DeepSeek LLM's convention (arXiv 2401.02954 eq. 2), under which a dense MHA model
  costs `M = 72 n_layer d^2 + 12 n_layer d l_seq` per token. That formula assumes a 2-matrix FFN of width 4d
  (8 d^2 weights); our FFNs are 3-matrix SwiGLU, so the equivalent is intermediate_size = 8d/3 (3 * d * 8d/3
  = 8 d^2). MLA is counted as trained (the "naive" path): its low-rank projections wq_a, wq_b, wkv_a, wkv_b
  and wo each run once per token.
- *6 N_act*: 6 x activated parameters (incl. embedding and head), the usual shorthand and the one behind
  REFERENCE §15's "~328 TFLOP/s, ~33% of BF16 peak" for V3. It ignores attention over the sequence.
- *Cost*: GPU-hours = tokens x FLOPs/token / (peak x MFU). Peaks are dense (no 2:4 sparsity) tensor-core
  figures as NVIDIA quotes them. Without --mfu the MFU is the one DeepSeek-V3's published figure implies
  under the same FLOP convention, so the defaults reproduce 2.788M H800 GPU-hours for V3 by construction;
  the interesting outputs are that implied MFU and what other models/GPUs/prices cost at it. Energy is
  GPU board power x GPU-hours: an upper bound for the GPUs, excluding hosts, network and cooling (PUE).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.config import ModelConfig, get_preset
from nanoseek.model import Transformer
from nanoseek.model.moe import MoE

# ---- published figures (copied, with sources; the code never reads REFERENCE.md) ---------------------------
# DeepSeek-V3 [V3 §1, Table 1]: 2,664K pre-training + 119K context extension + 5K post-training H800 GPU-h.
V3_GPU_HOURS = 2_788_000
V3_PRETRAIN_GPU_HOURS = 2_664_000
V3_GPU_HOURS_PER_TRILLION = 180_000  # [V3 §1] "180K H800 GPU hours per trillion tokens"
V3_PRICE_PER_GPU_HOUR = 2.0  # [V3 §1] "$2 per GPU hour" -> $5.576M
V3_TRAIN_SEQ_LEN = 4096  # [V3 §4.2] pre-training sequence length

# Pre-training tokens of the published models: the default --tokens for their presets.
PUBLISHED_TOKENS = {
    "deepseek-v3": (14.8e12, "DeepSeek-V3 pre-training [V3 §4.2]"),
    "deepseek-v2": (8.1e12, "DeepSeek-V2 pre-training [V2 abstract]"),
    "deepseek-v2-lite": (5.7e12, "DeepSeek-V2-Lite pre-training [V2 App. B]"),
}
TOKENS_PER_PARAM = 20  # otherwise: Chinchilla's rule of thumb (Hoffmann et al. 2022), on the total count


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float | None  # None: no FP8 tensor cores
    watts: float  # board power (TDP)

    def peak_tflops(self, precision: str) -> float:
        peak = self.bf16_tflops if precision == "bf16" else self.fp8_tflops
        if peak is None:
            raise ValueError(f"gpu: {self.name} has no FP8 tensor cores; use --precision bf16")
        return peak


# NVIDIA datasheet figures for the SXM parts, dense. H800 = H100 compute with cut NVLink (REFERENCE §15);
# H200 = H100 compute with more, faster memory.
GPUS = {
    "h800": GPU("H800", 989.0, 1979.0, 700.0),
    "h100": GPU("H100", 989.0, 1979.0, 700.0),
    "h200": GPU("H200", 989.0, 1979.0, 700.0),
    "a100": GPU("A100", 312.0, None, 400.0),
}
FLOP_CONVENTIONS = ("6n", "m", "full")
KV_BYTES = 2  # BF16 cache elements


def build_meta(cfg: ModelConfig) -> Transformer:
    """The model with every tensor on the meta device: exact shapes, no memory, milliseconds even for 671B."""
    with torch.device("meta"):
        return Transformer(cfg)


def _numel(module: nn.Module | None) -> int:
    """Elements a checkpoint of this module stores (parameters + persistent buffers)."""
    return 0 if module is None else sum(t.numel() for t in module.state_dict().values())


def _linear_weights(module: nn.Module) -> int:
    """Weights of the nn.Linear layers inside `module`: each does one multiply-add per weight per token."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


# ---- parameters --------------------------------------------------------------------------------------------
@dataclass
class ParamCounts:
    """Stored elements by component; `main` is the model without MTP. All sums are over the main layers."""

    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int  # incl. MLA's q_norm / kv_norm
    dense_ffn: int
    routed_experts: int
    shared_experts: int
    router: int  # gate weights + routing bias
    norms: int  # attn_norm + ffn_norm of every layer + the final norm
    routed_activated: int  # K/N_r of routed_experts: what one token reaches
    mtp: int  # unique MTP parameters (eh_proj, norms, the block); embedding and head are shared
    mtp_activated: int  # of those, what one token reaches
    n_mtp: int  # MTP depth D

    @property
    def main(self) -> int:
        return (
            self.embedding
            + self.head
            + self.attention
            + self.dense_ffn
            + self.routed_experts
            + self.shared_experts
            + self.router
            + self.norms
        )

    @property
    def with_mtp(self) -> int:
        return self.main + self.mtp

    @property
    def mtp_stored(self) -> int:
        """MTP as in the Hugging Face checkpoint: each module stores its own embedding and head [RW]."""
        return self.mtp + self.n_mtp * (self.embedding + self.head) if self.n_mtp else 0

    @property
    def activated(self) -> int:
        """Per token, incl. embedding and head (the "37B" of V3)."""
        return self.main - self.routed_experts + self.routed_activated

    @property
    def activated_no_embedding(self) -> int:
        return self.activated - self.embedding

    @property
    def activated_non_embedding(self) -> int:
        return self.activated - self.embedding - self.head


def count_params(cfg: ModelConfig, model: Transformer | None = None) -> ParamCounts:
    model = model or build_meta(cfg)
    c = dict(attention=0, dense_ffn=0, routed_experts=0, shared_experts=0, router=0, routed_activated=0)
    norms = _numel(model.norm)
    for layer in model.layers:
        c["attention"] += _numel(layer.attn)
        norms += _numel(layer.attn_norm) + _numel(layer.ffn_norm)
        if isinstance(layer.ffn, MoE):
            experts = _numel(layer.ffn.experts)
            c["routed_experts"] += experts
            c["routed_activated"] += experts // cfg.n_routed_experts * cfg.num_experts_per_tok
            c["shared_experts"] += _numel(layer.ffn.shared_experts)
            c["router"] += _numel(layer.ffn.gate)
        else:
            c["dense_ffn"] += _numel(layer.ffn)
    mtp = mtp_activated = 0
    for module in model.mtp:
        n = _numel(module)
        mtp += n
        ffn = module.block.ffn
        if isinstance(ffn, MoE):
            experts = _numel(ffn.experts)
            n -= experts - experts // cfg.n_routed_experts * cfg.num_experts_per_tok
        mtp_activated += n
    tied = model.head.weight is model.embed.weight
    return ParamCounts(
        embedding=_numel(model.embed),
        head=0 if tied else _numel(model.head),
        norms=norms,
        mtp=mtp,
        mtp_activated=mtp_activated,
        n_mtp=len(model.mtp),
        **c,
    )


# ---- FLOPs -------------------------------------------------------------------------------------------------
def _block_forward_flops(block: nn.Module, cfg: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward matmul FLOPs of one decoder block for one token (see the module docstring for the rules)."""
    H = cfg.num_attention_heads
    ffn = block.ffn
    if isinstance(ffn, MoE):
        per_expert = _numel(ffn.experts) // cfg.n_routed_experts  # w1, w2, w3 of one expert
        ffn_flops = 2 * cfg.num_experts_per_tok * per_expert
        ffn_flops += 2 * _linear_weights(ffn.shared_experts) if ffn.shared_experts is not None else 0
        router = 2 * ffn.gate.weight.numel()
    else:
        ffn_flops, router = 2 * _linear_weights(ffn), 0
    return {
        "attention_projections": 2 * _linear_weights(block.attn),
        # q.k over qk_head_dim and p.v over v_head_dim, for each of the H heads and all l_seq keys
        "attention_scores": 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len,
        "ffn": ffn_flops,
        "router": router,
    }


@dataclass
class Flops:
    """Per-token FLOPs. Forward parts by component; training = 3 x forward."""

    seq_len: int
    attention_projections: int  # forward, all main layers
    attention_scores: int  # forward, all main layers
    ffn: int  # forward, activated experts / dense FFNs
    router: int  # forward
    head: int  # forward, the vocabulary projection
    mtp: int  # forward, all MTP modules incl. their use of the shared head
    six_n_act: int  # 6 x activated params (incl. embedding + head)
    six_n_non_embedding: int  # 6 x activated params excl. embedding + head (DeepSeek LLM's 6N1)

    @property
    def m(self) -> int:
        """DeepSeek LLM's M: non-embedding training FLOPs per token, attention over l_seq included."""
        return 3 * (self.attention_projections + self.attention_scores + self.ffn + self.router)

    @property
    def full(self) -> int:
        """Every matmul of a training step: M + the head + MTP."""
        return self.m + 3 * (self.head + self.mtp)

    def training(self, convention: str) -> int:
        return {"6n": self.six_n_act, "m": self.m, "full": self.full}[convention]


def count_flops(cfg: ModelConfig, seq_len: int, model: Transformer | None = None) -> Flops:
    model = model or build_meta(cfg)
    params = count_params(cfg, model)
    parts = dict.fromkeys(("attention_projections", "attention_scores", "ffn", "router"), 0)
    for layer in model.layers:
        for k, v in _block_forward_flops(layer, cfg, seq_len).items():
            parts[k] += v
    head = 2 * model.head.weight.numel()
    mtp = sum(
        2 * _linear_weights(m.eh_proj) + sum(_block_forward_flops(m.block, cfg, seq_len).values()) + head
        for m in model.mtp
    )
    return Flops(
        seq_len=seq_len,
        head=head,
        mtp=mtp,
        six_n_act=6 * params.activated,
        six_n_non_embedding=6 * params.activated_non_embedding,
        **parts,
    )


def deepseek_llm_m(n_layer: int, d: int, seq_len: int) -> int:
    """DeepSeek LLM eq. 2 (arXiv 2401.02954 §3): M = 72 n_layer d^2 + 12 n_layer d l_seq, dense MHA."""
    return 72 * n_layer * d * d + 12 * n_layer * d * seq_len


# ---- KV cache ----------------------------------------------------------------------------------------------
def kv_cache_rows(cfg: ModelConfig, gqa_groups: int) -> list[tuple[str, int]]:
    """(kind, elements per token per layer): MLA, and MHA/GQA twins with this config's heads and head sizes.

    MLA caches c_KV and the shared rope key (d_c + d_h^R); an MHA twin caches a K of qk_head_dim (nope + rope)
    and a V of v_head_dim for every head; the textbook MHA row is V2 Table 1's 2 n_h d_h, d_h = v_head_dim.
    """
    H, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    return [
        ("mla", cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        ("mha", H * (qk + v)),
        ("mha-textbook", 2 * H * v),
        (f"gqa-{gqa_groups}", gqa_groups * (qk + v)),
    ]


def kv_elements_per_layer(cfg: ModelConfig) -> int:
    """What this config's own attention caches per token per layer."""
    if cfg.attention == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cfg.kv_heads * (cfg.qk_head_dim + cfg.v_head_dim)


# ---- cost --------------------------------------------------------------------------------------------------
@functools.cache
def _v3_flops() -> Flops:
    return count_flops(get_preset("deepseek-v3"), V3_TRAIN_SEQ_LEN)


def published_v3_mfu(convention: str, precision: str, gpu_hours: float = V3_GPU_HOURS) -> float:
    """MFU that DeepSeek-V3's published H800 GPU-hours imply under a FLOP convention (at 4K sequences)."""
    flops = _v3_flops().training(convention) * PUBLISHED_TOKENS["deepseek-v3"][0]
    return flops / (gpu_hours * 3600 * GPUS["h800"].peak_tflops(precision) * 1e12)


@dataclass
class Cost:
    gpu: str
    precision: str
    convention: str
    tokens: float
    flops_per_token: int
    total_flops: float
    peak_tflops: float
    mfu: float
    mfu_source: str
    achieved_tflops: float
    gpu_hours: float
    n_gpus: int
    days: float
    energy_kwh: float
    price_per_gpu_hour: float
    dollars: float


def training_cost(
    flops_per_token: int,
    tokens: float,
    *,
    convention: str = "6n",
    gpu: str = "h800",
    precision: str = "bf16",
    mfu: float | None = None,
    gpu_hours_per_trillion: float | None = None,
    price: float = V3_PRICE_PER_GPU_HOUR,
    n_gpus: int = 2048,
) -> Cost:
    """GPU-hours, energy and dollars for `tokens` tokens. MFU: given, from gpu_hours_per_trillion, or V3's."""
    if gpu not in GPUS:
        raise ValueError(f"gpu: unknown gpu {gpu!r}; choose from {', '.join(GPUS)}")
    if convention not in FLOP_CONVENTIONS:
        raise ValueError(
            f"flops: unknown convention {convention!r}; choose from {', '.join(FLOP_CONVENTIONS)}"
        )
    g = GPUS[gpu]
    peak = g.peak_tflops(precision)
    total = float(flops_per_token) * tokens
    if gpu_hours_per_trillion is not None:
        gpu_hours = gpu_hours_per_trillion * tokens / 1e12
        mfu = total / (gpu_hours * 3600 * peak * 1e12)
        source = f"implied by {gpu_hours_per_trillion:,.0f} GPU-hours per trillion tokens"
    else:
        source = "given"
        if mfu is None:
            mfu = published_v3_mfu(convention, precision)
            source = "DeepSeek-V3's, implied by its 2.788M H800 GPU-hours for 14.8T tokens [V3 Table 1]"
        gpu_hours = total / (peak * 1e12 * mfu) / 3600
    return Cost(
        gpu=g.name,
        precision=precision,
        convention=convention,
        tokens=tokens,
        flops_per_token=flops_per_token,
        total_flops=total,
        peak_tflops=peak,
        mfu=mfu,
        mfu_source=source,
        achieved_tflops=peak * mfu,
        gpu_hours=gpu_hours,
        n_gpus=n_gpus,
        days=gpu_hours / n_gpus / 24,
        energy_kwh=gpu_hours * g.watts / 1000,
        price_per_gpu_hour=price,
        dollars=gpu_hours * price,
    )


def default_tokens(cfg: ModelConfig, params: ParamCounts) -> tuple[float, str]:
    if cfg.name in PUBLISHED_TOKENS:
        return PUBLISHED_TOKENS[cfg.name]
    return TOKENS_PER_PARAM * params.main, f"{TOKENS_PER_PARAM} per parameter, Chinchilla's rule of thumb"


# ---- the inspect report ------------------------------------------------------------------------------------
def inspect_report(
    cfg: ModelConfig,
    *,
    seq_len: int | None = None,
    context: int | None = None,
    gqa_groups: int | None = None,
    tokens: float | None = None,
    convention: str = "6n",
    **cost_kwargs,
) -> dict:
    """Everything `nanoseek inspect` prints, as one JSON-able dict. `cost_kwargs` go to `training_cost`."""
    model = build_meta(cfg)
    params = count_params(cfg, model)
    seq_len = seq_len or min(V3_TRAIN_SEQ_LEN, cfg.max_position_embeddings)
    flops = count_flops(cfg, seq_len, model)
    context = context or min(128 * 1024, cfg.max_position_embeddings)
    if gqa_groups is None:
        gqa_groups = cfg.kv_heads if cfg.attention == "gqa" else min(8, cfg.num_attention_heads)
    if tokens is None:
        tokens, token_source = default_tokens(cfg, params)
    else:
        token_source = "given"
    cost = training_cost(flops.training(convention), tokens, convention=convention, **cost_kwargs)
    L = cfg.num_hidden_layers
    rows = kv_cache_rows(cfg, gqa_groups)
    mla = rows[0][1]
    kv = [
        dict(
            kind=kind,
            per_layer=per_layer,
            per_token=per_layer * L,
            bytes_per_token=per_layer * L * KV_BYTES,
            ratio_to_mla=per_layer / mla,
            bytes_at_context=per_layer * L * KV_BYTES * context,
        )
        for kind, per_layer in rows
    ]
    published = {
        "gpu_hours": V3_GPU_HOURS,
        "pretrain_gpu_hours": V3_PRETRAIN_GPU_HOURS,
        "dollars": V3_GPU_HOURS * V3_PRICE_PER_GPU_HOUR,
        "implied_mfu_bf16": published_v3_mfu(convention, "bf16"),
        "implied_mfu_fp8": published_v3_mfu(convention, "fp8"),
        "implied_mfu_bf16_pretrain_only": published_v3_mfu(convention, "bf16", V3_PRETRAIN_GPU_HOURS),
    }
    return {
        "name": cfg.name,
        "config": {
            "layers": L,
            "hidden_size": cfg.hidden_size,
            "attention": cfg.attention,
            "ffn": cfg.ffn,
            "moe_layers": cfg.n_moe_layers,
            "routed_experts": cfg.n_routed_experts if cfg.ffn == "moe" else 0,
            "experts_per_token": cfg.num_experts_per_tok if cfg.ffn == "moe" else 0,
            "shared_experts": cfg.n_shared_experts if cfg.ffn == "moe" else 0,
            "mtp_depth": cfg.num_nextn_predict_layers,
            "vocab_size": cfg.vocab_size,
        },
        "params": {
            **dataclasses.asdict(params),
            "main": params.main,
            "with_mtp": params.with_mtp,
            "mtp_stored": params.mtp_stored,
            "with_mtp_stored": params.main + params.mtp_stored,
        },
        "activated": {
            "with_embedding_and_head": params.activated,
            "without_input_embedding": params.activated_no_embedding,
            "without_embedding_and_head": params.activated_non_embedding,
            "mtp_unique": params.mtp_activated,
            "mtp_with_shared_embedding_and_head": params.mtp_activated + params.embedding + params.head
            if params.n_mtp
            else 0,
        },
        "flops_per_token": {**dataclasses.asdict(flops), "m": flops.m, "full": flops.full},
        "kv_cache": {
            "dtype": "bf16",
            "layers": L,
            "context": context,
            "this_model": kv_elements_per_layer(cfg),
            "this_kind": cfg.attention if cfg.attention != "gqa" else f"gqa-{cfg.kv_heads}",
            "rows": kv,
        },
        "cost": {**dataclasses.asdict(cost), "token_source": token_source},
        "published_v3": published,
    }
