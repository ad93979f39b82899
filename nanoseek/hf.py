"""Hugging Face interop: load DeepSeek-V3/V2 checkpoints into our `Transformer`, save ours in their layout.

REFERENCE §2 (name map), §6 (MTP layer), §7 (FP8 `weight_scale_inv`), §8 (transformers specifics).

A Hugging Face checkpoint folder holds `config.json` and safetensors, one `model.safetensors` or shards listed in
`model.safetensors.index.json`. Our names follow DeepSeek's inference code; theirs follow transformers:

    embed.weight                          model.embed_tokens.weight
    layers.{i}.attn_norm / ffn_norm       model.layers.{i}.input_layernorm / post_attention_layernorm
    layers.{i}.attn.wq_a|q_norm|wq_b|wq   ....self_attn.q_a_proj|q_a_layernorm|q_b_proj|q_proj
    layers.{i}.attn.wkv_a|kv_norm|wkv_b   ....self_attn.kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj
    layers.{i}.attn.wo                    ....self_attn.o_proj
    layers.{i}.ffn.w1|w2|w3               ....mlp.gate_proj|down_proj|up_proj         (dense FFN, shared experts)
    layers.{i}.ffn.gate.e_score_bias      ....mlp.gate.e_score_correction_bias
    layers.{i}.ffn.experts.w1 [E, I, d]   ....mlp.experts.{e}.gate_proj.weight        one tensor per expert
    norm.weight, head.weight              model.norm.weight, lm_head.weight
    mtp.{k}.enorm|hnorm|eh_proj|norm      model.layers.{L+k}.enorm|hnorm|eh_proj|shared_head.norm
    mtp.{k}.block.*                       model.layers.{L+k}.self_attn.*, .mlp.*, ... (a full decoder layer)

Easy to get wrong:
- The MTP layer sits at `model.layers.{num_hidden_layers}` and also stores copies of the embedding
  (`embed_tokens`) and output head (`shared_head.head`). We write both copies, as released checkpoints do, and
  on load check them against the main ones instead of loading them (MTP shares Emb and OutHead, V3 §2.2).
  transformers' own model never loads this layer; a checkpoint without it loads here as a model without MTP.
- FP8 weights are `W = W_fp8 * weight_scale_inv` per 128x128 block: a multiply, despite the name, and the last
  block row/column is ragged when a dimension is not a multiple of 128 (kv_a_proj_with_mqa is [576, 7168]).
- Loading is strict: a missing or unexpected tensor, or a shape mismatch, raises `CheckpointError` naming it.
  A silently half-loaded model would give plausible but wrong logits.

Memory: tensors are read one at a time (`safe_open`) and copied into the model, so a load holds one model plus
one tensor; a save holds one shard. Writes go to a temporary file in the same folder, then `os.replace`, so a
crash never leaves a truncated file under a real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig, from_hf_dict, to_hf_dict
from nanoseek.fp8 import BLOCK, block_scale_shape, dequantize_blocks, quantize_blocks
from nanoseek.model.transformer import Transformer

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly; the message names the file or tensor."""


# ---- names ------------------------------------------------------------------------------------------------
# Module paths inside one decoder layer: ours -> Hugging Face's. Leaves (weight) are the same except the bias.
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn.wq_a": "self_attn.q_a_proj",
    "attn.q_norm": "self_attn.q_a_layernorm",
    "attn.wq_b": "self_attn.q_b_proj",
    "attn.wq": "self_attn.q_proj",
    "attn.wkv_a": "self_attn.kv_a_proj_with_mqa",
    "attn.kv_norm": "self_attn.kv_a_layernorm",
    "attn.wkv_b": "self_attn.kv_b_proj",
    "attn.wo": "self_attn.o_proj",
    "ffn.w1": "mlp.gate_proj",
    "ffn.w2": "mlp.down_proj",
    "ffn.w3": "mlp.up_proj",
    "ffn.gate": "mlp.gate",
    "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj",
    "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
}
_LEAF = {"e_score_bias": "e_score_correction_bias"}
_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}  # stacked [E, out, in] -> per-expert
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"}
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


