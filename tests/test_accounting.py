"""nanoseek.accounting: published DeepSeek counts, DeepSeek LLM's M, the FLOPs the model does, KV cache, cost.

Published figures are copied here with their sources (REFERENCE §1, §3, §12.1, §15 and the papers it cites);
the tests never read REFERENCE.md.
"""

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanoseek.accounting import (
    build_meta,
    count_flops,
    count_params,
    deepseek_llm_m,
    inspect_report,
    kv_cache_rows,
    published_v3_mfu,
    training_cost,
)
from nanoseek.config import ModelConfig, get_preset
from nanoseek.model import Transformer

# DeepSeek-V3 [V3 abstract, §4.2]: 671B total, 37B activated. Exact counts from the released config
# (REFERENCE §1, computed from inference/configs/config_671B.json; the checkpoint element count agrees).
V3_MAIN = 671_026_419_200
V3_ATTENTION_PER_LAYER = 187_107_328
V3_DENSE_FFN_PER_LAYER = 396_361_728
V3_MOE_LAYER = 11_320_164_608  # 256 x 44,040,192 + shared 44,040,192 + gate 1,835,264 (incl. the 256 biases)
V3_EMBEDDING = 926_679_040  # = head
V3_ACTIVATED = 37.55e9  # incl. embedding + head
V3_ACTIVATED_NO_INPUT_EMBEDDING = 36.63e9
V3_MTP_UNIQUE = 11.61e9
V3_MTP_STORED = 13_463_426_304  # with the duplicated embedding + head of the HF checkpoint
V3_WITH_MTP_STORED = 684_489_845_504  # [RM] "685B" on the hub
# DeepSeek-V2 [V2 abstract]: 236B total, 21B activated; DeepSeek-V2-Lite [V2 App. B]: 15.7B / 2.4B activated.
V2_TOTAL, V2_ACTIVATED = 236e9, 21e9
V2_LITE_TOTAL, V2_LITE_ACTIVATED = 15.7e9, 2.4e9
# KV cache per token, REFERENCE §3 ([V3] eqs 1-11, [V2] Table 1).
V3_MLA_KV_PER_LAYER, V3_MLA_KV_PER_TOKEN, V3_MLA_KV_BYTES = 576, 35_136, 70_272
V3_MHA_KV_PER_LAYER, V3_MHA_RATIO = 40_960, 71.1
V3_MHA_TEXTBOOK_PER_LAYER, V3_MHA_TEXTBOOK_RATIO = 32_768, 56.9
# Training cost, [V3 §1, Table 1] via REFERENCE §15.
V3_GPU_HOURS, V3_PRETRAIN_GPU_HOURS, V3_DOLLARS = 2_788_000, 2_664_000, 5_576_000
V3_TOKENS, V3_GPU_HOURS_PER_TRILLION = 14.8e12, 180_000
H800_WATTS = 700


@pytest.fixture(scope="module")
def v3():
    return count_params(get_preset("deepseek-v3"))


