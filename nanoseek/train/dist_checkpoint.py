"""Distributed checkpoints with torch.distributed.checkpoint (DCP), and their export to one file.

Every rank writes its own shards in parallel; a checkpoint saved on W ranks resumes on any W' (any expert
parallelism that divides the experts, FSDP2 or DDP, or one plain process): DCP stores each tensor under its
parameter name with its global shape and reads back whatever slice the loading rank owns.

Layout of one checkpoint, RUN_DIR/dcp/step_0000123/:
    .metadata, __<rank>_0.distcp   DCP's files: the model (routing biases included) and AdamW's state, keyed
                                   by parameter name ("flattened" optimizer state: no dependence on how
                                   parameters are grouped on a given world size), plus rank 0's RNG state
    config.json, tokenizer.json    as in a single-process checkpoint (nanoseek/train/checkpoint.py)
    state.json                     written last, by rank 0: format, step, loader position, scalars, the world
                                   it was saved on, and the size of every file (checked on load)
Atomicity as in checkpoint.py: every rank writes into `step_0000123.tmp`; after a barrier rank 0 writes
state.json and renames the folder into place. A crash mid-save leaves only the temp folder.

Expert parallelism keeps each rank's experts as plain [E/ep, ...] tensors; here they are presented to DCP as
DTensors sharded along the expert dimension over the `ep` mesh dimension (and replicated over the expert
replicas), so what is saved is the global [E, ...] tensor. Forgetting this would save E/ep experts under
the full name and silently load one rank's slice everywhere.

`export_single` reads a DCP checkpoint in one process (no process group) and writes a single-file nanoseek
checkpoint (model, AdamW state, loader position): `nanoseek sample`, `nanoseek.load` and a plain
`nanoseek train --resume` take it from there. The shared filesystem: multi-node runs need RUN_DIR on one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from nanoseek.config import ModelConfig
from nanoseek.dist import Parallel
from nanoseek.expert_parallel import ExpertParallelExperts
from nanoseek.hf import CheckpointError
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import save_checkpoint, write_json_atomic
from nanoseek.train.optim import make_optimizer

FORMAT = "nanoseek-dcp-v1"
STATE_FILE = "state.json"
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def dcp_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "dcp"


def list_dcp_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete distributed checkpoints (with a state.json), oldest first."""
    root = dcp_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_dcp_state(ckpt: str | Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: not a distributed checkpoint (no {STATE_FILE})") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{ckpt / STATE_FILE}: corrupt (not valid JSON)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / STATE_FILE}: not a DCP checkpoint (format {meta.get('format')!r})")
    for name, size in meta["files"].items():
        path = ckpt / name
        if not path.exists() or path.stat().st_size != size:
            raise CheckpointError(f"{path}: missing or truncated (expected {size} bytes)")
    return meta