def _block_names(ours: str, prefix: str, n_experts: int) -> list[tuple[str, int | None]]:
    module, leaf = ours.rsplit(".", 1)
    if module == "ffn.experts":
        return [(f"{prefix}.mlp.experts.{e}.{_EXPERT[leaf]}.weight", e) for e in range(n_experts)]
    if module not in _BLOCK:
        raise CheckpointError(f"{ours}: no Hugging Face DeepseekV3 name for this tensor")
    return [(f"{prefix}.{_BLOCK[module]}.{_LEAF.get(leaf, leaf)}", None)]


def hf_names(ours: str, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """Our state-dict name -> [(Hugging Face name, expert index or None)]; stacked experts give E names."""
    if ours in _TOP:
        return [(_TOP[ours], None)]
    kind, idx, rest = ours.split(".", 2)
    if kind == "layers":
        return _block_names(rest, f"model.layers.{idx}", cfg.n_routed_experts)
    if kind == "mtp":
        prefix = f"model.layers.{cfg.num_hidden_layers + int(idx)}"
        if rest.startswith("block."):
            return _block_names(rest.removeprefix("block."), prefix, cfg.n_routed_experts)
        module, leaf = rest.rsplit(".", 1)
        return [(f"{prefix}.{_MTP[module]}.{leaf}", None)]
    raise CheckpointError(f"{ours}: no Hugging Face DeepseekV3 name for this tensor")


def _mtp_copies(model: Transformer) -> dict[str, torch.Tensor]:
    """The MTP layers' duplicate embedding/head tensors -> the main model's tensor they copy."""
    cfg, copies = model.cfg, {}
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}"
        copies[f"{prefix}.embed_tokens.weight"] = model.embed.weight.detach()
        copies[f"{prefix}.shared_head.head.weight"] = model.head.weight.detach()
    return copies


def _state(model: Transformer) -> dict[str, torch.Tensor]:
    """Persistent tensors to transfer. A tied head is the embedding, stored once (as transformers does)."""
    state = model.state_dict(keep_vars=True)
    if model.cfg.tie_word_embeddings:
        state.pop("head.weight")
    return state


# ---- FP8 ---------------------------------------------------------------------------------------------------
# Released V3 layout (REFERENCE §7): these projections are float8_e4m3fn + an fp32 `weight_scale_inv` per 128x128
# block; embed_tokens, lm_head, norms, the router (mlp.gate), eh_proj and shared_head.head are BF16;
# e_score_correction_bias is fp32.
_FP8_PROJECTIONS = (
    "q_a_proj",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}


def dequantize_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)
) -> torch.Tensor:
    """W [out, in] (fp8) times its per-block scale [ceil(out/bo), ceil(in/bi)] -> fp32 (nanoseek.fp8)."""
    expected = block_scale_shape(tuple(w.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
            f"for a {tuple(w.shape)} weight in {block[0]}x{block[1]} blocks"
        )
    return dequantize_blocks(w, scale_inv, block)


def is_fp8_in_release(hf_name: str) -> bool:
    """Is this tensor float8 (+ weight_scale_inv) in DeepSeek-V3's released checkpoint?"""
    module, _, leaf = hf_name.rpartition(".")
    return leaf == "weight" and module.rsplit(".", 1)[-1] in _FP8_PROJECTIONS


def _stored(name: str, t: torch.Tensor, fp8: bool) -> list[tuple[str, torch.Tensor]]:
    """The tensor(s) one of our tensors is written as: itself, or the released FP8 layout's (fp8 + scale | bf16)."""
    if not fp8:
        return [(name, t)]
    if is_fp8_in_release(name):
        q, scale = quantize_blocks(t)
        return [(name, q), (f"{name}_scale_inv", scale)]
    return [(name, t.float() if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16))]


