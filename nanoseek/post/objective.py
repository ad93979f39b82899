"""The GRPO objective: group-normalized advantages, the clipped surrogate, the k3 KL, and loss aggregation.

DeepSeekMath §4.1 eq. 3 (REFERENCE §9.1), for a question q with G sampled outputs o_1..o_G from pi_old:

    J = (1/G) sum_i (1/|o_i|) sum_t { min(r_it A_it, clip(r_it, 1 - eps_low, 1 + eps_high) A_it) - beta D_KL,it }
    r_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)           (per-token importance ratio)
    A_it = (R_i - mean(R)) / std(R)      for every token t of o_i          (outcome supervision)
    D_KL,it = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                   (eq. 4: Schulman's k3, >= 0)

The loss is -J. Pieces and their variants:
- `group_advantages`: scale_rewards "group" divides by each group's std (DeepSeekMath), "batch" by the std of
  all rewards in the batch (Lite-PPO), "none" not at all (Dr. GRPO, arXiv 2503.20783, which removes the
  question-difficulty bias). The std is Bessel-corrected (divides by G - 1, as torch.std and TRL do) and
  `std_eps` = 1e-4 is added to it (TRL); a group whose rewards are all equal gets advantage exactly 0 under
  every scaling, so it contributes no policy gradient (DAPO's dynamic sampling drops such groups).
- `clipped_surrogate`: DAPO's clip-higher uses eps_high > eps_low (0.28 vs 0.2) so low-probability tokens can
  grow. The min() makes the clip act only when the ratio has left [1 - eps_low, 1 + eps_high] in the direction
  the advantage pushes; on-policy (mu = 1, one minibatch) the ratio is exactly 1 and the clip never acts.
- `k3_kl`: computed per token, in the loss (not in the reward). Its value is >= 0 and 0 iff pi_theta = pi_ref
  on that token. Note: the *gradient* of the k3 estimate is not the gradient of KL (REFERENCE §9.1).
- `aggregate` (REFERENCE §9.2, the most common source of bugs): "grpo" averages each sequence's tokens, then the
  sequences (eq. 3, sequence-mean-token-mean); "dapo" divides the sum over all tokens by the token count (DAPO
  eq. 8, TRL's default: long sequences weigh more); "dr_grpo" divides the token sum by (sequences x
  max_completion_length), a constant, removing the 1/|o_i| length bias.

Gotcha worth knowing (trl#2703): with mu = 1 and beta = 0 the loss *value* is ~0 (ratio 1, advantages centered
per group) while its gradient is not. Judge a run by its reward, never by its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale: str = "group", std_eps: float = 1e-4) -> torch.Tensor:
    """rewards [N, G] (N groups of G samples) -> advantages [N, G]."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: must be one of {SCALE_REWARDS}, got {scale!r}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards: need shape [groups, G] with G >= 2, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + std_eps)  # torch.std: Bessel (G - 1)
    if scale == "batch":
        return centered / (rewards.std() + std_eps)
    return centered


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token objective min(r A, clip(r) A), clipped-low mask, clipped-high mask); A broadcasts over tokens."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    low = (ratio < 1.0 - eps_low) & (advantages < 0)  # the min picks the clipped term: no gradient
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return torch.minimum(unclipped, clipped), low, high


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce per-token values [N, T] over the completion tokens (mask [N, T]) to a scalar.

    num_sequences / num_tokens default to this batch's; pass the totals of a whole minibatch when it is
    processed in pieces (gradient accumulation), so the pieces sum to the minibatch's exact loss."""
    mask = mask.to(values.dtype)
    n = values.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        per_sequence = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / n
    if loss_type == "dapo":
        tokens = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / max(float(tokens), 1.0)
    if loss_type == "dr_grpo":
        return (values * mask).sum() / (n * max_completion_length)
    raise ValueError(f"loss_type: must be one of {LOSS_TYPES}, got {loss_type!r}")


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to minimize: -(aggregated surrogate) + beta * aggregated KL
    kl: torch.Tensor | None  # per-token k3 [N, T] (detached), None when beta = 0
    clipped_low: torch.Tensor  # [N, T] bool
    clipped_high: torch.Tensor  # [N, T] bool


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    loss_type: str = "dapo",
    max_completion_length: int = 1,
    num_sequences: int | None = None,
    num_tokens: float | None = None,
) -> LossTerms:
    """logp/old_logp/ref_logp/mask [N, T] over completion tokens, advantages [N] -> the GRPO loss (eq. 3)."""
    surrogate, low, high = clipped_surrogate(logp, old_logp, advantages.unsqueeze(-1), eps_low, eps_high)
    per_token = -surrogate
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        kl = kl.detach()
    loss = aggregate(per_token, mask, loss_type, max_completion_length, num_sequences, num_tokens)
    return LossTerms(loss, kl, low, high)