def latest_dcp_checkpoint(run_dir: str | Path, log=print) -> Path | None:
    for ckpt in reversed(list_dcp_checkpoints(run_dir)):
        try:
            read_dcp_state(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None


# ---- state dicts with global names and shapes ----------------------------------------------------------
def _expert_shards(model: torch.nn.Module) -> dict[str, int]:
    """Name of every expert-parallel parameter -> its EP size."""
    return {
        f"{mname}.{pname}": mod.ep
        for mname, mod in model.named_modules()
        if isinstance(mod, ExpertParallelExperts)
        for pname, _ in mod.named_parameters(recurse=False)
    }


def _as_global(t: torch.Tensor, ep: int, parallel: Parallel) -> DTensor:
    shape = (t.shape[0] * ep, *t.shape[1:])
    return DTensor.from_local(
        t,
        parallel.expert_mesh,
        [Replicate(), Shard(0)],
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def _state_dicts(model, optimizer, parallel: Parallel) -> tuple[dict, dict]:
    """Model and flattened optimizer state dicts, expert shards wrapped as global DTensors."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=OPTIONS)
    for name, ep in _expert_shards(model).items():
        model_sd[name] = _as_global(model_sd[name], ep, parallel)
        for key, value in optim_sd.items():
            if key.startswith(f"state.{name}.") and torch.is_tensor(value) and value.dim() > 0:
                optim_sd[key] = _as_global(value, ep, parallel)
    return model_sd, optim_sd


# ---- save / load ---------------------------------------------------------------------------------------
@contextmanager
def _quiet_if_alone(parallel: Parallel):
    """DCP warns whenever it runs without a process group; for one plain process that is the intent."""
    with warnings.catch_warnings():
        if not parallel.joined:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_dcp(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    parallel: Parallel,
    state: dict[str, Any],
    config: dict[str, Any],
    tokenizer_path: str | Path | None = None,
    keep_last: int = 3,
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = dcp_root(run_dir)
    final = root / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp"
    if parallel.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    model_sd, optim_sd = _state_dicts(model, optimizer, parallel)
    payload = {"model": model_sd, "optim": optim_sd, "rng": {"torch": torch.get_rng_state()}}
    with _quiet_if_alone(parallel):
        dcp.save(payload, checkpoint_id=tmp, no_dist=not parallel.joined)
    parallel.barrier()  # every rank's shards are on disk
    if parallel.is_main:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_path is not None and Path(tokenizer_path).exists():
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta = {
            "format": FORMAT,
            "step": step,
            "files": files,
            "world_size": parallel.world_size,
            "ep": parallel.ep,
            "dp": parallel.dp,
            **state,
        }
        write_json_atomic(tmp / STATE_FILE, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in list_dcp_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return final


def load_dcp(
    ckpt: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, parallel: Parallel
) -> dict[str, Any]:
    """Collective: load a DCP checkpoint saved on any world size into this rank's shards. Returns state.json."""
    meta = read_dcp_state(ckpt)
    model_sd, optim_sd = _state_dicts(model, optimizer, parallel)
    rng = {"torch": torch.get_rng_state()}
    with _quiet_if_alone(parallel):
        dcp.load(
            {"model": model_sd, "optim": optim_sd, "rng": rng},
            checkpoint_id=ckpt,
            no_dist=not parallel.joined,
        )
    experts = _expert_shards(model)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=_unwrap(model_sd, experts),
        optim_state_dict=_unwrap(optim_sd, experts),
        options=OPTIONS,
    )
    torch.set_rng_state(rng["torch"])
    return meta


def _unwrap(sd: dict, experts: dict[str, int]) -> dict:
    """Expert entries back to this rank's local tensors (the other DTensors are FSDP2's own)."""
    out = {}
    for k, v in sd.items():
        name = k[len("state.") :].rsplit(".", 1)[0] if k.startswith("state.") else k
        out[k] = v.to_local() if isinstance(v, DTensor) and name in experts else v
    return out


def export_single(ckpt: str | Path, out_dir: str | Path, keep_last: int = 3) -> Path:
    """Read a DCP checkpoint in this one process and write it as a single-file nanoseek checkpoint of run
    `out_dir` (model + AdamW state + loader position), resumable with `nanoseek train --resume`."""
    ckpt = Path(ckpt)
    meta = read_dcp_state(ckpt)
    cfg = ModelConfig.load(ckpt / "config.json")
    model = Transformer(cfg)
    train_cfg = meta.get("train_config", {})
    optimizer = make_optimizer(model, train_cfg.get("lr", 1e-3), train_cfg.get("weight_decay", 0.1))
    load_dcp(ckpt, model, optimizer, Parallel())
    state = {k: v for k, v in meta.items() if k not in ("format", "step", "files")}
    tok = ckpt / "tokenizer.json"
    out = save_checkpoint(
        out_dir,
        meta["step"],
        model,
        optimizer,
        state=state,
        config=cfg.to_dict(),
        tokenizer_path=tok if tok.exists() else None,
        keep_last=keep_last,
    )
    write_json_atomic(Path(out_dir) / "config.json", cfg.to_dict())
    return out