# ---- reading ----------------------------------------------------------------------------------------------
def is_hf_checkpoint(path: str | Path) -> bool:
    """A folder whose config.json names a model_type (ours has none)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _read_config(path: Path) -> tuple[ModelConfig, tuple[int, int]]:
    """ModelConfig and the FP8 weight block size from a Hugging Face config.json."""
    file = path / CONFIG_NAME
    try:
        d = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{file}: not found; a Hugging Face checkpoint folder needs a config.json"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    # transformers fills these YaRN defaults in; our RoPE must see the same numbers (REFERENCE §4).
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
        if rope.get("truncate", True) is not True:
            raise CheckpointError(
                f"{file}: YaRN with truncate=false is not implemented by nanoseek.model.rope"
            )
    q = d.get("quantization_config") or {}
    block = tuple(q.get("weight_block_size") or (128, 128))
    return from_hf_dict(d), block


def _tensor_files(path: Path) -> dict[str, Path]:
    """Every tensor name in the checkpoint -> the safetensors file holding it (headers only, no data read)."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        weight_map = None
        files = [path / SINGLE_NAME] if (path / SINGLE_NAME).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_NAME})")
    where: dict[str, Path] = {}
    for file in files:
        for name in _open(file).keys():
            if name in where:
                raise CheckpointError(f"{name}: stored twice, in {where[name].name} and {file.name}")
            where[name] = file
    if weight_map is not None:
        for name, fname in weight_map.items():
            if where.get(name) != path / fname:
                raise CheckpointError(f"{name}: listed in {INDEX_NAME} under {fname} but not stored there")
    return where


