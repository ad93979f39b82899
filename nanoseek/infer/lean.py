"""The lean decode step: the model's forward for a few new tokens per sequence over the MLA latent cache, in as
few tensor ops as the math allows.

Why it exists: a decode step of a small model on a CPU is bound by per-op overhead, not by FLOPs or bytes.
The model's own forward ran ~3,200 aten ops per token at batch 1 (BENCHMARKS.md, issue 4) against a weight-read
floor of ~1 ms. `Transformer.forward` stays the reference; this module computes the same function (tests:
logits within 1e-5 of it, token by token) with these changes:

- Weights folded once, and again whenever a parameter changes (GRPO updates the policy between rollouts):
    W_q' = scale * [W_UK^T W_UQ^nope ; W_UQ^rope] per head   W_UK absorbed into the query ([V2] App. C,
                                                             REFERENCE §3), the softmax scale too
    W_o' = W_O W_UV                                          W_UV absorbed into the output projection
  each only where the folded matrix is at most twice the bytes of the pair it replaces (true at small widths;
  for DeepSeek-V3's shapes it is 2.5-3.7x, and the factors stay apart, applied by a batched matmul).
  [W_DQ ; W_DKV] are stacked (one GEMM for both down-projections) and so are the w1/w3 of the dense FFN and the
  shared experts.
- Every RMSNorm weight that feeds a matrix is folded into it (diag(g) W): the step computes only x / RMS(x),
  which for one row is a dot product and a scalar multiply, a third of the time of `F.rms_norm`'s composite.
  (The latent's norm stays: its output is what the cache stores.)
- Attention as multi-query attention over the latent, FlashMLA's formulation: one batched matmul of the queries
  [q_lat ; q_rope] (kv_lora_rank + d_R wide) against the cache's [c_kv ; k_rope] rows, a softmax, one batched
  matmul against c_kv. The mask (causal + unwritten slots) is built once per step and shared by every layer;
  one sequence decoding one token needs none.
- RoPE as an in-place complex multiply (fp32/fp64), its factors computed once per step.
- Every matrix in the decode layout, [in, out] contiguous (x @ W): MKL's single-row GEMV streams it at about
  twice the bandwidth of the training layout's x @ W.t() (the 8 MB head: 0.36 vs 0.73 ms). So the decoder
  holds a copy of the weights (the model's size again); w1|w3 are stacked in it, one GEMM for both.
- Kernels: where hardware.packed_weights_available (AMD CPUs with AVX-512, where MKL runs AVX2 code), every
  dense matrix also gets a copy prepacked for oneDNN's AVX-512 kernels (`hardware.PackedWeight`), used from
  `PACKED_MIN_ROWS` rows (1.3-2x faster than MKL from 4 rows); matrices of 768 KB and more (the 8 MB head: 0.22
  vs 0.30 ms) are kept only prepacked, faster from one row. The experts' few-row GEMMs and attention's bmms stay
  on torch's default BLAS, and the whole step runs outside the trainer's `fast_matmul` switch whoever calls it.
- One token's routing (batch 1) is done on Python floats (`_route_one`): a few dozen numbers, where `Gate.route`
  pays ~17 op dispatches. RoPE's rotation factors are a table by position, built once.
- A step with few (token, expert) pairs (batch 1-2) loops over them; each adds its gated expert output into
  its row of the residual stream with one addmm. With more pairs: sort by expert, grouped GEMMs, one index_add.

Prefill can take this path as well (`hidden`, `can_prefill`), with logits computed only where a token is sampled.

Only MLA models on the CPU with a latent cache, in fp32 or fp64, without FP8 experts and of at most
`MAX_MODEL_BYTES` (the copy), take this path (`supports`). The engine runs `Transformer.forward` for everything
else, and for prefills whose attention scores would be too big (`can_prefill`). (On a GPU the per-op cost is a kernel launch, and CUDA graphs are the tool for it.)
"""

from __future__ import annotations

import heapq
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from nanoseek.hardware import PackedWeight, default_matmul, packed_weights_available
from nanoseek.model.layers import MLP
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import MoE, _grouped_mm_ok

_LIVE: weakref.WeakSet = weakref.WeakSet()  # every LeanDecoder, for the optimizer hook below


