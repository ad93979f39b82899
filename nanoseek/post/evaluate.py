"""Held-out evaluation of a policy on a task: greedy pass@1 and sampled pass@k.

- greedy pass@1: one completion per problem at temperature 0; the fraction answered correctly.
- sampled pass@k: n = k completions per problem at the sampling temperature; the unbiased estimator of
  Chen et al. 2021 (Codex, arXiv 2107.03374, eq. 1), `1 - C(n-c, k) / C(n, k)` averaged over problems, with c the
  correct samples. With n = k it is the fraction of problems with at least one correct sample. mean@k (the mean
  accuracy of the samples, i.e. sampled pass@1) is reported too.

RL mostly moves greedy pass@1 and mean@k while pass@k moves less (DeepSeekMath Fig. 7: "RL improves Maj@K but
not Pass@K"); reporting all three shows which happened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nanoseek.post.rewards import accuracy_reward, columns, format_reward
from nanoseek.post.rollout import Completion, Sampler
from nanoseek.post.tasks import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score(problems: Sequence[Problem], groups: Sequence[Sequence[Completion]]) -> tuple[list, list]:
    """(accuracy, format) per completion, grouped like `groups`."""
    flat_p = [p for p, g in zip(problems, groups) for _ in g]
    texts = [c.text for g in groups for c in g]
    fields = columns([p.reward_fields() for p in flat_p])
    acc = accuracy_reward([p.prompt for p in flat_p], texts, **fields)
    fmt = format_reward([p.prompt for p in flat_p], texts)
    acc_g, fmt_g, i = [], [], 0
    for g in groups:
        acc_g.append(acc[i : i + len(g)])
        fmt_g.append(fmt[i : i + len(g)])
        i += len(g)
    return acc_g, fmt_g


def evaluate(
    sampler: Sampler,
    problems: Sequence[Problem],
    k: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    examples: int = 3,
) -> dict:
    """Greedy pass@1, pass@k, mean@k, format rate and mean length on held-out problems (+ a few traces)."""
    fmt = sampler.fmt
    prompts = [fmt.prompt_ids(p.prompt) for p in problems]
    greedy = sampler.generate(prompts, n=1, temperature=0.0, seed=seed)
    g_acc, g_fmt = score(problems, greedy)
    result = {
        "problems": len(problems),
        "greedy_pass1": sum(a[0] for a in g_acc) / len(problems),
        "greedy_format": sum(f[0] for f in g_fmt) / len(problems),
        "greedy_length": sum(len(g[0].ids) for g in greedy) / len(problems),
    }
    if k > 0:
        sampled = sampler.generate(prompts, n=k, temperature=temperature, seed=seed + 1)
        s_acc, s_fmt = score(problems, sampled)
        correct = [int(sum(a)) for a in s_acc]
        result[f"pass{k}"] = sum(pass_at_k(k, c, k) for c in correct) / len(problems)
        result[f"mean{k}"] = sum(correct) / (k * len(problems))
        result["sampled_format"] = sum(map(sum, s_fmt)) / (k * len(problems))
    result["examples"] = [
        {"prompt": p.prompt, "completion": g[0].text, "correct": bool(a[0]), "answer": p.answer}
        for p, g, a in list(zip(problems, greedy, g_acc))[:examples]
    ]
    return result
