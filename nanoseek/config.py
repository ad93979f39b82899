"""Model configuration: one typed dataclass, the published presets, JSON and Hugging Face `config.json` I/O.

Field names follow Hugging Face's `DeepseekV3Config` wherever one exists, so a released `config.json` maps onto
`ModelConfig` key for key. The fields after the "nanoseek" marker are ours: ablation switches (attention and FFN
kind), the balancing recipe of DeepSeek-V3 §2.1.2 (aux-loss-free bias speed gamma, sequence-wise alpha), and the
MTP loss weight lambda of §2.2.

Validation happens once, here, at the edge (`ModelConfig.validate`); everything downstream trusts the config.
Every impossible combination raises `ConfigError` (a `ValueError`) whose message names the field.

Published values (REFERENCE §1, the official `inference/configs/*.json` and the hub `config.json` files):
`deepseek-v3` is the 671B model, `deepseek-v2` the 236B one, `deepseek-v2-lite` the 15.7B one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTENTION_KINDS = ("mla", "mha", "gqa")
FFN_KINDS = ("moe", "dense")
BALANCING_KINDS = ("aux_free", "aux_loss", "none")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


class ConfigError(ValueError):
    """An impossible or unknown configuration value; the message names the field."""


@dataclass
class ModelConfig:
    # --- Hugging Face DeepseekV3Config fields -------------------------------------------------------------
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN inner size (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # inner size of one routed expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # HF keeps it = num_attention_heads; our GQA uses n_kv_heads
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512  # d_c: the latent that MLA caches
    q_lora_rank: int | None = 1536  # d_c'; 0/None = plain query projection (V2-Lite)
    qk_rope_head_dim: int = 64  # d_h^R: decoupled RoPE part of each query/key head
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128  # d_h
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8  # K_r
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"  # noaux_tc: group score = sum of top-2 biased scores; greedy: no groups
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = (
        None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    )
    num_nextn_predict_layers: int = 1  # MTP depth D
    initializer_range: float = 0.006  # paper init std [V3 §4.2] (HF's default is 0.02)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # --- nanoseek -------------------------------------------------------------------------------------------
    attention: str = "mla"  # mla | mha | gqa (ablation baselines)
    n_kv_heads: int | None = None  # gqa only: number of K/V heads
    ffn: str = "moe"  # moe | dense (dense: every layer uses intermediate_size)
    balancing: str = (
        "aux_free"  # aux_free (bias + seq-wise loss) | aux_loss (classic softmax aux loss) | none
    )
    bias_update_speed: float = 0.001  # gamma [V3 §4.2]
    seq_aux_alpha: float = 0.0001  # alpha of the complementary sequence-wise loss [V3 §4.2]
    aux_loss_alpha: float = 0.01  # classic expert-level balance loss weight (aux_loss ablation)
    mtp_lambda: float = 0.3  # lambda [V3 §4.2]
    name: str = field(default="custom", compare=False)

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        """K/V heads of the mha/gqa ablation attention."""
        if self.attention == "gqa":
            return int(self.n_kv_heads or self.num_attention_heads)
        return self.num_attention_heads

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.ffn == "moe" and layer_id >= self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The rope_scaling dict if it asks for YaRN, else None."""
        rs = self.rope_scaling
        if not rs:
            return None
        kind = rs.get("type", rs.get("rope_type"))
        return rs if kind == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """(d_h + d_h^R)^-0.5, times mscale^2 under YaRN (REFERENCE §3; HF `yarn_get_mscale(factor, mscale_all_dim)`)."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        if yarn and yarn.get("mscale_all_dim"):
            m = yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> ModelConfig:
        def need(cond: bool, fieldname: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{fieldname}: {msg}")

        _check_types(self)
        for f in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool), f, f"must be an integer, got {v!r}")
            need(v > 0, f, f"must be positive, got {v}")
        need(
            self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
        )
        need(
            self.attention in ATTENTION_KINDS,
            "attention",
            f"unknown kind {self.attention!r}; choose from {ATTENTION_KINDS}",
        )
        need(self.ffn in FFN_KINDS, "ffn", f"unknown kind {self.ffn!r}; choose from {FFN_KINDS}")
        need(
            self.balancing in BALANCING_KINDS,
            "balancing",
            f"unknown kind {self.balancing!r}; choose from {BALANCING_KINDS}",
        )
        need(
            self.scoring_func in SCORING_FUNCS,
            "scoring_func",
            f"unknown {self.scoring_func!r}; choose from {SCORING_FUNCS}",
        )
        need(
            self.topk_method in TOPK_METHODS,
            "topk_method",
            f"unknown {self.topk_method!r}; choose from {TOPK_METHODS}",
        )
        need(
            self.hidden_act == "silu",
            "hidden_act",
            f"only 'silu' (SwiGLU) is implemented, got {self.hidden_act!r}",
        )
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        need(
            self.initializer_range > 0, "initializer_range", f"must be positive, got {self.initializer_range}"
        )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.mtp_lambda >= 0, "mtp_lambda", "must be >= 0")
        if self.attention == "mla":
            need(self.kv_lora_rank > 0, "kv_lora_rank", f"must be positive, got {self.kv_lora_rank}")
            need(
                self.q_lora_rank is None or self.q_lora_rank >= 0,
                "q_lora_rank",
                "must be >= 0 (0/None = plain wq)",
            )
        if self.attention == "mha":
            need(
                (self.qk_head_dim) % 2 == 0,
                "qk_nope_head_dim",
                "qk_nope_head_dim + qk_rope_head_dim must be even for mha",
            )
        if self.attention == "gqa":
            need(
                self.n_kv_heads is not None and self.n_kv_heads > 0,
                "n_kv_heads",
                "gqa needs a positive n_kv_heads",
            )
            need(
                self.num_attention_heads % self.n_kv_heads == 0,
                "n_kv_heads",
                f"num_attention_heads={self.num_attention_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
            )
        if self.yarn is not None:
            y = self.yarn
            need(
                "factor" in y and float(y["factor"]) > 0,
                "rope_scaling.factor",
                "YaRN needs a positive factor",
            )
        elif self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(
                kind in (None, "default"),
                "rope_scaling.type",
                f"unsupported rope scaling {kind!r}; only 'yarn'",
            )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            "must be in [0, layers]",
        )
        if self.ffn == "moe":
            for f in (
                "moe_intermediate_size",
                "n_routed_experts",
                "num_experts_per_tok",
                "n_group",
                "topk_group",
            ):
                v = getattr(self, f)
                need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(
                self.topk_group <= self.n_group,
                "topk_group",
                f"topk_group={self.topk_group} > n_group={self.n_group}",
            )
            need(
                self.n_routed_experts % self.n_group == 0,
                "n_group",
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}",
            )
            per_group = self.n_routed_experts // self.n_group
            available = per_group * (self.topk_group if self.topk_method != "greedy" else self.n_group)
            need(
                self.num_experts_per_tok <= available,
                "num_experts_per_tok",
                f"{self.num_experts_per_tok} experts per token but only {available} are available in the kept groups",
            )
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(
                    per_group >= 2,
                    "n_group",
                    "noaux_tc group scores sum the top-2 experts: need >= 2 experts per group",
                )
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
            need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
            need(self.seq_aux_alpha >= 0, "seq_aux_alpha", "must be >= 0")
            need(self.aux_loss_alpha >= 0, "aux_loss_alpha", "must be >= 0")
        return self

    # ---- I/O -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True) -> ModelConfig:
        """Build from a dict. strict=True rejects unknown keys (our JSON); HF configs pass strict=False."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if strict and unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown config field (known fields: see nanoseek.config.ModelConfig)"
            )
        kwargs = {k: v for k, v in d.items() if k in known}
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Load our JSON, or a Hugging Face `config.json` (recognized by its `model_type`)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config: {path} must hold a JSON object")
        if "model_type" in d:
            return from_hf_dict(d)
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes).validate()