def _optimizer_stepped(*_) -> None:
    # Fused AdamW updates parameters without bumping their version counters, so an optimizer step marks every
    # decoder's folded weights stale explicitly (GRPO samples from the policy it is training).
    for decoder in list(_LIVE):
        decoder.invalidate()


register_optimizer_step_post_hook(_optimizer_stepped)


# Up to this many (token, expert) pairs a step loops over the pairs; beyond, it sorts rows by expert and runs
# grouped GEMMs (the CPU grouped kernel visits every expert, however few rows it has). Measured on the `small`
# preset (top-6 of 64): the loop wins at batch 1 and 2 (6-12 pairs), the grouped GEMMs from batch 4 (24).
PAIR_LOOP_MAX = 16
MAX_MODEL_BYTES = 2**30  # the decoder copies the weights; bigger models decode through the model's forward
# With prepacked oneDNN weights (hardware.PackedWeight), from this many rows a dense matrix runs on them: at 1-2
# rows MKL's GEMV is faster for 128-512 KB matrices (9 vs 16 us for 256 x 256), from 4 rows oneDNN (15 vs 19 us).
# Matrices of at least PACKED_ONE_ROW_NUMEL numbers (768 KB in fp32) run prepacked from one row: a long read
# streams faster through oneDNN's kernel (one row, weights not in cache: 768 x 256 35 vs 48 us, 256 x 1536 56 vs
# 89 us, the 8 MB head 220 vs 300 us), and they keep no MKL copy.
PACKED_MIN_ROWS = 4
PACKED_ONE_ROW_NUMEL = 3 << 16
# Prefill runs here too (1.2-1.6x faster than the model's forward for 32-512-token prompts) while attention's
# score tensor stays under this many elements (64 MB): 2,048 tokens x 8 heads x 1,024 keys.
PREFILL_MAX_SCORES = 2**24


def supports(model, cache) -> bool:
    """Whether the lean step computes this model's decode step over this cache."""
    cfg = model.cfg
    if cfg.attention != "mla" or not cache or not all(isinstance(c, LatentCache) for c in cache):
        return False
    if cfg.kv_lora_rank % 2 or (cfg.q_lora_rank or 0) % 2:
        return False  # RoPE's complex view of the rope slice needs it to start at an even offset
    w = model.embed.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64):
        return False
    if sum(p.numel() * p.element_size() for p in model.parameters()) > MAX_MODEL_BYTES:
        return False
    return not any(getattr(m.experts, "fp8", False) for m in model.moe_layers())


def _fold(parts_numel: int, folded_numel: int) -> bool:
    return folded_numel <= 2 * parts_numel


