"""From logits to tokens: greedy, temperature, top-k, top-p, repetition penalty, per-request seeds, logprobs,
and the speculative-sampling accept/reject rule.

Everything works on a batch of rows [B, V], one row per request, each with its own `SamplingParams`, so one
decode step samples every running request with a handful of tensor ops. The order of the logit transforms is
the usual one (Hugging Face's and vLLM's): repetition penalty -> temperature -> top-k -> top-p -> softmax.

- Repetition penalty (Keskar et al. 2019, CTRL §4.1): a logit of a token already in the prompt or output is
  divided by the penalty when positive and multiplied by it when negative, so it always moves towards "less
  likely". A penalty of 1 is off.
- Greedy is temperature 0. Its distribution is the one-hot of the argmax, which makes the speculative rule below
  reduce exactly to "accept the draft iff it equals the argmax" with no special case.
- Each request draws its random numbers from its own `torch.Generator`, seeded by `seed` when given: a seeded
  request gives the same tokens whatever else is in the batch. A token is drawn by inverting the CDF with one
  uniform number per row, so the whole batch is sampled with one `searchsorted`.
- Logprobs are those of the model's raw distribution (log_softmax of the logits before any transform), as the
  OpenAI API reports them, whatever the sampling settings.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): a draft token d ~ q is accepted with probability
min(1, p(d) / q(d)); on rejection the token is drawn from norm(max(0, p - q)). The emitted token is then
distributed exactly as p, whatever q is: the draft only changes speed, never the output distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """A sampling setting out of range (reported with the field's name)."""


@dataclass
class SamplingParams:
    """How one request is decoded. Validated once by `validate`, trusted afterwards."""

    max_tokens: int = 256  # new tokens at most (stop tokens count)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set with probability mass >= top_p (1 = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already seen (1 = off)
    seed: int | None = None  # None: a fresh random seed
    stop: Sequence[str] = ()  # stop strings: generation ends before the first occurrence
    stop_token_ids: Sequence[int] = ()  # token ids that end generation (excluded from the output)
    ignore_eos: bool = False  # keep going past the tokenizer's EOS (benchmarks)
    logprobs: int | None = None  # None: off; n >= 0: the chosen token's logprob and the n most likely

    def validate(self) -> SamplingParams:
        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise SamplingError(f"{name}: {message}")

        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        check(_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = off)")
        check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0 (1 = off)",
        )
        check(self.seed is None or _is_int(self.seed), "seed", "must be an integer")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be a list of non-empty strings")
        check(all(_is_int(t) for t in self.stop_token_ids), "stop_token_ids", "must be integers")
        check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
            "logprobs",
            "must be an integer in [0, 20]",
        )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return gen


# ---- logits -> distribution --------------------------------------------------------------------------------
def apply_repetition_penalty(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]]
) -> torch.Tensor:
    """logits [B, V] (fp32, modified in place) with each row's seen tokens penalized."""
    for b, (p, seen) in enumerate(zip(params, histories)):
        if p.repetition_penalty == 1.0 or not seen:
            continue
        ids = torch.as_tensor(list(set(seen)), device=logits.device)
        row = logits[b, ids]
        logits[b, ids] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
    return logits


def probabilities(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The distribution each row samples from, [B, V] fp32: one-hot argmax for greedy rows."""
    logits = apply_repetition_penalty(logits.float().clone(), params, histories)
    B, V = logits.shape
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    logits = logits / temperature.unsqueeze(1)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(0 < k < V for k in top_k) or any(p < 1 for p in top_p):
        logits = _truncate(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), onehot, probs)
    return probs


def _truncate(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p drop, with one sort for the whole batch (a top-k without top-p
    needs only the k-th largest logit of each row)."""
    B, V = logits.shape
    if all(p >= 1 for p in top_p):
        k = torch.tensor([kk if 0 < kk < V else V for kk in top_k], device=logits.device)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
        return logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th are kept, as in HF
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device).expand(B, V)
    k = torch.tensor([kk if 0 < kk < V else V for kk in top_k], device=logits.device)
    drop = rank >= k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # A token is kept while the mass *before* it is < top_p: the most likely token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= torch.tensor(top_p, device=logits.device).unsqueeze(1)
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


# ---- drawing -----------------------------------------------------------------------------------------------
def uniforms(generators: Sequence[torch.Generator], device=None) -> torch.Tensor:
    """One U[0, 1) number per row, each from the row's own generator: [B]."""
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators]).to(device)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Invert each row's CDF at u [B]: tokens [B]. Never returns a zero-probability token."""
    cdf = probs.cumsum(dim=-1)
    x = (u * cdf[:, -1]).unsqueeze(1)  # scaled by the row total, so rounding in the cumsum cannot overshoot
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens [B], the distribution they were drawn from [B, V], or None on the all-greedy fast path)."""
    if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
        return logits.argmax(dim=-1), None  # what draw() would return for one-hot rows, minus the work
    probs = probabilities(logits, params, histories)
    return draw(probs, uniforms(generators, probs.device)), probs


# ---- speculative sampling ----------------------------------------------------------------------------------
def accept_draft(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept draft[b] ~ q[b] with probability min(1, p[b, d] / q[b, d]): bool [B]."""
    p_d = p.gather(1, draft.unsqueeze(1)).squeeze(1)
    q_d = q.gather(1, draft.unsqueeze(1)).squeeze(1)
    return u * q_d < p_d  # u < p/q without dividing; a greedy draft has q_d = 1


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), the distribution of the replacement token after a rejection, [B, V]."""
    r = (p - q).clamp_min(0)
    total = r.sum(dim=-1, keepdim=True)
    # total is 0 only if p == q, where a rejection cannot happen; fall back to p against rounding.
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


# ---- logprobs ----------------------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely tokens of the raw distribution, best first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: Sequence[int | None]) -> list:
    """Per row: a TokenLogprob, or None where the request did not ask for logprobs."""
    if all(n is None for n in top_n):
        return [None] * len(top_n)
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k = max(n or 0 for n in top_n)
    top_v, top_i = logp.topk(k, dim=-1) if k else (None, None)
    out = []
    for b, n in enumerate(top_n):
        if n is None:
            out.append(None)
            continue
        top = list(zip(top_i[b, :n].tolist(), top_v[b, :n].tolist())) if n else []
        out.append(TokenLogprob(int(tokens[b]), chosen[b], top))
    return out
