"""Shared pieces of the post-training tests: a tokenizer that knows digits and the task words, a small model
saved as a nanoseek run folder, and reward functions loadable by import path (`post_helpers:digit_reward`)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from nanoseek.config import get_preset
from nanoseek.model import Transformer
from nanoseek.post.tasks import make_task
from nanoseek.train.checkpoint import save_checkpoint

VOCAB = 384


@functools.cache
def tokenizer():
    from nanoseek.tokenizer import train_tokenizer

    text = [p.prompt + p.solution() for p in make_task("add+mul:digits=2+countdown").problems("train", 200)]
    tok = train_tokenizer(text * 4, vocab_size=VOCAB)
    assert tok.vocab_size <= VOCAB
    return tok


def small_cfg(**changes):
    cfg = get_preset("tiny").replace(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=2,
        max_position_embeddings=256,
        num_nextn_predict_layers=0,
    )
    return cfg.replace(**changes)


def save_run(path: Path, model: Transformer | None = None) -> Path:
    """A run folder (one checkpoint + tokenizer.json) that `nanoseek.infer.load` accepts."""
    model = model or Transformer(small_cfg(), seed=0)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer().save(path / "tokenizer.json")
    save_checkpoint(path, 0, model, config=model.cfg.to_dict(), tokenizer_path=path / "tokenizer.json")
    return path


def one_thread():
    """Tiny models run faster on one thread, far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


# ---- user reward functions, loaded by import path in the tests ------------------------------------------------
def digit_reward(prompts, completions, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def raising_reward(prompts, completions, **fields):
    raise RuntimeError("this reward always fails")


def picky_reward(prompts, completions, **fields):
    """Raises on batches holding a completion that starts with 'x'; fine otherwise."""
    if any(c.startswith("x") for c in completions):
        raise ValueError("cannot score completions starting with x")
    return [1.0] * len(completions)


def constant_reward(prompts, completions, **fields):
    return [1.0] * len(completions)


NOT_CALLABLE = 3
