"""FP8 training and checkpoints (nanoseek/fp8.py, the FP8 export in nanoseek/hf.py): DeepSeek-V3 §3.3, REFERENCE §7, §13.

Each test states one property of the recipe: exact shapes, the E4M3 error bound, saturation, why fine-grained
scales and promoted accumulation exist, FP8 gradients close to fp32 ones, and the released checkpoint layout.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import nanoseek
from nanoseek.fp8 import (
    AMAX_FLOOR,
    E4M3,
    E4M3_MAX,
    Fp8Linear,
    _to_e4m3,
    convert_to_fp8,
    dequantize_blocks,
    dequantize_tiles,
    fp8_gemm_reference,
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_names,
    fp8_mm,
    quantize_blocks,
    quantize_tiles,
    round_mantissa,
    tensor_core_dot,
)
from nanoseek.hf import is_fp8_in_release, save_hf
from nanoseek.model import Transformer
from nanoseek.train.trainer import TrainConfig, Trainer, TrainError

E4M3_MIN_NORMAL = 2.0**-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def wide_range(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values over ~6 decades, so tiles/blocks with very different ranges sit side by side."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-4, 2, shape[-1])


# ---- shapes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 127, 128, 129, 300, 1024])
def test_tile_quantization_keeps_the_shape_and_gives_one_scale_per_1x128_tile(K):
    x = torch.randn(3, 5, K)
    q, s = quantize_tiles(x)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (3, 5, math.ceil(K / 128))
    assert dequantize_tiles(q, s).shape == x.shape


@pytest.mark.parametrize(
    "shape, scale_shape",
    [
        ((576, 7168), (5, 56)),  # V3's kv_a_proj_with_mqa: ragged rows (REFERENCE §7)
        ((128, 128), (1, 1)),
        ((129, 257), (2, 3)),
        ((3, 5), (1, 1)),
        ((4, 200, 300), (4, 2, 3)),  # stacked experts [E, out, in]
    ],
)
def test_block_quantization_scale_shapes_round_up_for_ragged_sizes(shape, scale_shape):
    w = torch.randn(shape)
    q, s = quantize_blocks(w)
    assert q.dtype == E4M3 and q.shape == w.shape and q.is_contiguous()
    assert s.shape == scale_shape
    assert dequantize_blocks(q, s).shape == w.shape
    with pytest.raises(ValueError, match="block scale shape"):
        dequantize_blocks(q, s[..., :-1, :] if s.shape[-2] > 1 else s[..., :-1])


# ---- error bound and saturation ----------------------------------------------------------------------------
def _assert_normal_values_within_2_pow_minus_4(x, deq, scale_full):
    """E4M3 keeps 3 mantissa bits: round-to-nearest is within half an ulp, 2^-4 relative (the issue asks 2^-3)."""
    normal = (x / scale_full).abs() >= E4M3_MIN_NORMAL
    assert normal.float().mean() > 0.5  # the bound is checked on most elements, not a handful
    err = ((deq - x).abs() / x.abs())[normal]
    assert err.max() <= 2.0**-4 * (1 + 1e-6)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_tile_quantization_error_is_within_e4m3_precision_for_normal_values(ue8m0):
    x = wide_range(64, 1000)
    q, s = quantize_tiles(x, ue8m0)
    full = s.repeat_interleave(128, -1)[:, :1000]
    _assert_normal_values_within_2_pow_minus_4(x, dequantize_tiles(q, s), full)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_block_quantization_error_is_within_e4m3_precision_for_normal_values(ue8m0):
    w = wide_range(300, 260, seed=1)
    q, s = quantize_blocks(w, ue8m0)
    full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    _assert_normal_values_within_2_pow_minus_4(w, dequantize_blocks(q, s), full)


def test_ue8m0_scales_are_powers_of_two_at_or_above_amax_over_448():
    x = wide_range(16, 512)
    _, s = quantize_tiles(x, ue8m0=True)
    amax = x.abs().view(16, 4, 128).amax(-1)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    assert (s >= amax / E4M3_MAX).all() and (s < 2 * amax / E4M3_MAX).all()


def test_scale_maps_the_tile_amax_onto_448():
    x = torch.randn(4, 256)
    q, s = quantize_tiles(x)
    assert torch.allclose(q.float().abs().view(4, 2, 128).amax(-1), torch.full((4, 2), E4M3_MAX))
    assert torch.allclose(s, x.abs().view(4, 2, 128).amax(-1) / E4M3_MAX)


def test_outliers_saturate_instead_of_overflowing():
    x = torch.randn(4, 256)
    x[0, 3], x[1, 200], x[2, 0] = 3e38, -3e38, 1e6  # near fp32's max, and a plain large outlier
    x[3] = 0.0  # an all-zero row: amax is floored, no 0/0
    tiles_q, tiles_s = quantize_tiles(x)
    blocks_q, blocks_s = quantize_blocks(x)
    for q, deq, outliers in [
        (tiles_q, dequantize_tiles(tiles_q, tiles_s), [(0, 3), (1, 200), (2, 0)]),  # each in its own tile
        (blocks_q, dequantize_blocks(blocks_q, blocks_s), [(0, 3), (1, 200)]),  # the two block maxima
    ]:
        assert torch.isfinite(q.float()).all() and q.float().abs().max() <= E4M3_MAX
        assert torch.isfinite(deq).all() and torch.equal(deq[3], torch.zeros(256))
        for r, c in outliers:
            assert abs(deq[r, c] / x[r, c] - 1) <= 2.0**-4
    assert torch.equal(tiles_s[3], torch.full((2,), AMAX_FLOOR / E4M3_MAX))
    # Without a scale an outlier can only clip: the reason every FP8 tensor carries one. (A bare .to(E4M3)
    # saturates in torch 2.13's CPU build but gives NaN in 2.11's CUDA build, so _to_e4m3 clamps first.)
    assert _to_e4m3(torch.tensor([1e6, -1e6])).float().tolist() == [E4M3_MAX, -E4M3_MAX]


# ---- why fine-grained scaling ------------------------------------------------------------------------------
def _tensorwise(x: torch.Tensor) -> torch.Tensor:
    """One scale for the whole tensor (the per-tensor recipe fine-grained scaling replaces)."""
    s = x.abs().max() / E4M3_MAX
    return (x / s).to(E4M3).float() * s


def test_tilewise_scaling_beats_tensorwise_on_activations_with_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g)
    clean = x.clone()
    outliers = [7, 300, 555, 901]  # "massive activation" channels, 1e4 x the rest
    x[:, outliers] *= 1e4
    keep = torch.ones(1024, dtype=torch.bool)
    keep[outliers] = False

    tile = dequantize_tiles(*quantize_tiles(x))
    tensor = _tensorwise(x)
    mean_rel = lambda y: ((y - x).abs() / x.abs())[:, keep].mean().item()  # noqa: E731
    assert mean_rel(tile) < mean_rel(tensor) / 3  # measured: 0.037 vs 0.145
    assert (tensor[:, keep] == 0).float().mean() > 5 * (tile[:, keep] == 0).float().mean()
    # An outlier only coarsens its own tile: the 4 of 8 tiles per row without one are bit-identical to the
    # same tiles quantized without any outliers.
    clean_tile = dequantize_tiles(*quantize_tiles(clean))
    untouched = [t for t in range(8) if not any(t * 128 <= c < (t + 1) * 128 for c in outliers)]
    for t in untouched:
        assert torch.equal(tile[:, t * 128 : (t + 1) * 128], clean_tile[:, t * 128 : (t + 1) * 128])


# ---- GEMMs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b_block", [128, 1])
def test_fp8_mm_equals_deepseeks_blockwise_gemm_loop(b_block):
    a, b = wide_range(37, 300), wide_range(200, 300, seed=1)
    a_q, a_s = quantize_tiles(a)
    b_q, b_s = quantize_blocks(b) if b_block == 128 else quantize_tiles(b)
    ref = fp8_gemm_reference(a_q, a_s, b_q, b_s, b_block)
    assert rel(fp8_mm(a_q, a_s, b_q, b_s, b_block), ref) < 1e-6  # fp32 summation order only
    assert rel(ref, a @ b.t()) < 0.05  # and both are an FP8 approximation of the fp32 product


def test_round_mantissa_keeps_the_requested_significant_bits():
    x = torch.tensor([1 + 2.0**-10, 1 + 2.0**-20, -3.0, 0.0])
    assert round_mantissa(x, 14).tolist() == [1 + 2.0**-10, 1.0, -3.0, 0.0]


def test_promoted_accumulation_beats_unpromoted_low_precision_accumulation_at_large_k():
    """V3 §3.3.2: a ~14-bit accumulator over K=4096 drifts; adding into FP32 every 128 elements does not."""
    g = torch.Generator().manual_seed(1)
    a = (
        torch.randn(4, 4096, generator=g).abs().to(E4M3).float()
    )  # positive: no cancellation, clean rel. error
    b = torch.randn(4, 4096, generator=g).abs().to(E4M3).float()
    exact = a.double() @ b.double().t()
    err = lambda y: ((y.double() - exact).abs() / exact).max().item()  # noqa: E731
    unpromoted = err(tensor_core_dot(a, b, bits=14, promote_every=None))
    promoted = err(tensor_core_dot(a, b, bits=14, promote_every=128))
    assert promoted < unpromoted / 10  # measured: 5e-5 vs 6e-3
    assert err(a @ b.t()) < promoted  # a full fp32 accumulator is better still


# ---- Fp8Linear ---------------------------------------------------------------------------------------------
def _grads(fn, x, w, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y, x.grad, w.grad


def test_fp8_linear_output_and_gradients_are_close_to_fp32():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 50, 300, generator=g), torch.randn(200, 300, generator=g) * 0.02
    dy = torch.randn(3, 50, 200, generator=g) * 1e-6  # gradient-sized: far below the 1e-4 activation floor
    y8, dx8, dw8 = _grads(fp8_linear, x, w, dy)
    y, dx, dw = _grads(lambda x, w: x @ w.t(), x, w, dy)
    assert y8.shape == y.shape and dx8.shape == dx.shape and dw8.shape == dw.shape
    assert dw8.dtype == torch.float32  # FP32 weight gradients for FP32 master weights
    for got, want in [(y8, y), (dx8, dx), (dw8, dw)]:
        assert 1e-4 < rel(got, want) < 0.06  # FP8-close, and not secretly fp32


def test_fp8_linear_backward_runs_dgrad_and_wgrad_through_fp8_with_transposed_tiles():
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(160, 300, generator=g), torch.randn(200, 300, generator=g), torch.randn(160, 200)
    _, dx8, dw8 = _grads(fp8_linear, x, w, dy)
    x_q, x_s = quantize_tiles(x)
    w_q, w_s = quantize_blocks(w)
    # Dgrad: dy in 1x128 tiles along N, W's blocks transposed.
    dy_q, dy_s = quantize_tiles(dy, floor=1e-30)
    assert rel(dx8, fp8_gemm_reference(dy_q, dy_s, w_q.t(), w_s.t(), 128)) < 1e-6
    # Wgrad: 128x1 tiles along tokens = 1x128 tiles of dy^T and of the FP8-cached x, dequantized and transposed.
    dyT_q, dyT_s = quantize_tiles(dy.t(), floor=1e-30)
    xT_q, xT_s = quantize_tiles(dequantize_tiles(x_q, x_s).t())
    assert dyT_s.shape == (200, 2) and xT_s.shape == (300, 2)  # 160 tokens -> 2 tiles, ragged
    assert rel(dw8, fp8_gemm_reference(dyT_q, dyT_s, xT_q, xT_s, 1)) < 1e-6


def test_fp8_grouped_linear_equals_one_fp8_linear_per_expert():
    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([5, 0, 130, 20])  # an idle expert, and one with a ragged second token tile
    x, w = torch.randn(int(counts.sum()), 96, generator=g), torch.randn(4, 144, 96, generator=g)
    dy = torch.randn(int(counts.sum()), 144, generator=g)
    y, dx, dw = _grads(lambda x, w: fp8_grouped_linear(x, w, counts), x, w, dy)
    per_expert = lambda x, w: torch.cat(  # noqa: E731
        [fp8_linear(xe, w[e]) for e, xe in enumerate(x.split(counts.tolist()))]
    )
    y_ref, dx_ref, dw_ref = _grads(per_expert, x, w, dy)
    assert rel(y, y_ref) < 1e-6 and rel(dx, dx_ref) < 1e-6 and rel(dw, dw_ref) < 1e-6
    assert torch.equal(dw[1], torch.zeros(144, 96))


# ---- converting a model ------------------------------------------------------------------------------------
def test_convert_to_fp8_keeps_v3s_high_precision_parts(tiny_cfg):
    model = Transformer(tiny_cfg, seed=0)
    reference = Transformer(tiny_cfg, seed=0)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    convert_to_fp8(model)
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters, not copies
    names = fp8_linear_names(model)
    for n in ["layers.0.attn.wq_a", "layers.0.attn.wkv_b", "layers.0.attn.wo", "layers.0.ffn.w2"]:
        assert n in names
    assert "layers.1.ffn.experts" in names and "layers.1.ffn.shared_experts.w1" in names
    for m in [model.head, model.mtp[0].eh_proj]:  # output head, MTP projection
        assert type(m) is nn.Linear
    assert not any(("gate" in n and "experts" not in n) or "norm" in n or "embed" in n for n in names)

    x = torch.randint(0, tiny_cfg.vocab_size, (2, 64))
    out8, out = model(x, targets=x), reference(x, targets=x)
    assert abs(out8.loss.item() / out.loss.item() - 1) < 1e-3
    out8.loss.backward()
    out.loss.backward()
    fp8_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    for (n, p8), (_, p) in zip(model.named_parameters(), reference.named_parameters()):
        # Measured: 6-9% on Linear weights (a chain of FP8 GEMMs), 12-18% in MoE layers, where FP8 noise
        # upstream also flips a few near-tied top-k choices of the (fp32) router at init.
        assert rel(p8.grad, p.grad) < (0.12 if n in fp8_weights else 0.25), n


def test_train_config_accepts_fp8_and_the_trainer_converts_the_model(tiny_cfg, tmp_path):
    from tests.test_trainer import ArrayLoader

    with pytest.raises(TrainError, match="fp8"):
        TrainConfig(precision="fp4", steps=1).validate(tiny_cfg)
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2000,))
    tc = TrainConfig(out=str(tmp_path), seq_len=32, batch_size=2, steps=2, eval_every=2, precision="fp8")
    val = lambda: [next(ArrayLoader(tokens, 2, 32))]  # noqa: E731
    trainer = Trainer(tiny_cfg, tc, ArrayLoader(tokens, 2, 32), val, log=lambda *a: None, progress=False)
    assert trainer.precision == "fp8" and isinstance(trainer.model.layers[0].attn.wo, Fp8Linear)
    result = trainer.fit()
    assert result["status"] == "finished" and math.isfinite(result["val_loss"])


# ---- checkpoints -------------------------------------------------------------------------------------------
def test_fp8_checkpoint_round_trip_in_the_released_layout(tiny_cfg, tmp_path):
    # kv_lora 568 + rope 16 = 584 rows: kv_a_proj_with_mqa is ragged in both dimensions
    cfg = tiny_cfg.replace(hidden_size=200, kv_lora_rank=568)
    model = Transformer(cfg, seed=0)
    save_hf(model, tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert stored[kv_a].shape == (584, 200) and stored[kv_a + "_scale_inv"].shape == (5, 2)
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            assert t.dtype == torch.float32
        elif is_fp8_in_release(name):
            assert t.dtype == E4M3 and name + "_scale_inv" in stored
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
        else:  # embedding, head, norms, router, eh_proj, MTP copies
            assert t.dtype == torch.bfloat16, name
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert stored["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16

    back = nanoseek.load(tmp_path)
    ours = dict(nanoseek.hf.hf_tensors(model))
    for name, t in nanoseek.hf.hf_tensors(back):
        if is_fp8_in_release(name):
            want = dequantize_blocks(*quantize_blocks(ours[name]))
        else:
            want = ours[name].to(stored[name].dtype).float()
        assert torch.equal(t, want), name
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    assert rel(back(x).logits, model.eval()(x).logits) < 0.05


# ---- GPU (real FP8 GEMMs) ----------------------------------------------------------------------------------
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="needs a Hopper GPU",
)
@pytest.mark.parametrize("b_block", [128, 1])
def test_cuda_scaled_mm_matches_the_simulation(b_block):
    a, b = torch.randn(256, 512, device="cuda"), torch.randn(384, 512, device="cuda")
    a_q, a_s = quantize_tiles(a)
    b_q, b_s = quantize_blocks(b) if b_block == 128 else quantize_tiles(b)
    got = fp8_mm(a_q, a_s, b_q, b_s, b_block, out_dtype=torch.float32)
    assert rel(got, fp8_gemm_reference(a_q, a_s, b_q, b_s, b_block)) < 1e-3


def test_ablation_precision_group_reuses_the_base_run_and_keys_fp8_apart(tiny_cfg):
    from nanoseek.train.ablate import FP8_VARIANT, TRAIN_OVERRIDES, _run_key, variants

    base, fp8 = variants(tiny_cfg, "precision").values()
    assert base == fp8 == tiny_cfg and TRAIN_OVERRIDES[FP8_VARIANT] == {"precision": "fp8"}
    assert _run_key(base, {}) == _run_key(tiny_cfg)  # the baseline is the run every other group shares
    assert _run_key(fp8, TRAIN_OVERRIDES[FP8_VARIANT]) != _run_key(tiny_cfg)