def _t(w: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """w [.., out, in] as a contiguous copy in the decode layout [.., in, out]; times diag(norm) on the input side
    when an RMSNorm weight is folded in (RMSNorm(x) W = (x / RMS(x)) diag(g) W)."""
    if norm is not None:
        w = w * norm  # scales w's input columns (before the transpose: the product keeps w's strides)
    return w.transpose(-2, -1).contiguous()


class _Matrix:
    """A dense weight w [out, in] (times diag(norm), folded) in its decode forms: [in, out] contiguous for MKL's
    few-row GEMVs and, where hardware.packed_weights_available, prepacked for oneDNN from `min_rows` rows (from one
    row for big matrices, which then keep only the packed copy)."""

    __slots__ = ("t", "packed", "min_rows")

    def __init__(self, w: torch.Tensor, norm: torch.Tensor | None = None):
        if norm is not None:
            w = w * norm
        pack = w.dtype == torch.float32 and packed_weights_available()
        self.packed = PackedWeight(w) if pack else None
        self.min_rows = (1 if w.numel() >= PACKED_ONE_ROW_NUMEL else PACKED_MIN_ROWS) if pack else 1 << 62
        self.t = _t(w) if self.min_rows > 1 else None

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ W -> [M, out]."""
        return self.packed(x) if x.shape[0] >= self.min_rows else x @ self.t

    def add_to(self, y: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> None:
        """y += alpha * (x @ W), in place."""
        if x.shape[0] >= self.min_rows:
            y.add_(self.packed(x), alpha=alpha)
        else:
            y.addmm_(x, self.t, alpha=alpha)


@dataclass
class _FFN:
    """A SwiGLU's decode matrices: w1|w3 stacked (one GEMM for both), w2."""

    w13: _Matrix
    w2: _Matrix

    @classmethod
    def of(cls, mlp: MLP, norm: torch.Tensor) -> _FFN:
        return cls(_Matrix(torch.cat([mlp.w1.weight, mlp.w3.weight]), norm), _Matrix(mlp.w2.weight))

    def add_to(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """x += w2(silu(w1 h) * w3 h), in place."""
        self.w2.add_to(x, _swiglu_of(self.w13.mm(h)))


class _Layer:
    """One decoder block's weights, folded for decoding."""

    def __init__(self, block: nn.Module, cfg):
        attn = block.attn
        H, nope, R, v, r = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
        self.H, self.r, self.R = H, r, R
        self.eps = cfg.rms_norm_eps
        attn_norm, ffn_norm = block.attn_norm.weight, block.ffn_norm.weight  # folded into what they feed
        self.kv_norm = attn.kv_norm.weight
        w_kv = attn.wkv_b.weight.view(H, nope + v, r)
        w_uk, w_uv = w_kv[:, :nope], w_kv[:, nope:]  # [H, nope, r], [H, v, r]
        # The query, scaled, as one matrix from its input (c_Q, or x without q_lora) to per-head [q_C ; q_R].
        w_q = attn.wq_b.weight if attn.q_lora_rank else attn.wq.weight
        w_q = (w_q * attn.scale).view(H, nope + R, -1)
        q_in = w_q.shape[-1]
        self.fold_q = _fold(w_q.numel() + w_uk.numel(), H * (r + R) * q_in)
        if self.fold_q:  # q_lat = q_C W_UK: fold W_UK into the query weights
            w_q = torch.cat([torch.einsum("hdr,hdi->hri", w_uk, w_q[:, :nope]), w_q[:, nope:]], dim=1)
            self.w_uk = None
        else:
            self.w_uk = w_uk  # applied by a bmm over heads
        self.q_width = w_q.shape[1]  # r + R folded, nope + R otherwise
        w_q = w_q.reshape(-1, q_in)
        if attn.q_lora_rank:
            self.q_lora = attn.q_lora_rank
            self.w_in = _Matrix(torch.cat([attn.wq_a.weight, attn.wkv_a.weight]), attn_norm)  # q_lora + r + R
            self.w_q = _Matrix(w_q, attn.q_norm.weight)
        else:
            self.q_lora, self.w_q = 0, None
            self.w_in = _Matrix(torch.cat([w_q, attn.wkv_a.weight]), attn_norm)  # to H*q_width + r + R
        wo = attn.wo.weight  # [d, H*v]
        self.fold_o = _fold(wo.numel() + w_uv.numel(), wo.shape[0] * H * r)
        if self.fold_o:  # o W_UV then W_O, as one [d, H*r] matrix
            w_o = torch.einsum("dhv,hvr->dhr", wo.view(-1, H, v), w_uv)
            self.w_o = _Matrix(w_o.reshape(wo.shape[0], H * r))
            self.w_uv = None
        else:
            self.w_o, self.w_uv = _Matrix(wo), w_uv.transpose(1, 2)  # [d, H*v], [H, r, v]
        self.ffn = self.moe = None
        if isinstance(block.ffn, MoE):
            self.moe = block.ffn
            ex = block.ffn.experts
            self.w13 = _t(torch.cat([ex.w1, ex.w3], dim=1), ffn_norm)  # [E, d, 2I]
            self.w2 = _t(ex.w2)  # [E, I, d]
            self.w13s, self.w2s = self.w13.unbind(0), self.w2.unbind(0)  # per-expert views, made once
            gate_w, sh = block.ffn.gate.weight, block.ffn.shared_experts
            self.router = self.shared = self.router_w13 = None
            if sh is not None and ffn_norm.dtype == torch.float32:
                # fp32 models: the router and the shared experts' w1|w3 read the same h, so one GEMV does both
                # (one matrix streamed instead of two: ~2% of a batch-1 step); the shared w2 stays apart.
                self.router_w13 = _Matrix(torch.cat([gate_w.float(), sh.w1.weight, sh.w3.weight]), ffn_norm)
                self.shared_w2 = _Matrix(sh.w2.weight)
            else:
                self.router = _t(gate_w.float(), ffn_norm.float())  # in fp32, as Gate.scores runs it: [d, E]
                self.shared = _FFN.of(sh, ffn_norm) if sh is not None else None
        else:
            self.ffn = _FFN.of(block.ffn, ffn_norm)


@dataclass
class _Step:
    """What every layer of one step shares: cache rows/positions, the mask, the RoPE factors."""

    B: int
    S: int
    rows: torch.Tensor  # [B, 1]
    positions: torch.Tensor  # [B, S]
    kv_len: int
    mask: torch.Tensor | None  # [B, S, 1, kv_len] additive (0 / -inf), None when nothing needs hiding
    freqs: torch.Tensor  # complex [B*S, 1, R/2]


class LeanDecoder:
    """Decode-step forward of a `Transformer` over its latent caches: the main layers (`forward`) and, for
    speculative decoding, an MTP module's block (`mtp_block`)."""

    def __init__(self, model):
        self.model = model
        self._params = list(model.parameters())  # walking the module tree every step costs ~0.7 ms
        self._key = None
        self._layers: dict[int, _Layer] = {}
        self._head: _Matrix | None = None
        self._freqs = torch.zeros(0)  # RoPE factors by position, complex [P, 1, R/2], grown on demand
        self._rows: dict[int, torch.Tensor] = {}
        _LIVE.add(self)
        self._refresh()  # fold now: the first decode step should not pay for it

    def invalidate(self) -> None:
        """Refold the weights before the next step (call after changing parameters in place by hand)."""
        self._key = None

    # ---- weights -------------------------------------------------------------------------------------------
    def _params_key(self) -> tuple:
        # A parameter changed in place by most ops (load_state_dict, no_grad updates) bumps its version;
        # `.data = ...` or a device move changes its storage. Optimizer steps call invalidate() (the hook above).
        return tuple((p.data_ptr(), p._version) for p in self._params)

    def _refresh(self) -> None:
        key = self._params_key()
        if key != self._key:
            self._layers.clear()
            self._freqs, self._rows = torch.zeros(0), {}  # a dtype or device change rebuilds these too
            self._key = key
            with torch.no_grad():
                self._head = _Matrix(self.model.head.weight)
            for block in self.model.layers:  # MTP blocks are folded on first use (speculative decoding only)
                self._layer(block)

    def _layer(self, block: nn.Module) -> _Layer:
        lw = self._layers.get(id(block))
        if lw is None:
            with torch.no_grad():
                lw = self._layers[id(block)] = _Layer(block, self.model.cfg)
        return lw

    # ---- one step ------------------------------------------------------------------------------------------
    def step_context(self, positions: torch.Tensor) -> _Step:
        """positions [B, S]: where each row's new tokens go (row b's cache already holds 0..positions[b, 0]-1)."""
        self._refresh()
        B, S = positions.shape
        kv_len = int(positions.max()) + 1
        mask = None
        if not (B == 1 and S == 1):
            keys = torch.arange(kv_len, device=positions.device)
            hidden = keys.view(1, 1, 1, -1) > positions.view(B, S, 1, 1)
            if bool(hidden.any()):
                mask = torch.zeros(hidden.shape, dtype=self.model.embed.weight.dtype, device=positions.device)
                mask.masked_fill_(hidden, float("-inf"))
        if kv_len > len(self._freqs):
            self._grow_freqs(kv_len)
        freqs = self._freqs[positions.reshape(-1)]  # [B*S, 1, R/2]
        rows = self._rows.get(B)
        if rows is None:
            rows = self._rows[B] = torch.arange(B, device=positions.device).unsqueeze(1)
        return _Step(B, S, rows, positions, kv_len, mask, freqs)

    def _grow_freqs(self, n: int) -> None:
        """RoPE's rotation factors for positions 0..n'-1 (n' >= n, doubling), computed as the model's RoPE does."""
        rope = self.model.rope
        n = max(n, 2 * len(self._freqs), 256)
        positions = torch.arange(n, device=rope.inv_freq.device)
        angles = positions.view(-1, 1, 1).to(rope.inv_freq.dtype) * rope.inv_freq  # [n, 1, R/2]
        self._freqs = torch.polar(torch.full_like(angles, rope.attention_factor), angles)

    def block(self, block: nn.Module, x: torch.Tensor, step: _Step, cache: LatentCache) -> torch.Tensor:
        """One decoder block over x [B*S, d] (rows b*S + s); returns the new residual stream [B*S, d]."""
        lw = self._layer(block)
        x = x + self._attention(lw, _rms(x, lw.eps), step, cache)  # the norms' weights are in the matrices
        h = _rms(x, lw.eps)
        if lw.moe is None:
            lw.ffn.add_to(x, h)
        else:
            self._moe(lw, x, h)
        return x

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: list):
        """The main model over ids [B, S] at positions [B, S]: (logits [B, S, V], final normed hidden [B, S, d])."""
        h = self.hidden(ids, positions, cache)
        return self.logits(h), h

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache: list) -> torch.Tensor:
        """The main model's final normed hidden states [B, S, d] over ids [B, S] at positions [B, S]; writes the
        new tokens' latents into the cache."""
        model = self.model
        B, S = ids.shape
        step = self.step_context(positions)
        x = F.embedding(ids.reshape(-1), model.embed.weight)
        with default_matmul():  # our own kernel choices, even when called inside the trainer's fast_matmul()
            for layer, c in zip(model.layers, cache):
                x = self.block(layer, x, step, c)
        return F.rms_norm(x, x.shape[-1:], model.norm.weight, model.norm.eps).view(B, S, -1)

    def can_prefill(self, B: int, T: int) -> bool:
        """Whether a prefill of B prompts padded to T tokens may run here: attention's scores [B, T*H, T] are
        materialized (the model's SDPA never does), so only while they stay under PREFILL_MAX_SCORES."""
        return B * T * T * self.model.cfg.num_attention_heads <= PREFILL_MAX_SCORES

    def mtp_block(self, module: nn.Module, hidden: torch.Tensor, emb_next: torch.Tensor, positions, cache):
        """An MTP module's block (speculative drafting) over hidden, emb_next [B, S, d] -> h^k [B, S, d]."""
        B, S, d = hidden.shape
        e_n = F.rms_norm(emb_next, (d,), module.enorm.weight, module.enorm.eps)
        h_n = F.rms_norm(hidden, (d,), module.hnorm.weight, module.hnorm.eps)
        x = module.eh_proj(torch.cat([e_n, h_n], dim=-1)).reshape(B * S, d)
        with default_matmul():
            return self.block(module.block, x, self.step_context(positions), cache).view(B, S, d)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head over normed hidden states h [..., d] (the MTP drafts' head too)."""
        self._refresh()
        d = h.shape[-1]
        with default_matmul():
            return self._head.mm(h.reshape(-1, d)).view(*h.shape[:-1], -1)

    # ---- pieces --------------------------------------------------------------------------------------------
    def _attention(self, lw: _Layer, x: torch.Tensor, step: _Step, cache: LatentCache) -> torch.Tensor:
        B, S, H, r, R = step.B, step.S, lw.H, lw.r, lw.R
        M = B * S
        a = lw.w_in.mm(x)
        if lw.q_lora:
            q = lw.w_q.mm(_rms(a[:, : lw.q_lora], lw.eps))
            kv = a[:, lw.q_lora :]
        else:
            q, kv = a[:, : H * lw.q_width], a[:, H * lw.q_width :]
        q = q.view(M, H, lw.q_width)
        if not lw.fold_q:
            q_lat = torch.bmm(q[..., :-R].transpose(0, 1), lw.w_uk).transpose(0, 1)  # [M, H, r]
            q = torch.cat([q_lat, q[..., -R:]], dim=-1)
        _rope_(q[..., r:], step.freqs)
        _rope_(kv[:, None, r:], step.freqs)
        c_kv = (
            _rms(kv[:, :r], lw.eps) * lw.kv_norm
            if M == 1
            else F.rms_norm(kv[:, :r], (r,), lw.kv_norm, lw.eps)
        )
        kv_new = torch.cat([c_kv, kv[:, r:]], dim=-1)
        cache.kv[step.rows, step.positions] = kv_new.view(B, S, r + R)
        keys = cache.kv[:B, : step.kv_len]  # [B, T, r + R]
        scores = torch.bmm(q.reshape(B, S * H, r + R), keys.transpose(1, 2))  # the scale is folded into q
        if step.mask is not None:
            scores.view(B, S, H, -1).add_(step.mask)
        o_lat = torch.bmm(scores.softmax(dim=-1), keys[..., :r])  # [B, S*H, r]
        if lw.fold_o:
            return lw.w_o.mm(o_lat.view(M, H * r))
        o = torch.bmm(o_lat.view(M, H, r).transpose(0, 1), lw.w_uv)  # [H, M, v]
        return lw.w_o.mm(o.transpose(0, 1).reshape(M, -1))

    def _moe(self, lw: _Layer, x: torch.Tensor, h: torch.Tensor) -> None:
        """x += routed experts (gated) + shared experts of h, in place."""
        gate = lw.moe.gate
        if lw.router_w13 is not None:
            a = lw.router_w13.mm(h)
            E = gate.n_experts
            logits = a[:, :E]
            lw.shared_w2.add_to(x, _swiglu_of(a[:, E:]))
        else:
            logits = h.float() @ lw.router
            if lw.shared is not None:
                lw.shared.add_to(x, h)
        scores = logits.sigmoid() if gate.scoring_func == "sigmoid" else logits.softmax(-1)
        M, K = scores.shape[0], gate.top_k
        if M * K <= PAIR_LOOP_MAX:  # a decode step of a sequence or two: one addmm per (token, expert) pair
            bias = gate.e_score_bias.tolist()
            for t, row in enumerate(scores.tolist()):
                h_t, x_t = h[t : t + 1], x[t : t + 1]
                for e, g in zip(*_route_one(gate, row, bias)):
                    x_t.addmm_(_swiglu(h_t, lw.w13s[e]), lw.w2s[e], alpha=g)
            return
        idx, weights = gate.route(scores)
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(lw.w2s))
        tok = order // K
        xs = h.index_select(0, tok)
        gates = weights.flatten().index_select(0, order).unsqueeze(1).to(h.dtype)
        y = _swiglu_of(_grouped(xs, lw.w13, counts))
        x.index_add_(0, tok, _grouped(y.mul_(gates), lw.w2, counts))