def _check_types(cfg: ModelConfig) -> None:
    """Every field has the type its annotation names (JSON gives strings and floats where ints belong)."""
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(cfg):
        v, hint = getattr(cfg, f.name), hints[f.name]
        allowed = typing.get_args(hint) or (hint,)
        ok = False
        for t in allowed:
            t = typing.get_origin(t) or t
            if t is type(None):
                ok |= v is None
            elif t is float:
                ok |= isinstance(v, (int, float)) and not isinstance(v, bool)
            elif t is int:
                ok |= isinstance(v, int) and not isinstance(v, bool)
            else:
                ok |= isinstance(v, t)
        if not ok:
            names = " or ".join(getattr(typing.get_origin(t) or t, "__name__", str(t)) for t in allowed)
            raise ConfigError(f"{f.name}: expected {names}, got {type(v).__name__} {v!r}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature 0.1*m*ln(s) + 1 (REFERENCE §3)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---- Hugging Face config.json ------------------------------------------------------------------------------
def from_hf_dict(d: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face DeepseekV3/V2 `config.json` onto ModelConfig (unknown HF keys are ignored)."""
    d = dict(d)
    mt = d.get("model_type", "deepseek_v3")
    if mt not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"model_type: expected deepseek_v3 or deepseek_v2, got {mt!r}")
    # transformers v5 writes `rope_parameters` (rope_theta and the scaling dict together).
    rp = d.pop("rope_parameters", None)
    if rp:
        d["rope_theta"] = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default":
            d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    rs = d.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("type", rs.get("rope_type")) == "yarn":
        # transformers' default when the field is absent (released configs always set it)
        d["rope_scaling"] = rs = dict(rs)
        rs.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
    if d.get("q_lora_rank") is None:
        d["q_lora_rank"] = 0
    if d.get("num_nextn_predict_layers") is None:
        d["num_nextn_predict_layers"] = 0
    if mt == "deepseek_v2":
        d.setdefault("scoring_func", "softmax")
        d.setdefault("topk_method", "greedy")
        d.setdefault("norm_topk_prob", False)
        d.setdefault("num_nextn_predict_layers", 0)
    if d.get("n_group") is None:
        d["n_group"] = 1
    if d.get("topk_group") is None:
        d["topk_group"] = 1
    # An HF checkpoint is whatever was trained; keep its init irrelevant but its balancing inference-neutral.
    name = d.get("_name_or_path") or "hf"
    d["name"] = str(name)
    return ModelConfig.from_dict(d, strict=False)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face DeepseekV3 `config.json` for an MLA/MoE config."""
    if cfg.attention != "mla":
        raise ConfigError(
            f"attention: only 'mla' models have a Hugging Face DeepseekV3 layout, got {cfg.attention!r}"
        )
    d: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "first_k_dense_replace": cfg.first_k_dense_replace if cfg.ffn == "moe" else cfg.num_hidden_layers,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": cfg.scoring_func,
        "topk_method": cfg.topk_method,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_interleave": True,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    return d


# ---- presets -----------------------------------------------------------------------------------------------
def _v3() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v3",
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        },
    )


