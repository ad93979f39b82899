"""FP8 mixed-precision GEMMs with fine-grained scaling. DeepSeek-V3 §3.3 (Figs. 6-7, App. B), REFERENCE §7.

Every Linear of the decoder except the ones listed below runs its three GEMMs in FP8 E4M3:
    Fprop   y  = x  W^T      [M, N] from x [M, K] and W [N, K]         inner dim K (features in)
    Dgrad   dx = dy W        [M, K] from dy [M, N] and W [N, K]        inner dim N (features out)
    Wgrad   dW = dy^T x      [N, K] from dy [M, N] and x [M, K]        inner dim M (tokens)
with FP32 master weights, FP32 weight gradients and FP32 (or BF16) outputs. Kept in high precision, as in V3:
the embedding, the output head, the MoE gate, all norms, the attention core (softmax(QK^T)V), and MTP's eh_proj
(it is BF16 in the released checkpoint too).

Layouts (read this before the code)
-----------------------------------
A scale is one fp32 number per group of elements; the group's values are stored as `x_fp8 = x / scale` and read
back as `x_fp8 * scale`. scale = amax(|group|) / 448 (448 = the largest E4M3 value), so the group's largest
element lands on 448 and everything else keeps 3 mantissa bits relative to itself. Groups always run along the
GEMM's INNER dimension, so a scale is constant over each 128-long piece of a dot product and can be applied
once per piece:

    activations   1x128 tiles:   x [M, K]  -> scale [M, ceil(K/128)]           (per token, per 128 channels)
    weights     128x128 blocks:  W [N, K]  -> scale [ceil(N/128), ceil(K/128)]  (DeepSeek's `weight_scale_inv`)

An outlier channel then only coarsens the 127 neighbours of its own tile, not the whole tensor (`tests/test_fp8.py`
measures this against one scale per tensor). Ragged edges (K or N not a multiple of 128) are zero-padded for the
amax and cut off again: shapes in = shapes out, scale shapes round up.

The backward needs the SAME data grouped along a DIFFERENT dimension:
- Dgrad's inner dim is N. dy is quantized in 1x128 tiles along N (its natural rows). W's 128x128 blocks are
  square, so W^T uses the very same fp8 values and the transposed scale grid: no requantization.
- Wgrad's inner dim is M (tokens). Both dy and x must be grouped along M: 128x1 tiles of the original layout.
  V3 caches x in FP8 (1x128) after Fprop; the backward dequantizes it, transposes to [K, M] and requantizes
  in 1x128 tiles of the transposed tensor (= 128x1 tiles of x). dy^T likewise. That is the "tile transposition".
  Quantizing activation gradients in 128x128 BLOCKS instead made V3's 16B MoE diverge (App. B.2).

Accumulation: H800 tensor cores accumulate FP8 products with ~14 bits of mantissa, which is 2% off at K=4096.
DeepGEMM promotes the partial sum to an FP32 register every N_C = 128 inner elements (4 WGMMAs), multiplying
in that block's two scales there. `tensor_core_dot` models both schemes; the tests show promotion's gain.

How this runs here
------------------
- CPU (and GPU shapes cuBLAS cannot take): a simulation. Operands are really cast to float8_e4m3fn and back,
  then multiplied in fp32. Because each scale is constant over a 128-wide K block, one fp32 matmul of the
  dequantized operands equals DeepSeek's `fp8_gemm` loop (`acc += (A_kb B_kb^T) a_s[:, kb] b_s[:, kb]`,
  `fp8_gemm_reference` below) up to fp32 summation order. That is the "promoted every 128" GEMM with exact
  (fp32) accumulation inside a block; it costs MORE than an fp32 GEMM (quantization passes) and saves nothing.
- CUDA, Hopper (sm90), CUDA >= 12.9, K and N multiples of 128: `torch.nn.functional.scaled_mm` with
  BlockWise1x128 x BlockWise128x128 (Fprop, Dgrad) or BlockWise1x128 x BlockWise1x128 (Wgrad) scales: real FP8
  tensor-core GEMMs (torch's CPU `_scaled_mm` takes only tensorwise/rowwise scales, REFERENCE §14).
  Written to the layouts torch documents; NOT yet run on a GPU (BENCHMARKS.md, "FP8 (issue 5)").
- Routed experts: `fp8_grouped_linear` runs one FP8 GEMM per expert on its contiguous rows (the per-group
  loop DeepGEMM's grouped kernels fuse). Wgrad tiles never cross an expert boundary.

Easy to get wrong: the amax floor. DeepSeek's act_quant floors amax at 1e-4, which is harmless for activations
and weights. Gradients are much smaller: in the tiny preset a gradient tensor's amax runs from 5e-9 to 5 (median
1e-4), and a 1e-4 floor leaves tiny tiles far below 448, in E4M3's subnormals (measured: one weight gradient's
error vs fp32 went from 9% to 47%). The backward therefore floors at 1e-30, which only guards 0/0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128  # tile width, weight block side, and the promotion interval N_C
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant: amax = max(|x|, 1e-4)
GRAD_AMAX_FLOOR = 1e-30  # gradients: only guard against 0/0 (see the module docstring)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- quantize / dequantize ---------------------------------------------------------------------------------
def scale_from_amax(amax: torch.Tensor, ue8m0: bool = False, floor: float = AMAX_FLOOR) -> torch.Tensor:
    """scale = max(amax, floor) / 448; ue8m0 rounds it UP to a power of two (so nothing exceeds 448)."""
    scale = amax.float().clamp_min(floor) / E4M3_MAX
    if ue8m0:  # an 8-bit exponent, no mantissa: multiplying by it is exact
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    # x/scale can round a hair above 448. CPU casts saturate, but don't rely on every backend doing so.
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_tiles(
    x: torch.Tensor, ue8m0: bool = False, floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K] e4m3, scale [..., ceil(K/128)] fp32): one scale per 1x128 tile of the last dim."""
    K = x.shape[-1]
    n = _ceil_div(K, BLOCK)
    tiles = F.pad(x.float(), (0, n * BLOCK - K)).unflatten(-1, (n, BLOCK))  # [..., n, 128], zero-padded
    scale = scale_from_amax(tiles.abs().amax(dim=-1), ue8m0, floor)  # [..., n]
    q = _to_e4m3(tiles / scale.unsqueeze(-1)).flatten(-2)[..., :K]
    return q.contiguous(), scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_tiles: x_fp8 [..., K] times its 1x128 tile scales [..., ceil(K/128)] -> fp32 [..., K]."""
    K = q.shape[-1]
    if scale.shape[-1] != _ceil_div(K, BLOCK) or scale.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"tile scale shape {tuple(scale.shape)} does not fit a {tuple(q.shape)} tensor")
    return q.float() * scale.float().repeat_interleave(BLOCK, dim=-1)[..., :K]


def quantize_blocks(
    w: torch.Tensor, ue8m0: bool = False, block: tuple[int, int] = (BLOCK, BLOCK)
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (w_fp8 [..., N, K] e4m3, scale [..., ceil(N/bn), ceil(K/bk)] fp32), one per block.

    Leading dims are kept, so stacked experts [E, N, K] get scales [E, ceil(N/128), ceil(K/128)].
    """
    bn, bk = block
    N, K = w.shape[-2:]
    nn_, nk = _ceil_div(N, bn), _ceil_div(K, bk)
    padded = F.pad(w.float(), (0, nk * bk - K, 0, nn_ * bn - N))
    blocks = padded.unflatten(-1, (nk, bk)).unflatten(-3, (nn_, bn))  # [..., nN, bn, nK, bk]
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)), ue8m0)  # [..., nN, nK]
    q = _to_e4m3(blocks / scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :N, :K]
    return q.contiguous(), scale