def _route_one(gate, scores: list[float], bias: list[float]) -> tuple[list[int], list[float]]:
    """`Gate.route` for one token, on Python floats: (experts, gate weights). A token's routing is a few dozen
    numbers, where the tensor version pays ~17 op dispatches (32 vs 21 us here); tests check it agrees."""
    biased = [s + b for s, b in zip(scores, bias)]
    candidates = range(len(biased))
    if gate.n_group > 1 and gate.topk_method != "greedy":
        n = len(biased) // gate.n_group
        groups = [biased[g * n : (g + 1) * n] for g in range(gate.n_group)]
        if gate.topk_method == "noaux_tc":
            group_scores = [sum(heapq.nlargest(2, g)) for g in groups]
        else:
            group_scores = [max(g) for g in groups]
        kept = heapq.nlargest(gate.topk_group, range(gate.n_group), key=group_scores.__getitem__)
        candidates = [e for g in sorted(kept) for e in range(g * n, (g + 1) * n)]
    experts = heapq.nlargest(gate.top_k, candidates, key=biased.__getitem__)
    weights = [scores[e] for e in experts]  # unbiased, as in Gate.route
    if gate.norm_topk_prob:
        total = sum(weights) + 1e-20
        weights = [w / total for w in weights]
    return experts, [w * gate.route_scale for w in weights]


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over rows x [M, n]: RMSNorm without its weight (folded into the next matrix)."""
    if x.shape[0] == 1:  # a dot product and a scalar multiply: ~3 us against F.rms_norm's ~8 us
        v = x[0]
        return x * (1.0 / math.sqrt(float(torch.dot(v, v)) / v.shape[0] + eps))
    return F.rms_norm(x, x.shape[-1:], None, eps)


def _swiglu_of(a: torch.Tensor) -> torch.Tensor:
    """silu(h w1) * (h w3) from a = h [w1 | w3]."""
    inter = a.shape[-1] // 2
    return F.silu(a[:, :inter]).mul_(a[:, inter:])


def _swiglu(h: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """silu(h w1) * (h w3) with w1|w3 stacked [d, 2I]."""
    return _swiglu_of(h @ w13)


def _grouped(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert times w [E, in, out]: one grouped GEMM where the kernel exists, else a loop."""
    if _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    sizes = counts.tolist()
    return torch.cat([x_e @ w[e] for e, x_e in enumerate(x.split(sizes)) if sizes[e]])


def _rope_(x: torch.Tensor, freqs: torch.Tensor) -> None:
    """Rotate adjacent pairs of x [M, n, R] in place by freqs [M, 1, R/2] (complex)."""
    torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(freqs)
