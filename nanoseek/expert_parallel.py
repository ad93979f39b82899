"""Expert parallelism: routed experts sharded across ranks, tokens moved to them and back with all-to-all.
DeepSeek-V3 §3.2.2 (cross-node all-to-all), §2.1.2 (node-limited routing), §3.3.3 (FP8 dispatch, BF16
combine); REFERENCE §5.

Rank j of an expert-parallel group of `ep` ranks holds the E/ep consecutive experts [j*E/ep, (j+1)*E/ep).
One MoE layer on every rank of the group:
  1. the (replicated) gate routes the rank's own tokens; the (token, slot) pairs are sorted by expert, so the
     rows bound for each rank are contiguous: `send_splits[r]` rows go to rank r;
  2. the per-expert counts are exchanged first (`all_to_all_single` of an [ep, E/ep] integer tensor), so
     every rank knows how many rows it receives from each source for each of its experts: the split sizes;
  3. dispatch: one `all_to_all_single` with those uneven splits moves the rows, [N_sent, d] -> [N_recv, d];
  4. the received rows, ordered (source, expert), are regrouped to (expert, source) so each local expert's
     rows are contiguous; the same grouped GEMMs as one process run (`Experts.expert_ffn`); regroup back;
  5. combine: the reverse `all_to_all_single` brings every row home, where the gate weight is applied and the
     K slots of each token are summed (`index_add_`), as V3's combine does.
The backward of a dispatch is a combine with the same split sizes and vice versa (`_AllToAll`).

Easy to get wrong:
- every rank must enter both all-to-alls even when it sends or receives nothing (split sizes of 0).
- the gradient of an expert's weights already sums the contributions of every rank in its EP group (they
  arrive through the all-to-all's backward): data parallelism must divide it by the world size, not by the
  number of replicas (`nanoseek.dist`).
- one row travels per (token, expert) pair. V3 sends a token once per destination *node* and fans it out
  over NVLink there; `a2a_bytes_per_token` computes both, docs/distributed.md compares them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.moe import Experts


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits whose backward sends the gradients back the way rows came."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Rows x[sum(send_splits[:r]) : sum(send_splits[:r+1])] go to rank r; differentiable."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


@dataclass
class DispatchPlan:
    """What combine needs to undo a dispatch (all of it is known after the count exchange)."""

    send_splits: list[int]  # rows this rank sent to each rank of the group
    recv_splits: list[int]  # rows it received from each rank
    local_counts: torch.Tensor  # [E/ep] rows per local expert, after regrouping
    regroup: torch.Tensor  # [N_recv] received row order (source, expert) -> (expert, source)
    restore: torch.Tensor  # [N_recv] the inverse permutation


def dispatch(x_sorted: torch.Tensor, counts: torch.Tensor, group=None) -> tuple[torch.Tensor, DispatchPlan]:
    """Send rows to the ranks holding their experts.

    x_sorted [N, d]: rows sorted by global expert id; counts [E] int64: rows per global expert.
    Returns the rows of this rank's experts [N_recv, d], grouped by local expert, and the plan for `combine`."""
    ep = dist.get_world_size(group)
    send_counts = counts.view(ep, -1)  # [ep, E/ep]: rows for each rank's experts
    recv_counts = torch.empty_like(send_counts)  # [ep, E/ep]: rows from each source for each of my experts
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    x_recv = all_to_all(x_sorted, send_splits, recv_splits, group)
    # Received rows are ordered (source, local expert); the grouped GEMMs need (local expert, source).
    n_local = recv_counts.shape[1]
    segment = torch.repeat_interleave(
        torch.arange(recv_counts.numel(), device=counts.device), recv_counts.flatten()
    )  # [N_recv]: source * n_local + expert
    regroup = ((segment % n_local) * ep + segment // n_local).argsort(stable=True)
    restore = torch.empty_like(regroup)
    restore[regroup] = torch.arange(len(regroup), device=regroup.device)
    plan = DispatchPlan(send_splits, recv_splits, recv_counts.sum(0), regroup, restore)
    return x_recv.index_select(0, regroup), plan


def combine(y_local: torch.Tensor, plan: DispatchPlan, group=None) -> torch.Tensor:
    """The inverse of `dispatch`: expert outputs [N_recv, d] -> rows back home in x_sorted's order [N, d]."""
    return all_to_all(y_local.index_select(0, plan.restore), plan.recv_splits, plan.send_splits, group)


class ExpertParallelExperts(Experts):
    """This rank's E/ep routed experts; forward(x, idx, weights) has the same meaning as `Experts.forward`.

    `bytes_sent` counts what this rank put on the wire for the all-to-alls since the last `pop_bytes_sent`:
    dispatch + combine rows that leave the rank and the count exchange, and, when a backward will follow
    (grad enabled), the same volume again for the gradients going the other way."""

    def __init__(self, full: Experts, group=None):
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        n_local = full.n_experts // ep
        dim, inter_dim = full.w1.shape[2], full.w1.shape[1]
        super().__init__(n_local, dim, inter_dim)
        self.n_routed_experts, self.group, self.ep, self.ep_rank = full.n_experts, group, ep, rank
        self.first_expert = rank * n_local
        self.fp8 = full.fp8
        mine = slice(self.first_expert, self.first_expert + n_local)
        for name in ("w1", "w2", "w3"):
            setattr(self, name, nn.Parameter(getattr(full, name)[mine].detach().clone()))
        self.bytes_sent = 0

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d], idx/weights [T, K] (global expert ids) -> [T, d]."""
        T, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_routed_experts)
        token = order // K
        x_local, plan = dispatch(x.index_select(0, token), counts, self.group)
        offs = plan.local_counts.cumsum(0).to(torch.int32)
        y_local = self.expert_ffn(x_local, plan.local_counts, offs)  # [N_recv, d], no gate weight yet
        y_sorted = combine(y_local, plan, self.group)  # [T*K, d]
        gate_weight = weights.flatten().index_select(0, order).unsqueeze(-1).to(x.dtype)
        self._count_bytes(plan, x.shape[1] * x.element_size(), counts.element_size())
        return torch.zeros_like(x).index_add_(0, token, y_sorted * gate_weight)

    def _count_bytes(self, plan: DispatchPlan, row_bytes: int, count_bytes: int) -> None:
        if not self.training:
            return  # evaluation traffic is not part of a training step
        me = self.ep_rank
        rows_out = sum(plan.send_splits) - plan.send_splits[me]  # dispatch rows leaving this rank
        rows_back = sum(plan.recv_splits) - plan.recv_splits[me]  # combine rows it sends home
        sent = (rows_out + rows_back) * row_bytes
        if torch.is_grad_enabled():
            sent *= 2  # the backward moves the same rows' gradients in the opposite directions
        self.bytes_sent += sent + (self.ep - 1) * self.n_experts * count_bytes

    def pop_bytes_sent(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


def a2a_bytes_per_token(
    cfg: ModelConfig,
    destinations: int | None = None,
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
    scale_block: int = 128,
) -> dict[str, float]:
    """Bytes one token puts on the wire per MoE layer (forward) when it reaches `destinations` remote places.

    destinations: ranks (or nodes) that receive a copy. Our dispatch sends one row per selected expert
    (default: K_r); V3 sends one per node, at most topk_group = 4 with node-limited routing [V3 §2.1.2].
    dispatch_bytes / combine_bytes: bytes per element (V3: FP8 = 1 with one fp32 scale per `scale_block`
    channels for dispatch, BF16 = 2 for combine [V3 §3.3.3]; fp32 training on CPU: 4 and 4)."""
    d = cfg.hidden_size
    n = cfg.num_experts_per_tok if destinations is None else destinations
    scales = (d / scale_block) * 4 if dispatch_bytes < 2 else 0.0  # fp32 scale per 1x128 tile
    dispatch_row = d * dispatch_bytes + scales
    combine_row = d * combine_bytes
    return {
        "destinations": n,
        "dispatch": n * dispatch_row,
        "combine": n * combine_row,
        "total": n * (dispatch_row + combine_row),
        "per_token_all_layers": n * (dispatch_row + combine_row) * cfg.n_moe_layers,
    }


def expected_remote_rows(cfg: ModelConfig, ep: int) -> float:
    """Expected remote rows per token under uniform routing: each of the K_r copies stays home w.p. 1/ep."""
    return cfg.num_experts_per_tok * (ep - 1) / ep