def block_scale_shape(shape: tuple[int, ...], block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, ...]:
    """The scale grid of a [..., N, K] weight: [..., ceil(N/bn), ceil(K/bk)] (e.g. [576, 7168] -> [5, 56])."""
    *lead, N, K = shape
    return (*lead, _ceil_div(N, block[0]), _ceil_div(K, block[1]))


def dequantize_blocks(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)
) -> torch.Tensor:
    """w_fp8 [..., N, K] times its block scales [..., ceil(N/bn), ceil(K/bk)] -> fp32. A multiply, always.

    This is also how released DeepSeek-V3 checkpoints are read: `W = W_fp8 * weight_scale_inv` (nanoseek.hf).
    """
    N, K = q.shape[-2:]
    if tuple(scale.shape) != block_scale_shape(tuple(q.shape), block):
        raise ValueError(
            f"block scale shape {tuple(scale.shape)} does not fit a {tuple(q.shape)} tensor in {block} blocks"
        )
    full = scale.float().repeat_interleave(block[0], dim=-2)[..., :N, :].repeat_interleave(block[1], dim=-1)
    return q.float() * full[..., :K]


# ---- GEMMs -------------------------------------------------------------------------------------------------
def _b_scale_rows(b_scale: torch.Tensor, n: int, b_block: int) -> torch.Tensor:
    """B's scales [ceil(N/b_block), nK] -> one row per row of B [N, nK]."""
    return b_scale.float().repeat_interleave(b_block, dim=0)[:n]


