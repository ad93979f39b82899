"""The inference engine: a fixed pool of cache slots, continuous batching, prefill + absorbed decode, streaming.

Memory is allocated once: every layer's cache holds `max_batch` rows (slots) of `max_len` positions. For MLA
that is the latent cache of DeepSeek-V2 §2.1 / V3 eqs 1-11: `kv_lora_rank + qk_rope_head_dim` numbers per token
per layer (REFERENCE §3), so `Engine.bytes_per_token` equals the theory exactly; MHA/GQA models get full K/V.

A request's life:
    add()      -> waiting queue
    prefill    the prompt runs through the lean step (lean.py, where it covers the model and attention's scores
               stay small) or else the training path (`absorb=False`: SDPA over expanded K/V); either writes its
               latent cache into the request's slot. The first token is sampled from its last logits (the lean
               path computes no others).
               Several prompts are prefilled in one forward, right-padded: a pad only ever follows the real
               tokens, so the causal mask keeps it out of every real token's attention.
    decode     one token per running request per step through the absorbed path over the cache; rows sit at
               different positions (ragged), each masked to its own length.
    finish     EOS / stop token / stop string / max_tokens / cancel: the slot is freed at once.

Continuous batching: requests join (prefill) and leave (finish) between decode steps. The running requests
always occupy slots 0..n-1 (`running[i].slot == i`), so a decode step passes the pool's cache unchanged and the
model reads rows [:n]. When request i finishes, the request in the last slot moves into slot i (a copy of its
written positions in every layer: O(its length), once per finished request).

Stop strings are matched on the decoded text; streamed text holds back any tail that could still become a stop
string (and any incomplete UTF-8 character), so a stop string never leaks to a streaming client.

With `speculative=True`, decoding drafts one token with the MTP module and verifies it in the same forward
(`nanoseek/infer/speculative.py`). The engine is single-threaded; the server drives it from one thread.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.infer.lean import LeanDecoder
from nanoseek.infer.lean import supports as lean_supports
from nanoseek.infer.sampling import SamplingParams, TokenLogprob, make_generator, sample, token_logprobs
from nanoseek.infer.speculative import MTPDrafter, plain_greedy, verify

DEFAULT_MAX_LEN = 2048  # a released config allows 163,840 positions; preallocating that is rarely wanted


class EngineError(ValueError):
    """A request the engine cannot serve (prompt too long for the cache, bad token ids, ...)."""


@dataclass(eq=False)
class Request:
    """One generation. Its fields after `finished` are the result; `text` needs the engine's tokenizer."""

    id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    generator: torch.Generator
    output: list[int] = field(default_factory=list)  # generated tokens, stop token excluded
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_generated: int = 0  # tokens sampled, stop token included (the usage count)
    text: str = ""  # decoded output, cut before a stop string
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    created: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    # engine state
    slot: int = -1
    n_cached: int = 0  # positions 0..n_cached-1 of the slot hold this sequence's cache
    last: int = -1  # the newest token, not yet in the cache
    emitted: int = 0  # characters of `text` already streamed
    draft: int = -1  # speculative: the MTP draft for the token after `last`
    draft_q: torch.Tensor | None = None  # ... and the distribution it was drawn from [V]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def history(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class Delta:
    """What one step added to one request: the unit of streaming."""

    request: Request
    tokens: list[int]
    text: str
    logprobs: list[TokenLogprob | None]
    finished: bool