def _v2() -> ModelConfig:
    return ModelConfig(
        name="deepseek-v2",
        vocab_size=102400,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=60,
        num_attention_heads=128,
        n_shared_experts=2,
        n_routed_experts=160,
        routed_scaling_factor=16.0,
        q_lora_rank=1536,
        n_group=8,
        topk_group=3,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        topk_method="group_limited_greedy",
        num_nextn_predict_layers=0,
        balancing="aux_loss",
        aux_loss_alpha=0.003,
        bos_token_id=100000,
        eos_token_id=100001,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
        },
    )


def _v2_lite() -> ModelConfig:
    return dataclasses.replace(
        _v2(),
        name="deepseek-v2-lite",
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        q_lora_rank=0,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        aux_loss_alpha=0.001,
    )


def _tiny() -> ModelConfig:
    """Seconds on a CPU: every mechanism present (q_lora, groups, shared expert, dense layer, MTP)."""
    return ModelConfig(
        name="tiny",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        routed_scaling_factor=2.5,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
    )


def _small() -> ModelConfig:
    """Minutes on a CPU: 64 fine-grained routed experts, top-6, 2 shared (DeepSeekMoE shape at small scale)."""
    return ModelConfig(
        name="small",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=8,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=2.5,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        max_position_embeddings=2048,
        num_nextn_predict_layers=1,
    )


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "deepseek-v2-lite": _v2_lite,
    "deepseek-v2": _v2,
    "deepseek-v3": _v3,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]().validate()


def resolve_config(spec: str) -> ModelConfig:
    """A preset name, or a path to our JSON / a Hugging Face config.json / a checkpoint folder."""
    if spec in PRESETS:
        return get_preset(spec)
    p = Path(spec)
    if p.exists():
        return ModelConfig.load(p)
    raise ConfigError(
        f"preset: {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing config file"
    )
