"""DeepSeekMoE with auxiliary-loss-free load balancing. DeepSeek-V3 §2.1.2 eqs 12-20, REFERENCE §5.

Routing (the `Gate`), for each token t with input u_t:
    s_i       = sigmoid(u_t . e_i)                        (softmax for V2-style configs)
    selection on the BIASED scores s_i + b_i:
      1. group score = sum of the top-2 biased scores of each of n_group groups (`noaux_tc`; V2's
         `group_limited_greedy` uses the max); keep the best topk_group groups, mask the rest to -inf
         (= node-limited routing: a token reaches at most topk_group nodes);
      2. top-K_r experts among the kept groups.
    gate weights from the UNBIASED scores: g_i = s_i / sum_{j in sel} s_j  (norm_topk_prob), times
    routed_scaling_factor. The bias steers selection only; it never changes a gate weight.
Output: h' = u + sum_sel g_i FFN_i(u) + sum_shared FFN_s(u)   (the residual add lives in the Block).

Balancing:
- aux-loss-free: a per-expert bias buffer b (no gradient), updated after each optimizer step from the whole
  step's load: `b_i += gamma * sign(mean_load - load_i)` (`MoE.update_bias`). gamma = 0.001 [V3 §4.2].
- complementary sequence-wise loss [V3 eqs 17-20]: `alpha * sum_i f_i P_i` per sequence, f_i = N_r/(K_r T) *
  (selections of i in the sequence), P_i = mean_t s_i / sum_j s_j. alpha = 1e-4.
- classic expert-level aux loss (the ablation baseline, V2 §3.2.1 / Switch): the same f_i P_i over the whole batch.
- MaxVio = (max load - mean load) / mean load (Wang et al. 2024): 0 is perfect balance.

Experts run as grouped GEMMs: tokens are sorted by expert once, every expert's rows are contiguous, one
`torch._grouped_mm` per weight matrix covers all experts, one `index_add_` scatters back. No Python loop over
tokens, none over experts where the grouped kernel exists (fallback: a loop over contiguous slices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.fp8 import fp8_grouped_linear
from nanoseek.hardware import fast_matmul_active
from nanoseek.model.layers import MLP


def max_vio(load: torch.Tensor) -> float:
    """(max_i load_i - mean load) / mean load. 0 = perfectly balanced."""
    load = load.float()
    mean = load.mean()
    return 0.0 if mean <= 0 else float((load.max() - mean) / mean)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        # The CUDA grouped GEMM is bf16-only, needs Hopper (sm90+) and 16-byte aligned rows.
        return (
            x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.shape[1] % 8 == 0
            and w.shape[1] % 8 == 0
        )
    return False


@torch.compiler.disable
def _grouped_mm_not_traced(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm outside torch.compile's graph: its fake-tensor rule accepts only bf16, so tracing an fp32
    call fails (`nanoseek train --compile` on a CPU); eager it runs fine."""
    return torch._grouped_mm(x, w, offs=offs)


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """Rows of x sorted by expert ([N, in]) times each expert's weight w [E, out, in] -> [N, out].

    With fewer rows than experts (a decode step) most experts get none, but the CPU grouped kernel still visits
    every one; a loop over the non-empty ones is then about twice as fast (one decode token: 6 of 64 experts)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # autocast does not cover _grouped_mm: cast both operands as it would for a matmul (x arrives in fp32
        # from the norm; the master weights are fp32).
        x = x.to(torch.get_autocast_dtype("cuda"))
    if _grouped_mm_ok(x, w) and (x.shape[0] >= w.shape[0] or x.device.type != "cpu"):
        mm = torch._grouped_mm if x.dtype == torch.bfloat16 else _grouped_mm_not_traced
        return mm(x, w.to(x.dtype).transpose(-2, -1), offs=offs)
    sizes = counts.tolist()
    if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        # Inference (a decode step): view only the experts that got rows; unbind would make E views of w.
        parts = [x_e @ w[e].t() for e, x_e in enumerate(x.split(sizes)) if sizes[e]]
    else:
        # split/unbind, not x[a:b] / w[e]: their backwards are one cat/stack, where each slice or select would
        # scatter into its own zero-filled copy of the whole tensor (E^2 memory traffic, 2 s a step on an H100).
        parts = [x_e @ w_e.t() for x_e, w_e in zip(x.split(sizes), w.unbind(0)) if x_e.shape[0]]
    return torch.cat(parts, dim=0) if parts else x.new_zeros(0, w.shape[1])


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # b_i of eq. 16; a buffer (saved, never touched by the optimizer). HF: e_score_correction_bias.
        self.register_buffer("e_score_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s [T, E] in fp32 (the router runs in fp32, as in HF and [M])."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert indices [T, K] chosen on biased scores within the kept groups."""
        biased = scores.detach() + self.e_score_bias.float()
        T = biased.shape[0]
        if self.n_group > 1 and self.topk_method != "greedy":
            grouped = biased.view(T, self.n_group, -1)  # [T, G, E/G]
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
            else:
                group_scores = grouped.amax(dim=-1)
            kept = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, -1)
        return biased.topk(self.top_k, dim=-1).indices

    def route(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Affinities [T, E] -> (indices [T, K], gate weights [T, K] fp32)."""
        idx = self.select(scores)
        weights = scores.gather(1, idx)  # unbiased: the bias never reaches a gate weight
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * self.route_scale

    def forward(self, x: torch.Tensor):
        """x [T, d] -> (indices [T, K], gate weights [T, K] fp32, scores [T, E] fp32)."""
        scores = self.scores(x)
        return *self.route(scores), scores


# Inside hardware.fast_matmul() (fp32 GEMMs on oneDNN, CPU), every expert's rows are padded to a multiple of this:
# oneDNN's AVX-512 kernels run row counts that are multiples of 16 faster than the ragged counts routing produces.
# Forward+backward of two expert GEMMs at 2,048 x 6 rows: 37.5-48 ms padded vs 44-55 ms not, for ~4% more rows
# (and no gain on MKL, so only there).
PAD_ROWS = 16


def _pad_rows(
    token: torch.Tensor, gate_weight: torch.Tensor, counts: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows sorted by expert (token [N], gate_weight [N, 1], counts [E]) laid out with each expert's count rounded up
    to `multiple`. A padding row repeats token 0 with gate weight 0, so it adds exactly 0 to token 0's output and
    gets no gradient."""
    padded = (counts + multiple - 1) // multiple * multiple
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # how far each expert's rows move
    N = len(token)
    dest = torch.arange(N, device=token.device) + shift.repeat_interleave(counts, output_size=N)
    n = int(padded.sum())
    token = token.new_zeros(n).index_copy_(0, dest, token)
    gate_weight = gate_weight.new_zeros(n, 1).index_copy(0, dest, gate_weight)
    return token, gate_weight, padded


class Experts(nn.Module):
    """N_r routed SwiGLU experts stored stacked: w1/w3 [E, I, d], w2 [E, d, I] (nn.Linear layout per expert)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # gate_proj
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))  # down_proj
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))  # up_proj
        self.fp8 = False  # set by nanoseek.fp8.convert_to_fp8: the three grouped GEMMs then run in FP8

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d], idx/weights [T, K] -> sum_k weights[t,k] * expert_{idx[t,k]}(x[t]), shape [T, d]."""
        T, K = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # sort (token, slot) pairs by expert
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // K
        gate_weight = weights.flatten().index_select(0, order).unsqueeze(-1).to(x.dtype)  # [T*K, 1]
        if x.device.type == "cpu" and x.dtype == torch.float32 and not self.fp8 and fast_matmul_active():
            token, gate_weight, counts = _pad_rows(token, gate_weight, counts, PAD_ROWS)
        offs = counts.cumsum(0).to(torch.int32)
        # index_select, not x[token]: on CPU the backward of advanced indexing is an accumulating index_put_
        # (~30 ms fwd+bwd at 24k x 256 rows), index_select's is index_add_ (~4 ms).
        x_sorted = x.index_select(0, token)  # [T*K (+ padding), d], each expert's rows contiguous
        y = self.expert_ffn(x_sorted, counts, offs, gate_weight)  # [T*K (+ padding), d]
        return torch.zeros_like(x, dtype=y.dtype).index_add_(0, token, y)  # y is bf16 under CUDA autocast

    def expert_ffn(
        self, x_sorted: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor, gate_weight=None
    ) -> torch.Tensor:
        """Every expert's SwiGLU over its contiguous rows of x_sorted [N, d] (counts [E] rows each) -> [N, d].

        gate_weight [N, 1] (optional) scales each row; expert parallelism (nanoseek/expert_parallel.py) runs
        this on the rows it received and applies the gate weights back at the tokens' own rank instead."""
        linear = fp8_grouped_linear if self.fp8 else grouped_linear
        h1 = linear(x_sorted, self.w1, counts, offs)  # [N, I]
        h3 = linear(x_sorted, self.w3, counts, offs)
        h = F.silu(h1) * h3
        # w2 is linear, so the gate weight can scale h [N, I] instead of the output [N, d]: fewer elements
        # whenever I < d, as in every DeepSeek config.
        return linear(h if gate_weight is None else h * gate_weight, self.w2, counts, offs)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        n_sh = cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, n_sh * cfg.moe_intermediate_size) if n_sh > 0 else None
        # Load of the current optimizer step (all micro-batches), consumed by update_bias().
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, d] -> (output [B, S, d], balance loss scalar)."""
        B, S, d = x.shape
        x_TD = x.reshape(-1, d)
        idx, weights, scores = self.gate(x_TD)
        out = self.experts(x_TD, idx, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_TD)
        loss = x.new_zeros((), dtype=torch.float32)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=self.gate.n_experts).float()
            loss = self.balance_loss(scores, idx, B, S)
        return out.view(B, S, d), loss

    def balance_loss(self, scores: torch.Tensor, idx: torch.Tensor, B: int, S: int) -> torch.Tensor:
        cfg, E, K = self.cfg, self.gate.n_experts, self.gate.top_k
        if cfg.balancing == "aux_free":
            alpha, groups = cfg.seq_aux_alpha, B  # per sequence [V3 eqs 17-20]
        elif cfg.balancing == "aux_loss":
            alpha, groups = cfg.aux_loss_alpha, 1  # whole batch (classic)
        else:
            return scores.new_zeros(())
        if alpha == 0:
            return scores.new_zeros(())
        T = B * S // groups
        s_norm = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t}; a no-op for softmax scores
        P = s_norm.view(groups, T, E).mean(dim=1)  # [groups, E]
        counts = torch.zeros(groups, E, device=scores.device).scatter_add_(
            1, idx.view(groups, T * K), torch.ones(groups, T * K, device=scores.device)
        )
        f = counts * E / (K * T)
        return alpha * (f * P).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> float:
        """Aux-loss-free update from this step's load; returns the step's MaxVio, then resets the counts."""
        load = self.tokens_per_expert
        vio = max_vio(load)
        if load.sum() > 0 and gamma > 0:
            self.gate.e_score_bias += gamma * torch.sign(load.mean() - load)
        load.zero_()
        return vio