def fp8_gemm_reference(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_block: int
) -> torch.Tensor:
    """DeepSeek's fp8_gemm, literally (REFERENCE §7): A [M, K] @ B [N, K]^T -> fp32 [M, N], one K block at a time.

        for kb in K blocks:  acc_fp32 += (A[:, kb] B[:, kb]^T) * a_s[m, kb] * b_s[n // b_block, kb]

    a_s [M, nK] are 1x128 tile scales; b_block = 128 for a weight's 128x128 blocks, 1 for 1x128 tiles.
    The slow, obviously-right version: `fp8_mm` must agree with it (tests/test_fp8.py).
    """
    M, K = a_q.shape
    N = b_q.shape[0]
    b_rows = _b_scale_rows(b_s, N, b_block)  # [N, nK]
    acc = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    for kb in range(_ceil_div(K, BLOCK)):
        ks = slice(kb * BLOCK, (kb + 1) * BLOCK)
        partial = a_q[:, ks].float() @ b_q[:, ks].float().t()  # exact: e4m3 products fit fp32
        acc += partial * a_s[:, kb : kb + 1].float() * b_rows[:, kb]
    return acc


def _cuda_blockwise_ok(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    """Can cuBLAS run this blockwise-scaled GEMM? Hopper, CUDA >= 12.9, K and N whole 128-blocks."""
    if a_q.device.type != "cuda" or not hasattr(F, "scaled_mm") or torch.version.cuda is None:
        return False
    cuda = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    K, N = a_q.shape[1], b_q.shape[0]
    return (
        torch.cuda.get_device_capability(a_q.device)[0] == 9
        and cuda >= (12, 9)
        and K % BLOCK == 0
        and N % BLOCK == 0
        and a_q.shape[0] > 0
        and a_q.shape[0] % 16 == 0
    )


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, stride (1, rows): the 'outer-dim-major' scale layout cuBLAS wants."""
    return t.t().contiguous().t()


def _scaled_mm_cuda(a_q, a_s, b_q, b_s, b_block: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Real FP8 GEMM via torch.nn.functional.scaled_mm (layouts from torch's _meta_registrations, torch 2.13).

    A [M, K] row-major with 1x128 scales [M, K/128] column-major. B goes in as [K, N] column-major (= our [N, K]
    row-major, transposed). B's scales: 1x128 tiles [N, K/128] column-major, or 128x128 blocks as a
    [L4, N/128] column-major view where L4 = K/128 rounded up to a multiple of 4 (cuBLAS's padding).
    UNTESTED: no GPU was available when this was written; tests/test_fp8.py checks it against
    fp8_gemm_reference when a Hopper GPU is present.
    """
    ST = F.ScalingType
    if b_block == 1:
        sb, recipe_b = _column_major(b_s.float()), ST.BlockWise1x128
    else:
        nk = b_s.shape[1]
        l4 = _ceil_div(nk, 4) * 4
        sb = F.pad(b_s.float(), (0, l4 - nk)).contiguous().t()  # [L4, N/128], stride (1, L4)
        recipe_b = ST.BlockWise128x128
    return F.scaled_mm(
        a_q.contiguous(),
        b_q.contiguous().t(),
        _column_major(a_s.float()),
        ST.BlockWise1x128,
        sb,
        recipe_b,
        output_dtype=out_dtype,
    )


_CUBLAS_UNSUPPORTED: set[tuple[int, int, int]] = (
    set()
)  # (K, N, b_block) cuBLAS refused: simulated from then on


def fp8_mm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    b_block: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A [M, K] @ B [N, K]^T -> [M, N] from FP8 operands and their scales (see fp8_gemm_reference for layouts).

    A real FP8 GEMM where cuBLAS supports the layout, else the simulation: dequantize both, one fp32 matmul.
    """
    key = (a_q.shape[1], b_q.shape[0], b_block)
    if _cuda_blockwise_ok(a_q, b_q) and key not in _CUBLAS_UNSUPPORTED:
        try:
            return _scaled_mm_cuda(a_q, a_s, b_q, b_s, b_block, out_dtype)
        except RuntimeError as err:  # e.g. CUBLAS_STATUS_NOT_SUPPORTED for K = 128 on torch 2.11 / CUDA 13.0
            if "CUBLAS_STATUS_NOT_SUPPORTED" not in str(err):
                raise
            _CUBLAS_UNSUPPORTED.add(
                key
            )  # a status code, not a fault: the context is fine; simulate this shape
    a = dequantize_tiles(a_q, a_s)
    b = dequantize_tiles(b_q, b_s) if b_block == 1 else dequantize_blocks(b_q, b_s)
    with torch.autocast(a.device.type, enabled=False):  # the simulation's accumulator is fp32, always
        return (a @ b.t()).to(out_dtype)


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to `bits` significant bits (round-to-nearest): a register narrower than fp32's 24."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, |mantissa| in [0.5, 1)
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def tensor_core_dot(
    a: torch.Tensor, b: torch.Tensor, bits: int = 14, promote_every: int | None = BLOCK
) -> torch.Tensor:
    """A [M, K] @ B [N, K]^T with a limited-precision accumulator, the V3 §3.3.2 model of H800 FP8 MMA.

    Products are added one K element at a time into a register that keeps `bits` significant bits. With
    `promote_every=128` the register is added into an FP32 accumulator and cleared every 128 elements (N_C);
    with None it never is (the whole K-long sum stays in the narrow register). A K-step Python loop: for tests.
    """
    M, K = a.shape
    a, b = a.float(), b.float()
    fp32_acc = torch.zeros(M, b.shape[0], dtype=torch.float32, device=a.device)
    register = torch.zeros_like(fp32_acc)
    for k in range(K):
        register = round_mantissa(register + a[:, k : k + 1] * b[:, k], bits)
        if promote_every is not None and (k + 1) % promote_every == 0:
            fp32_acc, register = fp32_acc + register, torch.zeros_like(register)
    return fp32_acc + register


# ---- autograd: one Linear ----------------------------------------------------------------------------------
class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T with Fprop, Dgrad and Wgrad in FP8; W is the FP32 master weight, dW comes back in FP32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, ue8m0: bool) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        x_q, x_s = quantize_tiles(x_MK, ue8m0)  # 1x128 along K
        w_q, w_s = quantize_blocks(weight, ue8m0)  # 128x128
        y_MN = fp8_mm(x_q, x_s, w_q, w_s, b_block=BLOCK, out_dtype=x.dtype)
        ctx.save_for_backward(x_q, x_s, w_q, w_s)  # x cached in FP8, as V3 does for Wgrad
        ctx.ue8m0, ctx.x_shape, ctx.w_dtype = ue8m0, x.shape, weight.dtype
        return y_MN.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        dy_MN = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: inner dim N; W^T reuses W's fp8 blocks, transposed
            dy_q, dy_s = quantize_tiles(dy_MN, ctx.ue8m0, GRAD_AMAX_FLOOR)
            dx = fp8_mm(dy_q, dy_s, w_q.t(), w_s.t(), b_block=BLOCK, out_dtype=dy.dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad: inner dim M; 128x1 tiles = 1x128 tiles of the transposes
            dyT_q, dyT_s = quantize_tiles(dy_MN.t(), ctx.ue8m0, GRAD_AMAX_FLOOR)  # [N, M]
            xT_q, xT_s = quantize_tiles(dequantize_tiles(x_q, x_s).t(), ctx.ue8m0)  # [K, M]
            dw = fp8_mm(dyT_q, dyT_s, xT_q, xT_s, b_block=1, out_dtype=ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with all three GEMMs in FP8."""
    return _Fp8LinearFunction.apply(x, weight, ue8m0)


class Fp8Linear(nn.Linear):
    """An nn.Linear whose Fprop/Dgrad/Wgrad run in FP8. Same parameters, same state-dict keys."""

    ue8m0: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.ue8m0)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, ue8m0: bool = False) -> Fp8Linear:
        """Wrap an existing layer's Parameters (not copies): optimizers and tied weights stay valid."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias, new.ue8m0 = linear.weight, linear.bias, ue8m0
        return new


# ---- autograd: routed experts ------------------------------------------------------------------------------
class _Fp8GroupedLinearFunction(torch.autograd.Function):
    """Rows of x sorted by expert [T, in] times each expert's W [E, out, in] -> [T, out], one FP8 GEMM per expert.

    x's 1x128 tiles and W's blocks do not care about expert boundaries, so they are quantized once for all rows;
    Wgrad's 128x1 tiles run along tokens and are cut per expert (a tile never mixes two experts' tokens).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int], ue8m0: bool) -> torch.Tensor:
        x_q, x_s = quantize_tiles(x, ue8m0)
        w_q, w_s = quantize_blocks(w, ue8m0)  # [E, out, in], [E, ceil(out/128), ceil(in/128)]
        xs_q, xs_s = x_q.split(counts), x_s.split(counts)
        y = torch.cat([fp8_mm(xs_q[e], xs_s[e], w_q[e], w_s[e], BLOCK, x.dtype) for e in range(len(counts))])
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.counts, ctx.ue8m0, ctx.w_dtype = counts, ue8m0, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        counts, ue8m0 = ctx.counts, ctx.ue8m0
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = quantize_tiles(dy, ue8m0, GRAD_AMAX_FLOOR)
            dq, ds = dy_q.split(counts), dy_s.split(counts)
            dx = torch.cat(
                [fp8_mm(dq[e], ds[e], w_q[e].t(), w_s[e].t(), BLOCK, dy.dtype) for e in range(len(counts))]
            )
        if ctx.needs_input_grad[1]:
            x = dequantize_tiles(x_q, x_s)
            dw = torch.zeros(w_q.shape, dtype=ctx.w_dtype, device=dy.device)
            for e, (dy_e, x_e) in enumerate(zip(dy.split(counts), x.split(counts))):
                if dy_e.shape[0]:
                    dyT_q, dyT_s = quantize_tiles(dy_e.t(), ue8m0, GRAD_AMAX_FLOOR)  # [out, T_e]
                    xT_q, xT_s = quantize_tiles(x_e.t(), ue8m0)  # [in, T_e]
                    dw[e] = fp8_mm(dyT_q, dyT_s, xT_q, xT_s, 1, ctx.w_dtype)
        return dx, dw, None, None


