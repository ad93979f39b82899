"""nanoseek: a from-scratch DeepSeek-V3 in PyTorch.

`nanoseek.load(path)` returns a ready model (eval mode) from a checkpoint folder; `nanoseek.save_hf(model, path)`
writes one in the Hugging Face layout. Both import torch lazily, so `import nanoseek.config` stays light.
"""

from __future__ import annotations

from pathlib import Path


def load(path: str | Path, **kwargs):
    """Load a model (eval mode) from a folder: a nanoseek run or checkpoint (newest valid checkpoint, checksums
    verified), or a Hugging Face DeepSeek-V3/V2 checkpoint (config.json with a `model_type` + safetensors).
    Keyword arguments: dtype, device."""
    from nanoseek import hf

    path = Path(path)
    if (path / "checkpoints").is_dir() or (path / "state.json").exists():
        from nanoseek.train.checkpoint import load_model

        return load_model(path, **kwargs)
    if hf.is_hf_checkpoint(path):
        return hf.load_hf(path, **kwargs)
    if (path / "dcp").is_dir():
        raise ValueError(
            f"{path}: a distributed (torchrun) run; `nanoseek export --run {path} --out DIR` writes a checkpoint "
            "that loads here"
        )
    raise ValueError(
        f"{path}: not a folder nanoseek can load (expected a nanoseek run/checkpoint, or config.json with a "
        "model_type + safetensors)"
    )


def save_hf(model, path: str | Path, **kwargs) -> None:
    """Save a Transformer as a Hugging Face DeepSeek-V3 checkpoint (see `nanoseek.hf.save_hf`)."""
    from nanoseek.hf import save_hf as _save_hf

    _save_hf(model, path, **kwargs)


__all__ = ["load", "save_hf"]
