"""Small models for the inference tests (imported by tests/test_engine.py, tests/test_server.py, ...).

- `random_model`: untrained; enough where only shapes, plumbing and equivalences matter. Its init std is raised
  so that logits are peaked: greedy comparisons between two computation orders then never hinge on a near-tie.
- `counting_model`: trained for a few dozen steps on "count upwards by one" sequences, so the main model and
  its MTP module both predict well; speculative decoding then accepts most drafts and both of its branches
  (accept and reject) run.
"""

from __future__ import annotations

import functools

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model import Transformer

VOCAB = 320


def small_cfg(**changes):
    cfg = get_preset("tiny").replace(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    return cfg.replace(**changes)


def random_model(**changes) -> Transformer:
    return Transformer(small_cfg(initializer_range=0.08, **changes), seed=0).eval()


@functools.cache
def counting_model(steps: int = 30) -> Transformer:
    """Learns t_{i+1} = t_i + 1 (mod 256, offset past the special tokens): ~3 s on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and much faster on a busy machine
    try:
        torch.manual_seed(0)
        model = Transformer(small_cfg(initializer_range=0.02), seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            start = torch.randint(0, 256, (16, 1), generator=gen)
            seq = 32 + (start + torch.arange(33)) % 256  # [16, 33]
            loss = model(seq[:, :-1], targets=seq[:, 1:]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.update_balance_bias()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
) * 4


@functools.cache
def tokenizer():
    """A byte-level BPE of at most VOCAB tokens with nanoseek's special tokens (trained in well under 1 s)."""
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT] * 8, vocab_size=VOCAB)
    assert tok.vocab_size <= VOCAB
    return tok


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread runs them faster, and far faster on a busy shared machine
    (two threads wait on each other at every small matmul). Import this fixture into a test module to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
