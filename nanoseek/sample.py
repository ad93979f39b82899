"""Plain autoregressive sampling with the model's own cache (the inference engine comes later).

Prefill runs the prompt through the training path while filling the cache (MLA: the latent c_KV and the roped
k_R only), then each new token runs the decode path (MLA: absorbed) over the cache. Temperature 0 is greedy.
"""

from __future__ import annotations

import torch

from nanoseek.model import Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 50,
    stop_ids: set[int] | None = None,
    seed: int | None = None,
) -> list[int]:
    """Continue `prompt` (token ids); returns only the new ids (stops early at a stop id, which is excluded)."""
    if not prompt:
        raise ValueError("prompt: needs at least one token")
    model.eval()
    dev = model.embed.weight.device
    max_pos = model.cfg.max_position_embeddings
    total = min(len(prompt) + max_new_tokens, max_pos)
    if len(prompt) >= total:
        raise ValueError(
            f"prompt: {len(prompt)} tokens leave no room under max_position_embeddings={max_pos}"
        )
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed if seed is not None else torch.seed() % (1 << 63))
    cache = model.make_cache(1, total)
    ids = torch.tensor([prompt], device=dev)
    positions = torch.arange(len(prompt), device=dev).unsqueeze(0)
    logits = model(ids, positions=positions, cache=cache, absorb=False).logits[:, -1]
    out: list[int] = []
    for pos in range(len(prompt), total):
        if temperature <= 0:
            nxt = int(logits.argmax(-1))
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if stop_ids and nxt in stop_ids:
            break
        out.append(nxt)
        if pos == total - 1:
            break
        step = torch.tensor([[nxt]], device=dev)
        logits = model(step, positions=torch.tensor([[pos]], device=dev), cache=cache).logits[:, -1]
    return out