@dataclass
class EngineStats:
    requests_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    draft_tokens: int = 0  # speculative: drafts proposed
    accepted_tokens: int = 0  # ... and accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class Engine:
    """Continuous-batching generation over a preallocated cache pool. Not thread-safe: drive it from one thread.

    model: a `Transformer` (eval mode is set here). tokenizer: needed for text, stop strings and EOS.
    max_batch: cache slots = most requests decoded at once. max_len: positions per slot (prompt + new tokens).
    speculative: MTP drafting (needs a model with an MTP module). full_kv: cache the expanded per-head K/V
    instead of MLA's latent (the naive baseline of benchmarks/bench_infer_cache.py). lean: decode steps run
    `LeanDecoder` (lean.py) where it supports the model; False runs the model's own forward (the reference).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        speculative: bool = False,
        full_kv: bool = False,
        max_prefill_tokens: int = 4096,
        lean: bool = True,
    ):
        cfg = model.cfg
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
        if self.max_batch < 1 or self.max_len < 2:
            raise EngineError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch} and {max_len}")
        if self.max_len > cfg.max_position_embeddings:
            raise EngineError(
                f"max_len {self.max_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})"
            )
        self.max_prefill_tokens = max_prefill_tokens
        self.speculative = speculative
        self.device = model.embed.weight.device
        eos = getattr(tokenizer, "eos_id", None)
        self.eos_ids = frozenset() if eos is None else frozenset({eos})
        # One spare position: a speculative step writes its draft one past the last token it may emit.
        with torch.inference_mode():
            self.cache = model.make_cache(max_batch, self.max_len + 1, full_kv=full_kv)
            # Decode steps take the lean path (lean.py: same function, few ops) where it covers the model.
            self.lean = LeanDecoder(model) if lean and lean_supports(model, self.cache) else None
            self.drafter = (
                MTPDrafter(model, max_batch, self.max_len + 1, full_kv, self.lean) if speculative else None
            )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i].slot == i
        self.stats = EngineStats()
        self._ids = itertools.count()

    def weights_changed(self) -> None:
        """Tell the engine the model's parameters were changed in place (the lean path refolds them)."""
        if self.lean is not None:
            self.lean.invalidate()

    # ---- memory accounting ---------------------------------------------------------------------------------
    def _caches(self) -> list:
        return self.cache + ([self.drafter.cache] if self.drafter else [])

    @property
    def cache_bytes(self) -> int:
        """Bytes preallocated for all slots (main layers, plus the MTP layer when speculative)."""
        return sum(c.nbytes for c in self._caches())

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies across the main layers (MLA: L * (d_c + d_R) * element size)."""
        return sum(c.nbytes for c in self.cache) // (self.max_batch * (self.max_len + 1))

    @property
    def cache_tokens_in_use(self) -> int:
        return sum(r.n_cached for r in self.running)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests ------------------------------------------------------------------------------------------
    def add(
        self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Queue a request; it starts at the next step with a free slot."""
        params = (params or SamplingParams()).validate()
        prompt = [int(t) for t in prompt]
        vocab = self.model.cfg.vocab_size
        if not prompt:
            raise EngineError("prompt: needs at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EngineError(f"prompt: token ids must be in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_len:
            raise EngineError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_len} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise EngineError("stop: stop strings need a tokenizer")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        req = Request(
            id=request_id or f"req-{next(self._ids)}",
            prompt=prompt,
            params=params,
            stop_ids=stop_ids,
            generator=make_generator(params.seed, self.device),
        )
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request now; its slot is free for the next step."""
        if req.finished:
            return
        req.finish_reason = "cancelled"
        if req in self.waiting:
            self.waiting.remove(req)
        elif req.slot >= 0:
            self._free(req)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Request]:
        """Run prompts to completion (continuous batching when there are more than max_batch)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, params)]
        while not all(r.finished for r in reqs):
            self.step()
        return reqs

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield this request's deltas as they are produced (other requests advance too); cancel on close."""
        req = self.add(prompt, params)
        try:
            while not req.finished:
                for delta in self.step():
                    if delta.request is req:
                        yield delta
        finally:
            self.cancel(req)

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Prefill newly admitted requests if there are any, else decode every running request once."""
        admitted = self._admit()
        if admitted:
            deltas = self._prefill(admitted)
        elif self.running:
            deltas = self._decode_speculative() if self.speculative else self._decode()
        else:
            return []
        for d in deltas:
            if d.finished and d.request.slot >= 0:
                self._free(d.request)
        return deltas

    def _admit(self) -> list[Request]:
        """Waiting requests that get a slot now, within the padded-token budget of one prefill forward."""
        admitted: list[Request] = []
        longest = 0
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            longest_if = max(longest, len(self.waiting[0].prompt))
            if admitted and longest_if * (len(admitted) + 1) > self.max_prefill_tokens:
                break  # the first request always goes, however long (it fits its slot by construction)
            admitted.append(self.waiting.popleft())
            longest = longest_if
        return admitted

    def _prefill(self, reqs: list[Request]) -> list[Delta]:
        first = len(self.running)
        for i, r in enumerate(reqs):
            r.slot = first + i
            self.running.append(r)
        lens = [len(r.prompt) for r in reqs]
        T, k = max(lens), len(reqs)
        ids = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in reqs], device=self.device)
        positions = torch.arange(T, device=self.device).expand(k, T)
        rows = [_rows(c, first, first + k) for c in self.cache]
        last = torch.tensor(lens, device=self.device) - 1
        if self.lean is not None and self.lean.can_prefill(k, T):
            hidden = self.lean.hidden(ids, positions, rows)
            logits = self.lean.logits(hidden[torch.arange(k), last]).float()  # [k, V]: only where we sample
        else:
            out = self.model(ids, positions=positions, cache=rows, absorb=False)
            hidden, logits = out.hidden, out.logits[torch.arange(k), last].float()
        tokens = self._sample(logits, reqs)
        self.stats.prefill_steps += 1
        self.stats.prompt_tokens += sum(lens)
        now = time.monotonic()
        deltas = []
        for r, n, t, lp in zip(reqs, lens, tokens.tolist(), self._logprobs(logits, tokens, reqs)):
            r.n_cached, r.first_token_time = n, now
            deltas.append(self._emit(r, [t], [lp]))
        if self.drafter:
            # MTP position i sees (h_i, t_{i+1}): the prompt shifted by one, then the token just sampled.
            nxt = ids.roll(-1, dims=1)
            nxt[torch.arange(k), last] = tokens
            mtp_rows = _rows(self.drafter.cache, first, first + k)
            draft_logits = self.drafter(hidden, nxt, positions, mtp_rows, absorb=False, pick=last)
            self._set_drafts(reqs, draft_logits.float())
        return deltas

    def _decode(self) -> list[Delta]:
        reqs = self.running
        ids = torch.tensor([[r.last] for r in reqs], device=self.device)
        positions = torch.tensor([[r.n_cached] for r in reqs], device=self.device)
        if self.lean is not None:
            logits = self.lean.forward(ids, positions, self.cache)[0][:, -1].float()  # [B, V]
        else:
            logits = self.model(ids, positions=positions, cache=self.cache).logits[:, -1].float()
        tokens = self._sample(logits, reqs)
        self.stats.decode_steps += 1
        deltas = []
        for r, t, lp in zip(reqs, tokens.tolist(), self._logprobs(logits, tokens, reqs)):
            r.n_cached += 1
            deltas.append(self._emit(r, [t], [lp]))
        return deltas

    def _decode_speculative(self) -> list[Delta]:
        reqs = list(self.running)
        B = len(reqs)
        ids = torch.tensor([[r.last, r.draft] for r in reqs], device=self.device)
        positions = torch.tensor([[r.n_cached, r.n_cached + 1] for r in reqs], device=self.device)
        if self.lean is not None:
            logits, hidden = self.lean.forward(ids, positions, self.cache)
        else:
            out = self.model(ids, positions=positions, cache=self.cache)
            logits, hidden = out.logits, out.hidden
        logits = logits.float()  # [B, 2, V]
        params = [r.params for r in reqs]
        drafts, q = ids[:, 1], self._draft_distributions(reqs)
        gens = [r.generator for r in reqs]
        accepted, first, bonus = verify(logits, drafts, q, params, self._histories(reqs), gens)
        self.stats.decode_steps += 1
        self.stats.draft_tokens += B
        self.stats.accepted_tokens += int(accepted.sum())
        lp_first = self._logprobs(logits[:, 0], first, reqs)
        lp_bonus = self._logprobs(logits[:, 1], bonus, reqs)
        deltas = []
        rows = zip(reqs, accepted.tolist(), first.tolist(), bonus.tolist(), lp_first, lp_bonus)
        for r, ok, t1, t2, lp1, lp2 in rows:
            r.n_cached += 1 + ok
            deltas.append(self._emit(r, [t1, t2] if ok else [t1], [lp1, lp2] if ok else [lp1]))
        # Re-draft from the last accepted position: (h_n, t_{n+1}) and, where accepted, (h_{n+1}, t_{n+2}).
        second = torch.where(accepted, bonus, first)
        nxt = torch.stack([first, second], dim=1)
        pick = accepted.long()  # the last accepted position
        draft_logits = self.drafter(hidden, nxt, positions, self.drafter.cache, absorb=True, pick=pick)
        self._set_drafts(reqs, draft_logits.float())
        return deltas

    # ---- sampling helpers ----------------------------------------------------------------------------------
    def _histories(self, reqs: list[Request]) -> list[list[int]]:
        if all(r.params.repetition_penalty == 1.0 for r in reqs):
            return [[] for _ in reqs]
        return [r.history() for r in reqs]

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        params = [r.params for r in reqs]
        tokens, _ = sample(logits, params, self._histories(reqs), [r.generator for r in reqs])
        return tokens

    def _logprobs(self, logits, tokens, reqs) -> list[TokenLogprob | None]:
        return token_logprobs(logits, tokens, [r.params.logprobs for r in reqs])

    def _set_drafts(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Draw each request's next draft from the MTP logits [B, V], with the main model's transforms."""
        drafts, q = sample(
            logits, [r.params for r in reqs], self._histories(reqs), [r.generator for r in reqs]
        )
        for b, r in enumerate(reqs):
            r.draft = int(drafts[b])
            r.draft_q = None if q is None or r.params.greedy else q[b]  # greedy: q is one-hot at the draft

    def _draft_distributions(self, reqs: list[Request]) -> torch.Tensor | None:
        """q [B, V] of the current drafts; None when every request is plain greedy (q is the drafts' one-hot,
        and `verify` then only compares argmaxes)."""
        if plain_greedy([r.params for r in reqs]):
            return None
        drafts = torch.tensor([r.draft for r in reqs], device=self.device)
        q = torch.nn.functional.one_hot(drafts, self.model.cfg.vocab_size).float()
        for b, r in enumerate(reqs):
            if r.draft_q is not None:
                q[b] = r.draft_q
        return q

    # ---- outputs -------------------------------------------------------------------------------------------
    def _emit(self, r: Request, tokens: list[int], logprobs: list) -> Delta:
        """Append sampled tokens to a request, apply the stop rules, and return what a client should see."""
        new_tokens, new_logprobs = [], []
        for t, lp in zip(tokens, logprobs):
            if r.finished:
                break  # e.g. a speculative bonus token after a stop token
            r.num_generated += 1
            self.stats.generated_tokens += 1
            if t in r.stop_ids:
                r.finish_reason = "stop"
                break
            r.output.append(t)
            r.logprobs.append(lp)
            new_tokens.append(t)
            new_logprobs.append(lp)
            r.last = t
            if r.num_generated >= r.params.max_tokens:
                r.finish_reason = "length"
        text = self._update_text(r) if self.tokenizer is not None else ""
        if r.finished:
            self.stats.requests_finished += 1
        return Delta(r, new_tokens, text, new_logprobs, r.finished)

    def _update_text(self, r: Request) -> str:
        """Decode, cut at a stop string, and return the newly releasable text."""
        full = self.tokenizer.decode(r.output)
        stops = r.params.stop
        if stops:
            hits = [i for i in (full.find(s) for s in stops) if i >= 0]
            if hits:
                full = full[: min(hits)]
                if not r.finished:
                    r.finish_reason = "stop"
        r.text = full
        if r.finished:
            release = full
        else:
            release = full.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its next byte
            release = release[: len(release) - _stop_prefix_len(release, stops)]
        delta = release[r.emitted :]
        r.emitted = max(r.emitted, len(release))
        return delta

    @torch.inference_mode()
    def _free(self, r: Request) -> None:
        """Release r's slot; the request in the last slot moves into it so slots 0..n-1 stay dense."""
        i, moved = r.slot, self.running[-1]
        if moved is not r:
            n = min(moved.n_cached + 2, self.max_len + 1)  # + the token and draft a speculative step wrote
            for c in self._caches():
                for t in vars(c).values():
                    if isinstance(t, torch.Tensor):
                        t[i, :n] = t[moved.slot, :n]
            moved.slot = i
            self.running[i] = moved
        self.running.pop()
        r.slot = -1