def _open(file: Path):
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on a bad header
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _first_few(names: set[str] | list[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_hf(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a Hugging Face DeepSeek-V3/V2 checkpoint folder into our Transformer (eval mode).

    FP8 weights with a `weight_scale_inv` are dequantized. MTP layers are loaded when present; a checkpoint
    saved by transformers (which drops them) gives a model without MTP, with a warning.
    """
    path = Path(path)
    cfg, block = _read_config(path)
    where = _tensor_files(path)
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{L}.") for n in where):
        warnings.warn(
            f"{path}: config has {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint stores none "
            f"(no model.layers.{L}.*); loading without MTP",
            stacklevel=2,
        )
        cfg = cfg.replace(num_nextn_predict_layers=0)

    # The random init is overwritten below; building in the target dtype avoids a second, fp32 copy.
    with _default_dtype(dtype), torch.device(device):
        model = Transformer(cfg)
    state = _state(model)
    plan = {hf: (ours, e) for ours in state for hf, e in hf_names(ours, cfg)}

    # transformers' DeepseekV2 has no correction bias (softmax routing never used one): it is optional there.
    optional = {
        hf
        for hf, (ours, _) in plan.items()
        if ours.endswith("e_score_bias") and cfg.topk_method != "noaux_tc"
    }
    copies = _mtp_copies(model)
    ignorable = set(copies) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    scales = {n for n in where if n.endswith(".weight_scale_inv") and n.removesuffix("_scale_inv") in plan}
    missing = set(plan) - set(where) - optional
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {_first_few(missing)}")
    unexpected = set(where) - set(plan) - scales - ignorable
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected tensors (the config has no place for them): {_first_few(unexpected)}"
        )

    with contextlib.ExitStack() as stack, torch.no_grad():
        handles = {file: stack.enter_context(_open(file)) for file in sorted(set(where.values()))}

        def read(name: str) -> torch.Tensor:
            try:
                return handles[where[name]].get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{name}: cannot read it from {where[name]} ({e})") from None

        for hf, (ours, e) in plan.items():
            if hf not in where:
                continue  # optional and absent: keep the zeros it was built with
            target = state[ours] if e is None else state[ours][e]
            t = read(hf)
            if t.shape != target.shape:
                raise CheckpointError(
                    f"{hf}: shape {tuple(t.shape)} in the checkpoint, but the config gives {tuple(target.shape)}"
                )
            if f"{hf}_scale_inv" in where:
                t = dequantize_fp8(t, read(f"{hf}_scale_inv"), block)
            elif t.dtype in FP8_DTYPES:
                raise CheckpointError(
                    f"{hf}: stored as {t.dtype} without a weight_scale_inv to dequantize it"
                )
            target.copy_(t)
            del t

        for hf, main in copies.items():
            if hf in where and not torch.equal(read(hf).to(main.dtype), main):
                warnings.warn(
                    f"{hf}: differs from the main model's copy; MTP uses the main one", stacklevel=2
                )
    return model.eval()


# ---- writing ----------------------------------------------------------------------------------------------
def _atomic_write(dest: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` a temporary file beside dest, fsync it, then rename over dest: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json(dest: Path, obj: Any) -> None:
    _atomic_write(dest, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def hf_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor view) for every tensor of the HF layout, MTP copies included. No copies made."""
    cfg, state = model.cfg, _state(model)
    for ours, t in state.items():
        for hf, e in hf_names(ours, cfg):
            yield hf, (t if e is None else t[e]).detach()
    yield from _mtp_copies(model).items()


def save_hf(
    model: Transformer, path: str | Path, *, max_shard_bytes: int = 5 * 2**30, fp8: bool = False
) -> None:
    """Write config.json + safetensors in the Hugging Face DeepseekV3 layout, sharded with an index when large.

    `transformers.AutoModelForCausalLM.from_pretrained(path)` loads the result (it ignores the MTP layer), and
    so does `nanoseek.load(path)`, MTP included. `fp8=True` writes DeepSeek-V3's released layout instead:
    float8_e4m3fn projections with fp32 `weight_scale_inv` per 128x128 block, everything else BF16 (fp32 routing
    bias), and a `quantization_config`; loading it back dequantizes.
    """
    cfg, path = model.cfg, Path(path)
    if cfg.scoring_func != "sigmoid" or cfg.topk_method != "noaux_tc":
        warnings.warn(
            f"transformers' DeepseekV3 always routes with sigmoid/noaux_tc; this {cfg.scoring_func}/{cfg.topk_method} "
            "model reloads exactly with nanoseek.load, but transformers would route it differently",
            stacklevel=2,
        )
    hf_config = to_hf_dict(cfg)
    hf_config["torch_dtype"] = "bfloat16" if fp8 else str(model.embed.weight.dtype).removeprefix("torch.")
    if fp8:
        hf_config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    path.mkdir(parents=True, exist_ok=True)

    # Plan shards from sizes alone (stored shapes/dtypes come from a meta-device dry run), then materialize one
    # shard at a time.
    shards: list[list[str]] = [[]]
    total, used = 0, 0
    for source, view in hf_tensors(model):
        for name, t in _stored(source, view.to("meta"), fp8):
            nbytes = t.numel() * t.element_size()
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(name)
            used, total = used + nbytes, total + nbytes
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    for fname, members in zip(names, shards):
        wanted = set(members)
        tensors = {}
        for source, view in hf_tensors(model):
            if source in wanted or f"{source}_scale_inv" in wanted:
                # A copy: expert slices and MTP copies share storage, which safetensors refuses to write.
                stored = _stored(source, view.to("cpu", copy=True), fp8)
                tensors.update((hf, t.contiguous()) for hf, t in stored if hf in wanted)
        _atomic_write(
            path / fname, lambda tmp, tensors=tensors: save_file(tensors, tmp, metadata={"format": "pt"})
        )
        del tensors

    index = path / INDEX_NAME
    if n > 1:
        weight_map = {hf: fname for fname, members in zip(names, shards) for hf in members}
        _write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        index.unlink(missing_ok=True)
    _write_json(path / CONFIG_NAME, hf_config)
    # Shards of an earlier, differently sharded save in the same folder would otherwise confuse a loader.
    for old in path.glob("model*.safetensors"):
        if old.name not in names and (old.name == SINGLE_NAME or SHARD_PATTERN.fullmatch(old.name)):
            old.unlink()