def dense_mha(n_layer: int, d: int, heads: int = 6) -> ModelConfig:
    """The model DeepSeek LLM's M describes: MHA with heads x head_dim = d, and a SwiGLU of 8d/3 (3 matrices,
    8 d^2 weights) standing in for the 2-matrix 4d FFN the formula assumes."""
    assert d % 3 == 0 and d % heads == 0
    head_dim = d // heads
    return ModelConfig(
        name="dense-mha",
        attention="mha",
        ffn="dense",
        vocab_size=1000,
        hidden_size=d,
        num_attention_heads=heads,
        qk_nope_head_dim=head_dim - 2 * (head_dim // 4),
        qk_rope_head_dim=2 * (head_dim // 4),  # RoPE rotates pairs
        v_head_dim=head_dim,
        intermediate_size=8 * d // 3,
        num_hidden_layers=n_layer,
        first_k_dense_replace=0,
        num_nextn_predict_layers=0,
        max_position_embeddings=8192,
    ).validate()


# ---- parameters --------------------------------------------------------------------------------------------
def test_v3_main_model_is_exactly_671_026_419_200(v3):
    assert v3.main == V3_MAIN
    assert v3.attention == 61 * V3_ATTENTION_PER_LAYER
    assert v3.dense_ffn == 3 * V3_DENSE_FFN_PER_LAYER
    assert v3.routed_experts + v3.shared_experts + v3.router == 58 * V3_MOE_LAYER
    assert v3.embedding == v3.head == V3_EMBEDDING


def test_v3_mtp_unique_and_as_stored_in_the_hf_checkpoint(v3):
    assert round(v3.mtp / 1e9, 2) == V3_MTP_UNIQUE / 1e9
    assert v3.mtp_stored == V3_MTP_STORED
    assert v3.main + v3.mtp_stored == V3_WITH_MTP_STORED


def test_v3_activated_is_37b(v3):
    assert round(v3.activated / 1e9, 2) == V3_ACTIVATED / 1e9
    assert round(v3.activated_no_embedding / 1e9, 2) == V3_ACTIVATED_NO_INPUT_EMBEDDING / 1e9
    assert abs(v3.activated_no_embedding / 37e9 - 1) < 0.015


@pytest.mark.parametrize(
    "preset, total, activated, activated_tol",
    [
        ("deepseek-v2", V2_TOTAL, V2_ACTIVATED, 0.01),
        # 2.45B against a published "2.4B": the rounding of the paper, under any convention we tried
        ("deepseek-v2-lite", V2_LITE_TOTAL, V2_LITE_ACTIVATED, 0.025),
    ],
)
def test_v2_and_v2_lite_match_published_counts(preset, total, activated, activated_tol):
    p = count_params(get_preset(preset))
    assert abs(p.main / total - 1) < 0.005
    # the papers' activated figures sit on the count without the input embedding (a lookup)
    assert abs(p.activated_no_embedding / activated - 1) < activated_tol
    assert p.mtp == p.mtp_stored == 0


@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek-v3"])
def test_breakdown_adds_up_to_every_stored_tensor(preset):
    cfg = get_preset(preset)
    model = build_meta(cfg)
    p = count_params(cfg, model)
    assert p.main + p.mtp == sum(t.numel() for t in model.state_dict().values())


def test_dense_model_activates_every_parameter():
    p = count_params(dense_mha(2, 96))
    assert p.activated == p.main
    assert p.routed_experts == p.router == 0


def test_each_extra_routed_expert_per_token_adds_one_expert_per_moe_layer():
    cfg = get_preset("small")
    more = cfg.replace(num_experts_per_tok=cfg.num_experts_per_tok + 1)
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    gained = count_params(more).activated - count_params(cfg).activated
    assert gained == cfg.n_moe_layers * one_expert


# ---- FLOPs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_layer, d, seq_len", [(4, 384, 4096), (12, 768, 2048), (80, 8190, 4096)])
def test_m_reduces_exactly_to_deepseek_llm_formula_for_dense_mha(n_layer, d, seq_len):
    heads = 6 if n_layer != 80 else 65
    f = count_flops(dense_mha(n_layer, d, heads), seq_len)
    assert f.m == deepseek_llm_m(n_layer, d, seq_len) == 72 * n_layer * d * d + 12 * n_layer * d * seq_len


def _gqa_dense() -> ModelConfig:
    return dense_mha(2, 96).replace(name="gqa", attention="gqa", n_kv_heads=2)


def _tiny_plain_query() -> ModelConfig:
    return get_preset("tiny").replace(
        q_lora_rank=0, n_shared_experts=2
    )  # V2-Lite's plain wq, 2 shared experts


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the experts' `_grouped_mm`; each group multiplies its own rows."""
    if len(b) == 3:  # forward / input grad: [N, in] x [E, in, out] -> [N, out]
        return 2 * math.prod(out_shape) * a[-1]
    return 2 * out_shape[-2] * out_shape[-1] * a[-1]  # weight grad: [in, N] x [N, out] -> [E, in, out]


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})


@pytest.mark.parametrize("make_cfg", [lambda: get_preset("tiny"), _tiny_plain_query, _gqa_dense])
def test_forward_flops_equal_what_torch_counts(make_cfg):
    """Our per-token rule against torch's FlopCounterMode on a real forward pass. SDPA runs as its math (bmm)
    decomposition, which the counter sees (it has no formula for the CPU flash kernel); like our rule, that
    path multiplies every query with every key, causal mask or not."""
    cfg = make_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    B, T = 2, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
        model(ids)
    f = count_flops(cfg, seq_len=T)
    forward = f.attention_projections + f.attention_scores + f.ffn + f.router + f.head
    # MLA's training path pads V with zeros to the QK width so SDPA can take its fused kernel (mla.py). Those
    # columns are real work for the kernel but no model FLOPs, so the count above leaves them out; add them here.
    pad = max(cfg.qk_head_dim - cfg.v_head_dim, 0) if cfg.attention == "mla" else 0
    padding = 2 * cfg.num_attention_heads * T * pad * cfg.num_hidden_layers
    assert counter.get_total_flops() == (forward + padding) * B * T


def test_backward_costs_twice_the_forward():
    """Why training = 3 x forward: every matmul's backward computes an input and a weight gradient."""
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with sdpa_kernel(SDPBackend.MATH):
        with flop_counter() as fwd:
            out = model(ids)
        with flop_counter() as bwd:
            out.logits.sum().backward()
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()


def test_v3_flop_conventions_are_ordered_and_6n_uses_activated(v3):
    f = count_flops(get_preset("deepseek-v3"), 4096)
    assert f.six_n_act == 6 * v3.activated
    assert f.six_n_non_embedding < f.six_n_act < f.m < f.full


