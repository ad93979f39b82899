"""Hugging Face interop (nanoseek/hf.py): parity with transformers' DeepseekV3/V2 in both directions, MTP and
FP8 checkpoints, sharding, atomic writes, and loud failures on anything that does not match exactly.

Models are tiny and random, with every weight drawn at std 0.05 and every norm weight near (not at) 1, so that a
swapped or mis-mapped tensor changes the logits. The router bias is random too, so it changes expert choices.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.hf import CheckpointError, dequantize_fp8, save_hf
from nanoseek.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

TOL = 1e-4  # float32 max |logit difference|
GEN_TOKENS = 32


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()  # unexpected-MTP-keys reports and progress bars
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*MTP layer.*stores none")
        yield


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.1 * noise if "norm" in name else std * noise)
    for name, b in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "e_score_bias")):
            b.copy_(0.1 * torch.randn(b.shape, generator=g))  # sigmoid scores stay positive


def tiny_hf(**overrides) -> dict:
    d = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    d.update(overrides)
    return d


def yarn(factor, orig, **extra) -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": factor,
        "original_max_position_embeddings": orig,
        **extra,
    }


HF_CASES = {
    # q_lora, 4 groups keep 2, random bias, YaRN with mscale != mscale_all_dim (cos/sin factor and softmax mscale^2)
    "v3_groups_yarn_mscale": (
        DeepseekV3Config,
        tiny_hf(rope_parameters=yarn(4.0, 64, mscale=0.8, mscale_all_dim=0.7)),
    ),
    # plain wq, one group, no YaRN, scale 1, two dense layers, unnormalized gate weights
    "v3_no_q_lora": (
        DeepseekV3Config,
        tiny_hf(
            q_lora_rank=None,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            first_k_dense_replace=2,
            norm_topk_prob=False,
        ),
    ),
    # the released V3 recipe: mscale = mscale_all_dim = 1 (no cos/sin factor), beta_fast/slow given
    "v3_yarn_like_release": (
        DeepseekV3Config,
        tiny_hf(
            n_group=8,
            topk_group=3,
            num_experts_per_tok=6,
            rope_parameters=yarn(40.0, 16, mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1),
            max_position_embeddings=640,
        ),
    ),
    # YaRN factor only: cos/sin scaled by mscale(factor), no softmax mscale^2
    "v3_yarn_factor_only": (
        DeepseekV3Config,
        tiny_hf(rope_parameters=yarn(8.0, 32), max_position_embeddings=256),
    ),
    # DeepSeek-V2: softmax router, group-limited greedy, no correction bias
    "v2_group_limited": (
        DeepseekV2Config,
        tiny_hf(
            topk_method="group_limited_greedy",
            routed_scaling_factor=3.0,
            norm_topk_prob=False,
            rope_parameters=yarn(4.0, 64, mscale=0.707, mscale_all_dim=0.707),
        ),
    ),
}


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding with our latent cache (the absorbed MLA path), one token per step."""
    B, T = prompt.shape
    cache = model.make_cache(B, T + n)
    logits = model(prompt, positions=torch.arange(T).expand(B, T), cache=cache).logits[:, -1]
    out = []
    for i in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, positions=torch.full((B, 1), T + i), cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


@torch.no_grad()
def hf_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    model.generation_config.eos_token_id = None  # never stop early: compare all n tokens
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, prompt.shape[1] :]


@pytest.mark.parametrize("case", list(HF_CASES))
def test_load_hf_checkpoint_matches_transformers_logits_and_greedy_generation(case, tmp_path):
    config_cls, kwargs = HF_CASES[case]
    hf = (DeepseekV3ForCausalLM if config_cls is DeepseekV3Config else DeepseekV2ForCausalLM)(
        config_cls(**kwargs)
    )
    randomize_(hf.eval(), seed=1)
    hf.save_pretrained(tmp_path)

    ours = nanoseek.load(tmp_path)
    assert not ours.training and len(ours.mtp) == 0  # transformers saves no MTP layer
    ids = torch.randint(0, kwargs["vocab_size"], (2, 40))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids).logits
    diff = (ref - got).abs().max().item()
    print(f"{case}: HF -> nanoseek max |dlogit| = {diff:.2e} (max |logit| {ref.abs().max():.2f})")
    assert ref.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    assert diff < TOL

    prompt = ids[:1, :8]
    assert torch.equal(greedy(ours, prompt, GEN_TOKENS), hf_greedy(hf, prompt, GEN_TOKENS))


def tiny_ours(**overrides) -> ModelConfig:
    d = {k: v for k, v in tiny_hf().items() if k not in ("rope_parameters", "num_key_value_heads")}
    d.update(
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "mscale": 0.8,
            "mscale_all_dim": 0.7,
            "original_max_position_embeddings": 64,
        },
        num_nextn_predict_layers=1,
    )
    d.update(overrides)
    return ModelConfig(**d).validate()


