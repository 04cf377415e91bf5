"""RMSNorm and rotary embedding as one Triton launch each, rounding exactly as the torch modules do.

A decoder layer's norms and rotary embeddings are a dozen tiny elementwise kernels in PyTorch (upcast, square, mean,
rsqrt, two multiplies, downcast; slices, negate, concatenate, three multiply/adds per rotated tensor). In a CUDA-graph
step of a small model those launches, not the matmuls, set the pace: on an H100 a graphed step of the default model
runs ~1,280 kernels in ~3.1 ms. These kernels do each job in one launch.

Both round where the torch references (``inference_worker.layers.RMSNorm`` and ``apply_rotary``) round: the norm
scales in float32, rounds to the input dtype, then multiplies by the weight and rounds again; the rotary rounds
each product and then their sum. Only the norm's sum of squares is added in another order (float32), so outputs
match the reference exactly or within one unit in the last place of the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.hadamard import check_device


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to ``dtype`` (to nearest, ties to even), as float32. bfloat16 by bit arithmetic: Triton's
    interpreter (the CPU tests) truncates float32 -> bfloat16 casts, the GPU rounds; this gives both the same bits."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_out, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    dtype = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = _round(_round(x * scale, dtype) * w, dtype).to(dtype)
    tl.store(out_ptr + row * stride_out + cols, y, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over x's last axis with ``weight`` (x's dtype), as ``inference_worker.layers.RMSNorm`` computes it."""
    check_device(x, weight)
    n = x.shape[-1]
    if weight.shape != (n,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be ({n},) in {x.dtype}, got {tuple(weight.shape)} in {weight.dtype}")
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        warps = min(16, max(1, block // 256))  # a row per program: 1 warp for a 64-wide head, 16 for 4096+ hidden
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, n, rows.stride(0), out.stride(0), eps, BLOCK=block, num_warps=warps
        )
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_ot, stride_oh, stride_ct, stride_st,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t, h = (pid // heads).to(tl.int64), (pid % heads).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < HALF
    x = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(x + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF + i, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + i, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + i, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + i, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + i, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # x * cos + cat(-x2, x1) * sin, each product rounded, then the sum
    o1 = _round(_round(x1 * c1, dtype) + _round(-x2 * s1, dtype), dtype).to(dtype)
    o2 = _round(_round(x2 * c2, dtype) + _round(x1 * s2, dtype), dtype).to(dtype)
    out = out_ptr + t * stride_ot + h * stride_oh
    tl.store(out + i, o1, mask=ok)
    tl.store(out + HALF + i, o2, mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by cos, sin [T, head_dim] (the half-split layout), as
    ``inference_worker.layers.apply_rotary`` computes it; x's dtype throughout."""
    check_device(x, cos, sin)
    tokens, heads, dim = x.shape
    if dim % 2 or cos.shape != (tokens, dim) or sin.shape != (tokens, dim):
        raise ValueError(f"x {tuple(x.shape)} needs an even head_dim and cos, sin of shape ({tokens}, {dim})")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens and heads:
        _rotary_kernel[(tokens * heads,)](
            x, cos, sin, out, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            sin.stride(0), HALF=dim // 2, BLOCK=triton.next_power_of_2(dim // 2), num_warps=1,
        )  # fmt: skip
    return out