# ---- KV cache ----------------------------------------------------------------------------------------------
def test_v3_kv_cache_is_576_per_layer_and_71x_smaller_than_mha():
    r = inspect_report(get_preset("deepseek-v3"))
    rows = {row["kind"]: row for row in r["kv_cache"]["rows"]}
    assert r["kv_cache"]["this_model"] == V3_MLA_KV_PER_LAYER
    assert rows["mla"]["per_token"] == V3_MLA_KV_PER_TOKEN
    assert rows["mla"]["bytes_per_token"] == V3_MLA_KV_BYTES
    assert rows["mha"]["per_layer"] == V3_MHA_KV_PER_LAYER
    assert round(rows["mha"]["ratio_to_mla"], 1) == V3_MHA_RATIO
    assert rows["mha-textbook"]["per_layer"] == V3_MHA_TEXTBOOK_PER_LAYER
    assert round(rows["mha-textbook"]["ratio_to_mla"], 1) == V3_MHA_TEXTBOOK_RATIO
    # REFERENCE §3: one 128K sequence needs 8.58 GiB (MLA) vs 610 GiB (MHA)
    assert round(rows["mla"]["bytes_at_context"] / 2**30, 2) == 8.58
    assert round(rows["mha"]["bytes_at_context"] / 2**30) == 610


def test_gqa_config_caches_its_own_kv_heads():
    cfg = _gqa_dense()
    r = inspect_report(cfg)
    assert r["kv_cache"]["this_model"] == 2 * (cfg.qk_head_dim + cfg.v_head_dim)
    assert {row["kind"] for row in r["kv_cache"]["rows"]} >= {"mla", "mha", "gqa-2"}
    assert kv_cache_rows(cfg, 2)[3][1] == r["kv_cache"]["this_model"]


# ---- cost --------------------------------------------------------------------------------------------------
def test_defaults_reproduce_the_published_v3_gpu_hours_and_dollars():
    cost = inspect_report(get_preset("deepseek-v3"))["cost"]
    assert cost["tokens"] == V3_TOKENS
    assert cost["gpu"] == "H800"
    assert round(cost["gpu_hours"]) == V3_GPU_HOURS
    assert round(cost["dollars"]) == V3_DOLLARS
    assert round(cost["energy_kwh"]) == V3_GPU_HOURS * H800_WATTS // 1000


def test_published_v3_figure_implies_a_third_of_bf16_peak_under_6n():
    # REFERENCE §15: 6 x 37B x 14.8T over 2.788M GPU-hours ~ 328 TFLOP/s, ~33% of BF16 / ~17% of FP8 peak
    assert abs(6 * 37e9 * V3_TOKENS / (V3_GPU_HOURS * 3600) / 1e12 - 328) < 1
    assert published_v3_mfu("6n", "bf16") == pytest.approx(0.33, abs=0.01)
    assert published_v3_mfu("6n", "fp8") == pytest.approx(0.17, abs=0.01)
    # a different convention changes the MFU, never the calibrated GPU-hours
    assert published_v3_mfu("full", "bf16") > published_v3_mfu("6n", "bf16")
    r = inspect_report(get_preset("deepseek-v3"), convention="full")
    assert round(r["cost"]["gpu_hours"]) == V3_GPU_HOURS


def test_180k_gpu_hours_per_trillion_is_the_pretraining_budget():
    f = count_flops(get_preset("deepseek-v3"), 4096)
    cost = training_cost(f.six_n_act, V3_TOKENS, gpu_hours_per_trillion=V3_GPU_HOURS_PER_TRILLION)
    assert round(cost.gpu_hours) == V3_PRETRAIN_GPU_HOURS
    assert cost.mfu == pytest.approx(published_v3_mfu("6n", "bf16", V3_PRETRAIN_GPU_HOURS))


def test_cost_follows_mfu_gpu_and_price():
    base = training_cost(10**9, 1e12, mfu=0.4)
    assert training_cost(10**9, 1e12, mfu=0.2).gpu_hours == pytest.approx(2 * base.gpu_hours)
    fp8 = training_cost(10**9, 1e12, mfu=0.4, precision="fp8")
    assert fp8.gpu_hours == pytest.approx(base.gpu_hours * 989 / 1979)  # H800 dense peaks, REFERENCE §15
    assert training_cost(10**9, 1e12, mfu=0.4, price=4.0).dollars == pytest.approx(2 * base.dollars)
    assert training_cost(10**9, 1e12, mfu=0.4, gpu="a100").gpu_hours > base.gpu_hours
    with pytest.raises(ValueError, match="FP8"):
        training_cost(10**9, 1e12, gpu="a100", precision="fp8")


def test_report_is_plain_json():
    r = inspect_report(get_preset("tiny"))
    assert json.loads(json.dumps(r)) == r
