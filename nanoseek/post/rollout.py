"""Rollouts: G sampled completions per prompt through the inference engine (nanoseek/infer/engine.py).

All B x G requests go to one `Engine` at once, so they are prefilled together and decoded as one batch with
continuous batching: a finished completion frees its slot and the batch shrinks, instead of padding every row to
the longest completion. The engine's cache pool is allocated once and reused across RL steps; it is rebuilt only
when a longer prompt needs more positions. The engine holds the policy by reference and is told that the weights
changed before each rollout, so each rollout sees the current weights.

Two details that matter for the policy gradient:
- A completion that ends on the stop token keeps that token in its ids: the loss must push its probability up
  or down like any other token, or the policy never learns when to stop. `truncated` marks completions that hit
  `max_new_tokens` instead (DAPO's overlong filtering can mask them out of the loss).
- Each request has its own seed derived from (seed, index), so a rollout is reproducible whatever the batch
  composition (the engine samples each row with its own generator), which makes RL runs resumable bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nanoseek.infer import Engine, SamplingParams
from nanoseek.post.chat import PromptFormat


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens; ends with the stop token when generation stopped on it
    text: str  # what the rewards see (PromptFormat.completion_text)
    truncated: bool  # ran into max_new_tokens without stopping


class Sampler:
    """Batched sampling of completions for many prompts with one reusable engine."""

    def __init__(self, model, fmt: PromptFormat, max_new_tokens: int, max_batch: int = 64):
        self.model, self.fmt = model, fmt
        self.max_new_tokens, self.max_batch = max_new_tokens, max_batch
        self.engine: Engine | None = None
        self.generated_tokens = 0  # running total, for throughput logs

    def _engine_for(self, longest_prompt: int) -> Engine:
        need = longest_prompt + self.max_new_tokens
        if self.engine is None or self.engine.max_len < need:
            limit = self.model.cfg.max_position_embeddings
            if need > limit:
                raise ValueError(
                    f"prompt ({longest_prompt} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the "
                    f"model's {limit} positions"
                )
            self.engine = Engine(
                self.model, self.fmt.tokenizer, max_batch=self.max_batch, max_len=min(need + 32, limit)
            )
        return self.engine

    def generate(
        self,
        prompts: Sequence[list[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[Completion]]:
        """n completions for each prompt ([len(prompts)][n]); temperature 0 is greedy."""
        engine = self._engine_for(max(len(p) for p in prompts))
        engine.weights_changed()  # the policy moved since the last rollout
        was_training = self.model.training
        self.model.eval()
        params = [
            SamplingParams(
                max_tokens=self.max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=(seed * 1_000_003 + i) % 2**62,
                stop_token_ids=[self.fmt.stop_id],
                ignore_eos=True,  # the format's stop token is the only one
            )
            for i in range(len(prompts) * n)
        ]
        flat = [p for p in prompts for _ in range(n)]
        try:
            requests = engine.generate(flat, params)
        finally:
            self.model.train(was_training)
        out: list[list[Completion]] = []
        for i, req in enumerate(requests):
            stopped = req.finish_reason == "stop"
            ids = req.output + ([self.fmt.stop_id] if stopped else [])
            self.generated_tokens += len(ids)
            c = Completion(req.prompt, ids, self.fmt.completion_text(ids), truncated=not stopped)
            if i % n == 0:
                out.append([])
            out[-1].append(c)
        return out
