"""nanoseek: a from-scratch DeepSeek-V3 in PyTorch.

`nanoseek.load(path)` returns a ready model (eval mode) from a checkpoint folder; `nanoseek.save_hf(model, path)`
writes one in the Hugging Face layout. Both import torch lazily, so `import nanoseek.config` stays light.
"""

from __future__ import annotations

from pathlib import Path


def load(path: str | Path, **kwargs):
    """Load a model from a folder. Today: a Hugging Face DeepSeek-V3/V2 checkpoint (config.json with a
    `model_type` + safetensors); keyword arguments go to `nanoseek.hf.load_hf` (dtype, device)."""
    from nanoseek import hf

    if hf.is_hf_checkpoint(path):
        return hf.load_hf(path, **kwargs)
    raise ValueError(
        f"{path}: not a checkpoint folder nanoseek can load (expected config.json with a model_type)"
    )


def save_hf(model, path: str | Path, **kwargs) -> None:
    """Save a Transformer as a Hugging Face DeepSeek-V3 checkpoint (see `nanoseek.hf.save_hf`)."""
    from nanoseek.hf import save_hf as _save_hf

    _save_hf(model, path, **kwargs)


__all__ = ["load", "save_hf"]
