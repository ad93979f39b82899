"""MTP speculative decoding: the first MTP module drafts one token, one forward of the main model verifies it.

DeepSeek-V3 §5.4.3 (REFERENCE §6): "the MTP module can be used for speculative decoding"; the second token is
accepted 85-90% of the time, for 1.8x tokens per second. Per sequence, with tokens t_0..t_n known and the
cache holding positions 0..n-1:

    draft    d ~ q = MTP_1(h_{n-1}, Emb(t_n))          the MTP module predicts t_{n+1} from position n-1
    verify   main([t_n, d] at positions n, n+1)         one forward of 2 tokens: p_0 (for t_{n+1}) and p_1
    accept   d with probability min(1, p_0(d) / q(d))   (sampling.accept_draft); greedy: iff d = argmax p_0
             accepted: t_{n+1} = d and a bonus t_{n+2} ~ p_1: two tokens for one main forward
             rejected: t_{n+1} ~ norm(max(0, p_0 - q)): one token, as plain decoding would give
    re-draft MTP_1 over positions n, n+1 with (h_n, Emb(t_{n+1})) and (h_{n+1}, Emb(t_{n+2})); the new draft
             comes from the last accepted position.

Each emitted token is distributed exactly as plain decoding's (the rule is lossless, no threshold); greedy output
is the same token sequence as plain greedy decoding.

Two things that are easy to get wrong:
- The MTP module is a full decoder block with its own attention, so it needs its own cache (one layer's worth,
  filled at prefill over every prompt position). Its position i combines h_i with the embedding of t_{i+1}.
- Rejection needs no rollback: a rejected draft's cache entries (main at n+1, MTP at n+1) sit at positions the
  causal mask hides from every later query until the next step overwrites them with the right token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoseek.infer.sampling import (
    SamplingParams,
    accept_draft,
    draw,
    probabilities,
    residual,
    uniforms,
)


class MTPDrafter:
    """Runs MTP module 1 over its own preallocated cache; returns draft logits."""

    def __init__(self, model, max_batch: int, max_len: int, full_kv: bool = False, lean=None):
        if not len(model.mtp):
            raise ValueError("speculative decoding needs an MTP module; this model has none (D = 0)")
        self.model, self.module = model, model.mtp[0]
        self.cache = model.make_cache(max_batch, max_len, full_kv=full_kv, layers=1)[0]
        self.lean = lean  # a LeanDecoder: decode steps run the MTP block through it

    def __call__(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache, absorb: bool, pick
    ) -> torch.Tensor:
        """hidden [B, S, d] (main model, after its final norm), next_ids [B, S] (t_{i+1} for position i),
        positions [B, S]; every position runs (its cache entry is needed later), but only the position
        pick[b] of each row goes through the head: draft logits [B, V] for t_{pick+2}."""
        if absorb and self.lean is not None:
            h = self.lean.mtp_block(self.module, hidden, self.model.embed(next_ids), positions, cache)
            h = h[torch.arange(h.shape[0], device=h.device), pick]  # [B, d]
            return self.lean.logits(self.module.norm(h))
        cos, sin = self.model.rope(positions)
        h, _ = self.module(hidden, self.model.embed(next_ids), cos, sin, positions, cache, absorb)
        h = h[torch.arange(h.shape[0], device=h.device), pick]  # [B, d]
        return self.model.head(self.module.norm(h))


def plain_greedy(params: Sequence[SamplingParams]) -> bool:
    """Whether every request is greedy without a repetition penalty: verification then only compares argmaxes,
    and the drafts' distribution q (their one-hot) is never needed."""
    return all(p.greedy and p.repetition_penalty == 1.0 for p in params)


def verify(
    logits: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accept/reject step for a batch.

    logits [B, 2, V]: the main model at [t_n, d]; drafts [B]; q [B, V]: the distribution each draft was drawn
    from (None when every request is greedy without penalties: q is then the drafts' one-hot); histories: tokens
    so far (for repetition penalties). Returns (accepted [B] bool, first [B], bonus [B]): the next token is
    `first` (= the draft when accepted), followed by `bonus` only where accepted.
    """
    if plain_greedy(params):  # what the general rule computes for one-hot p and q
        first, bonus = logits[:, 0].argmax(-1), logits[:, 1].argmax(-1)
        return first == drafts, first, bonus
    if q is None:
        raise ValueError("verify: q is needed unless every request is greedy without penalties")
    penalties = any(p.repetition_penalty != 1.0 for p in params)
    with_draft = [(*h, d) for h, d in zip(histories, drafts.tolist())] if penalties else histories
    p0 = probabilities(logits[:, 0], params, histories)
    p1 = probabilities(logits[:, 1], params, with_draft)
    u_accept = uniforms(generators, logits.device)
    accepted = accept_draft(p0, q, drafts, u_accept)
    u_next = uniforms(generators, logits.device)
    replacement = draw(residual(p0, q), u_next)
    bonus = draw(p1, u_next)  # one uniform serves both: exactly one of the two is used per row
    first = torch.where(accepted, drafts, replacement)
    return accepted, first, bonus