def _rows(cache, start: int, stop: int):
    """A view of rows [start, stop) of a per-layer cache: writes through it land in the pool."""
    view = cache.__class__.__new__(cache.__class__)
    for name, t in vars(cache).items():
        setattr(view, name, t[start:stop] if isinstance(t, torch.Tensor) else t)
    return view


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (to hold back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---- loading -----------------------------------------------------------------------------------------------
def load(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a nanoseek run/checkpoint folder or a Hugging Face DeepSeek-V3/V2 folder.

    The tokenizer is the folder's tokenizer.json (a run folder and each checkpoint hold one)."""
    import nanoseek
    from nanoseek.tokenizer import Tokenizer, TokenizerError
    from nanoseek.train.trainer import resolve_device

    resolve_device(device)  # "cuda" without a GPU: a one-line error, not torch's AssertionError mid-load
    path = Path(path)
    model = nanoseek.load(path, device=device, **({} if dtype is None else {"dtype": dtype}))
    candidates = [path / "tokenizer.json"]
    if (path / "checkpoints").is_dir():
        from nanoseek.train.checkpoint import resolve_checkpoint

        candidates.append(resolve_checkpoint(path) / "tokenizer.json")
    for c in candidates:
        if c.exists():
            tok = Tokenizer.load(c)
            if tok.vocab_size > model.cfg.vocab_size:
                raise TokenizerError(
                    f"{c}: tokenizer has {tok.vocab_size} tokens, the model only {model.cfg.vocab_size}"
                )
            return model, tok
    raise TokenizerError(f"{path}: no tokenizer.json next to the model (copy the one it was trained with)")
