"""Checkpoints that lose nothing: atomic, verified, resumable bit-for-bit. Safetensors only, never pickle.

Layout of one checkpoint, `RUN_DIR/checkpoints/step_000123/`:
    model.safetensors   every parameter and persistent buffer (the routing biases included)
    optim.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"; RNG states as uint8
    config.json         the ModelConfig
    tokenizer.json      a copy of the run's tokenizer (if any), so a checkpoint folder stands alone
    state.json          written last: step, scalars, data-loader position, optimizer param_groups, and the
                        sha256 of every other file (checked on load)

Atomicity: everything is written into `step_000123.tmp-<pid>`, each file fsync'ed, then the folder is renamed
into place (`os.replace`) and the parent fsync'ed. A crash or a full disk midway leaves only a temp folder,
which is removed; the previous checkpoint is untouched. Only then are old checkpoints beyond `keep_last` pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.config import ModelConfig
from nanoseek.hf import CheckpointError
from nanoseek.model import Transformer

STATE_FILE = "state.json"
FORMAT = "nanoseek-checkpoint-v1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict ready for safetensors: contiguous, and a tied head stored once (as embed.weight)."""
    sd = model.state_dict()
    if getattr(getattr(model, "cfg", None), "tie_word_embeddings", False):
        sd.pop("head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} (different model config?)")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def _optim_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            tensors[f"{idx}.{name}"] = t.detach().contiguous()
    return tensors, sd["param_groups"]


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    tokenizer_path: str | Path | None = None,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` atomically; returns its folder. Raises CheckpointError (no partial files left)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        files = {"model.safetensors": None}
        save_file(model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        param_groups = None
        opt_tensors = _rng_tensors()
        if optimizer is not None:
            t, param_groups = _optim_tensors(optimizer)
            opt_tensors.update(t)
        save_file(opt_tensors, str(tmp / "optim.safetensors"))
        files["optim.safetensors"] = None
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            files["config.json"] = None
        if tokenizer_path is not None and Path(tokenizer_path).exists():
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            files["tokenizer.json"] = None
        for name in files:
            _fsync(tmp / name)
            files[name] = _sha256(tmp / name)
        meta = {"format": FORMAT, "step": step, "files": files, "param_groups": param_groups, **(state or {})}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final}: {e.strerror or e} (previous checkpoints kept)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckpt_root, keep_last)
    return final


RUN_LOGS = ("metrics.jsonl", "samples.jsonl")  # appended to step by step; the reports are drawn from them
PREVIOUS = "previous"  # RUN_DIR/previous/: the earlier run's logs and checkpoints, after a fresh start


def start_run_dir(run_dir: str | Path, step: int, log=print) -> None:
    """Make RUN_DIR's step logs describe this run alone, before it logs its first step.

    A fresh start (step 0) in a folder holding an earlier run moves that run's logs and checkpoints into
    RUN_DIR/previous/, so its records do not mix into this run's report and plots, and a forgotten --resume loses
    no work. What an even earlier fresh start left in previous/ moves on to previous.1/ (and previous.1/ to
    previous.2/, ...): a second forgotten --resume loses nothing either. A run resumed at step k drops the log records
    past step k: the steps the interruption lost, which are about to run again."""
    run_dir = Path(run_dir)
    logs = [run_dir / name for name in RUN_LOGS if (run_dir / name).exists()]
    if step == 0:
        earlier = logs + ([run_dir / "checkpoints"] if (run_dir / "checkpoints").is_dir() else [])
        if not earlier:
            return
        previous = run_dir / PREVIOUS
        _rotate(previous)
        previous.mkdir()
        for path in earlier:
            os.replace(path, previous / path.name)
        log(f"starting afresh: the earlier run's logs and checkpoints in {run_dir} moved to {previous}")
        return
    for path in logs:
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) < len(lines):
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)


def _rotate(previous: Path) -> None:
    """previous.N -> previous.N+1 for every N, then previous -> previous.1, like logrotate: nothing is deleted."""
    if not previous.exists():
        return
    n = 1
    while previous.with_name(f"{previous.name}.{n}").exists():
        n += 1
    for k in range(n - 1, 0, -1):
        os.replace(previous.with_name(f"{previous.name}.{k}"), previous.with_name(f"{previous.name}.{k + 1}"))
    os.replace(previous, previous.with_name(f"{previous.name}.1"))


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a half-written last line: the interruption cut it, drop it


def prune(ckpt_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(ckpt_root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_state(ckpt: str | Path, verify: bool = True) -> dict[str, Any]:
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: not a checkpoint (no {STATE_FILE})") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{ckpt / STATE_FILE}: corrupt (not valid JSON)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / STATE_FILE}: unknown checkpoint format {meta.get('format')!r}")
    if verify:
        for name, digest in meta["files"].items():
            path = ckpt / name
            if not path.exists():
                raise CheckpointError(f"{path}: missing from checkpoint")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path}: checksum mismatch (file corrupt or modified)")
    return meta


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def load_checkpoint(
    ckpt: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Verify and load a checkpoint into model (+ optimizer, RNG). Returns state.json's contents."""
    ckpt = Path(ckpt)
    meta = read_state(ckpt)
    load_model_tensors(model, _load_safetensors(ckpt / "model.safetensors"), str(ckpt / "model.safetensors"))
    extra = _load_safetensors(ckpt / "optim.safetensors")
    if optimizer is not None and meta.get("param_groups") is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in extra.items():
            if key.startswith("rng."):
                continue
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = t
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if restore_rng:
        torch.set_rng_state(extra["rng.torch"])
        cuda_states = [extra[k] for k in sorted(extra) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    return meta


def latest_valid_checkpoint(run_dir: str | Path, log=print) -> Path | None:
    """Newest checkpoint that verifies; a corrupt newer one is reported and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            read_state(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint that verifies)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint folder")
    skipped: list[str] = []
    ckpt = latest_valid_checkpoint(path, log=skipped.append)
    if ckpt is None:
        why = f" ({skipped[0].removeprefix('warning: skipping ')})" if skipped else ""
        if not skipped and any(path.glob("dcp/*/.metadata")):
            why = " (a distributed checkpoint: `nanoseek export --run RUN --out DIR` makes it one file)"
        raise CheckpointError(f"{path}: no valid checkpoint in this run folder{why}")
    for line in skipped:  # an older checkpoint stands in for a corrupt newer one: say so, never silently
        print(f"nanoseek: {line}; using {ckpt.name}", file=sys.stderr)
    return ckpt


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """The model of a run (newest valid checkpoint) or of one checkpoint folder, verified, in eval mode."""
    ckpt = resolve_checkpoint(path)
    read_state(ckpt)  # checksums first: never build a model from a corrupt file
    cfg = ModelConfig.load(ckpt / "config.json")
    with torch.device(device):
        model = Transformer(cfg)  # init is overwritten; building for real keeps non-persistent buffers right
    load_model_tensors(model, _load_safetensors(ckpt / "model.safetensors"), str(ckpt / "model.safetensors"))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