def fp8_grouped_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    offs: torch.Tensor | None = None,
    ue8m0: bool = False,
) -> torch.Tensor:
    """Drop-in for nanoseek.model.moe.grouped_linear (x [T, in] sorted by expert, w [E, out, in]) in FP8.

    `offs` (cumulative counts) is accepted for the signature; the per-expert split uses `counts`.
    """
    return _Fp8GroupedLinearFunction.apply(x, w, [int(c) for c in counts.tolist()], ue8m0)


# ---- converting a model ------------------------------------------------------------------------------------
HIGH_PRECISION_LINEARS = ("head", "eh_proj")  # output head; MTP's projection (BF16 in the release)


def convert_to_fp8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for an Fp8Linear (sharing its Parameters) and switch MoE experts to FP8 GEMMs.

    Untouched, as in V3: the embedding (nn.Embedding), the output head and eh_proj (by name), the MoE gate (a
    plain Parameter), norms, the attention core. A module with an `fp8` attribute (moe.Experts) gets it set to
    True: it then calls fp8_grouped_linear. Returns the same model, converted in place.
    """
    for parent in list(model.modules()):
        if hasattr(parent, "fp8"):
            parent.fp8 = True
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in HIGH_PRECISION_LINEARS:
                setattr(parent, name, Fp8Linear.from_linear(child))
    return model


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers running in FP8 (Fp8Linear modules and FP8 expert groups)."""
    return [n for n, m in model.named_modules() if isinstance(m, Fp8Linear) or getattr(m, "fp8", False)]