OURS_CASES = {
    "groups_yarn_mtp_sharded": (tiny_ours(), 200_000),
    "no_q_lora_tied_single_file": (
        tiny_ours(
            q_lora_rank=0,
            rope_scaling=None,
            tie_word_embeddings=True,
            num_nextn_predict_layers=0,
            n_group=1,
            topk_group=1,
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", list(OURS_CASES))
def test_save_hf_loads_in_transformers_with_the_same_logits(case, tmp_path):
    cfg, shard = OURS_CASES[case]
    ours = Transformer(cfg).eval()
    randomize_(ours, seed=2)
    save_hf(ours, tmp_path, **({"max_shard_bytes": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref, got = ours(ids).logits, hf(ids).logits
    diff = (ref - got).abs().max().item()
    print(f"{case}: nanoseek -> HF max |dlogit| = {diff:.2e} (max |logit| {ref.abs().max():.2f})")
    assert ref.abs().max() > 0.5
    assert diff < TOL
    prompt = ids[:1, :8]
    assert torch.equal(greedy(ours, prompt, GEN_TOKENS), hf_greedy(hf, prompt, GEN_TOKENS))


def test_mtp_layers_round_trip_in_the_released_layout(tmp_path):
    cfg = tiny_ours(num_nextn_predict_layers=2, num_hidden_layers=2)
    ours = Transformer(cfg)
    randomize_(ours, seed=3)
    save_hf(ours, tmp_path)

    keys = set(load_file(tmp_path / "model.safetensors"))
    for k in (2, 3):  # model.layers.{num_hidden_layers + depth}
        p = f"model.layers.{k}"
        for name in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.kv_b_proj.weight",
            "mlp.gate.e_score_correction_bias",
            "mlp.experts.15.down_proj.weight",
            "mlp.shared_experts.up_proj.weight",
        ):
            assert f"{p}.{name}" in keys
    assert not any(k.startswith("model.layers.4.") for k in keys)

    back = nanoseek.load(tmp_path)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        out_a, out_b = ours(ids, targets=ids), back(ids, targets=ids)
    assert len(out_b.mtp_logits) == 2 and torch.equal(out_a.mtp_logits[1], out_b.mtp_logits[1])


def test_a_changed_mtp_copy_of_the_embedding_warns(tmp_path):
    ours = Transformer(tiny_ours(num_hidden_layers=2))
    save_hf(ours, tmp_path)
    edit_tensors(
        tmp_path, lambda t: t.__setitem__("model.layers.2.embed_tokens.weight", torch.zeros(512, 64))
    )
    with pytest.warns(UserWarning, match=r"model\.layers\.2\.embed_tokens\.weight: differs"):
        nanoseek.load(tmp_path)


# ---- FP8 ----------------------------------------------------------------------------------------------------
def quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer, block by block: scale = amax/448, W_fp8 = W/scale (DeepSeek's weight_scale_inv)."""
    n_o, n_i = -(-w.shape[0] // block), -(-w.shape[1] // block)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(n_o, n_i)
    for i in range(n_o):
        for j in range(n_i):
            blk = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (blk / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return q, scale


def reference_dequant(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= scale[i, j]
    return out


def assert_within_fp8_error(w, deq, scale, block=128):
    """e4m3 keeps 3 mantissa bits: |error| <= |w|/16 for normals, <= scale * 2^-10 for subnormals."""
    s = scale.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    assert ((deq - w).abs() <= (w.abs() / 16 + s * 2**-10) * 1.001 + 1e-12).all()


@pytest.mark.parametrize("shape", [(576, 200), (128, 128), (129, 257), (3, 5)])
def test_dequantize_fp8_handles_ragged_blocks(shape):
    w = torch.randn(shape) * torch.logspace(-3, 0, shape[1])  # blocks with very different ranges
    q, scale = quantize_blockwise(w)
    deq = dequantize_fp8(q, scale)
    assert deq.dtype == torch.float32
    assert torch.equal(deq, reference_dequant(q, scale))
    assert_within_fp8_error(w, deq, scale)
    with pytest.raises(CheckpointError, match="weight_scale_inv has shape"):
        dequantize_fp8(q, scale[:, :-1] if scale.shape[1] > 1 else scale[:-1])


# Kept in high precision in released checkpoints (REFERENCE §7): embedding, head, norms, router, eh_proj.
def _is_fp8_in_release(name: str, t: torch.Tensor) -> bool:
    keep = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "eh_proj", "shared_head.head")
    return t.dim() == 2 and not any(k in name for k in keep)


def test_load_dequantizes_fp8_checkpoints(tmp_path):
    # kv_lora_rank 568 + rope 8 = 576 rows over hidden 200 columns: kv_a_proj_with_mqa is [576, 200], ragged both ways
    cfg = tiny_ours(hidden_size=200, kv_lora_rank=568, num_hidden_layers=2, q_lora_rank=0, vocab_size=256)
    ours = Transformer(cfg)
    randomize_(ours, seed=4)
    save_hf(ours, tmp_path)

    tensors = load_file(tmp_path / "model.safetensors")
    expected = {}
    for name in list(tensors):
        if _is_fp8_in_release(name, tensors[name]):
            q, scale = quantize_blockwise(tensors[name])
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            expected[name] = reference_dequant(q, scale)
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].shape == (576, 200)
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    back = nanoseek.load(tmp_path)
    got = dict(nanoseek.hf.hf_tensors(back))
    original = dict(nanoseek.hf.hf_tensors(ours))
    for name, deq in expected.items():
        assert torch.equal(got[name], deq), name
        scale = tensors[name + "_scale_inv"]
        assert_within_fp8_error(original[name], got[name], scale)
    assert torch.equal(got["model.embed_tokens.weight"], original["model.embed_tokens.weight"])

    # an fp8 weight whose scale is missing cannot be used as is
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj\.weight: stored as torch\.float8_e4m3fn without"):
        nanoseek.load(tmp_path)


# ---- sharding and atomic writes -------------------------------------------------------------------------------
def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    ours = Transformer(tiny_ours())
    randomize_(ours, seed=5)
    save_hf(ours, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    on_disk = {k: v for s in shards for k, v in load_file(tmp_path / s).items()}
    assert index["weight_map"].keys() == on_disk.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    assert not (tmp_path / "model.safetensors").exists()

    back = nanoseek.load(tmp_path)
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k

    # saving again unsharded into the same folder removes the old shards and index
    save_hf(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    nanoseek.load(tmp_path)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    ours = Transformer(tiny_ours(num_nextn_predict_layers=0))
    save_hf(ours, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nanoseek.hf, "save_file", crash)
    with torch.no_grad():
        ours.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_hf(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert (tmp_path / "model.safetensors").read_bytes() == before
    nanoseek.load(tmp_path)


# ---- loud failures -----------------------------------------------------------------------------------------------
def edit_tensors(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.fixture
def saved(tmp_path):
    save_hf(Transformer(tiny_ours(num_hidden_layers=2)), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    edit_tensors(saved, lambda t: t.pop("model.layers.1.mlp.experts.7.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.7\.up_proj\.weight"
    ):
        nanoseek.load(saved)


def test_missing_mtp_part_is_named(saved):
    edit_tensors(saved, lambda t: t.pop("model.layers.2.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.eh_proj\.weight"):
        nanoseek.load(saved)


def test_wrong_shape_is_named(saved):
    edit_tensors(
        saved, lambda t: t.__setitem__("model.layers.0.self_attn.kv_b_proj.weight", torch.zeros(128, 17))
    )
    with pytest.raises(
        CheckpointError, match=r"kv_b_proj\.weight: shape \(128, 17\) in the checkpoint.*\(128, 16\)"
    ):
        nanoseek.load(saved)


def test_unexpected_tensor_is_named(saved):
    edit_tensors(
        saved, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(96, 64))
    )
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors.*model\.layers\.0\.self_attn\.q_proj\.weight"
    ):
        nanoseek.load(saved)


def test_truncated_or_corrupt_safetensors_file_is_named(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        nanoseek.load(saved)
    file.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json" + data[100:])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        nanoseek.load(saved)


def test_index_pointing_at_the_wrong_shard_is_caught(tmp_path):
    save_hf(Transformer(tiny_ours(num_nextn_predict_layers=0)), tmp_path, max_shard_bytes=100_000)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    elsewhere = next(s for s in shards if s != index["weight_map"]["model.norm.weight"])
    index["weight_map"]["model.norm.weight"] = elsewhere
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model\.norm\.weight: listed in model\.safetensors\.index\.json"
    ):
        nanoseek.load(tmp_path)


def test_non_deepseek_config_is_rejected(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type.*llama"):
        nanoseek.load(saved)
    os.remove(saved / "config.json")
    with pytest.raises(ValueError, match="not a folder nanoseek can load"):
        nanoseek.load(saved)


def test_save_hf_refuses_attention_without_an_hf_layout(tmp_path):
    with pytest.raises(ValueError, match="attention"):
        save_hf(Transformer(tiny_ours(attention="mha", num_nextn_predict_layers=0)), tmp_path)
