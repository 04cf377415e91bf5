"""Block-128 Hadamard transform of the last axis (Triton), with optional scale vectors before and after.

``y = ((x * scale_in) @ H) * scale_out`` for every 128-wide block of the last axis, H the Sylvester-order Hadamard
matrix scaled by 1/sqrt(128) (torch reference: ``kernels.exl3_ref._had_last``). EXL3 uses it on the input side
(``scale_in = suh``) and the output side (``scale_out = svh``) of a quantized linear.

One program owns a (BLOCK_M, 128) block and multiplies it by the +-1 matrix on the tensor cores (tf32, exact +-1
entries, fp32 accumulation), then applies 1/sqrt(128): the transform costs 128 MACs per element, far below a
memory pass on any GPU this runs on, so a butterfly would buy nothing here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

HAD_BLOCK = 128
_SIGNS: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def hadamard_signs(n: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The unnormalized n x n Sylvester Hadamard matrix (+-1 entries), cached per device and dtype."""
    key = (n, str(device), dtype)
    if key not in _SIGNS:
        idx = torch.arange(n)
        bits = idx[:, None] & idx[None, :]
        parity = torch.zeros_like(bits)
        while bool(bits.any()):
            parity ^= bits & 1
            bits >>= 1
        _SIGNS[key] = (1 - 2 * parity).to(dtype=dtype, device=device)
    return _SIGNS[key]


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for t in tensors:
        if t.device.type != "cuda" and not interpret:
            raise ValueError(
                f"Triton kernels need CUDA tensors, got one on {t.device}; on CPU use the kernel's torch reference "
                "(kernels/*_ref.py), or set TRITON_INTERPRET=1 before importing triton (tests)"
            )


@triton.jit
def _hadamard_kernel(
    x_ptr,
    h_ptr,
    scale_in_ptr,
    scale_out_ptr,
    y_ptr,
    M,
    N_IN,
    stride_xm,
    stride_ym,
    HAS_SCALE_IN: tl.constexpr,
    HAS_SCALE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * 128 + tl.arange(0, 128)
    row_ok = rows < M
    col_in = cols < N_IN  # columns past the input's width are zero padding
    x = tl.load(
        x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :],
        mask=row_ok[:, None] & col_in[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_SCALE_IN:
        x *= tl.load(scale_in_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    hidx = tl.arange(0, 128)
    h = tl.load(h_ptr + hidx[:, None] * 128 + hidx[None, :])
    y = tl.dot(x, h) * 0.08838834764831845  # 1/sqrt(128)
    if HAS_SCALE_OUT:
        y *= tl.load(scale_out_ptr + cols).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def hadamard_transform(
    x: torch.Tensor,
    scale_in: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    out_features: int | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-128 Hadamard of the last axis: ``((x * scale_in) @ H) * scale_out``, H orthonormal.

    ``out_features`` (a multiple of 128, at least x's width) zero-pads the last axis first: EXL3 layers pad their
    inputs to 128. ``scale_in`` / ``scale_out`` have ``out_features`` entries. Output dtype defaults to x's;
    ``out`` (rows, out_features), if given, receives the result (a fixed buffer, e.g. for a CUDA graph).
    """
    n_in = x.shape[-1]
    n = n_in if out_features is None else out_features
    if n % HAD_BLOCK or n < n_in:
        raise ValueError(f"Hadamard width must be a multiple of {HAD_BLOCK} and >= the input's {n_in}, got {n}")
    for name, s in (("scale_in", scale_in), ("scale_out", scale_out)):
        if s is not None and tuple(s.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(s.shape)}")
    check_device(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if out is not None and (tuple(out.shape) != (m, n) or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({m}, {n}) tensor, got {tuple(out.shape)}")
    y = out if out is not None else torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m:
        block_m = 64 if m >= 64 else max(16, triton.next_power_of_2(m))
        grid = (triton.cdiv(m, block_m), n // HAD_BLOCK)
        _hadamard_kernel[grid](
            x2,
            hadamard_signs(HAD_BLOCK, x.device),
            scale_in if scale_in is not None else x2,
            scale_out if scale_out is not None else x2,
            y,
            m,
            n_in,
            x2.stride(0),
            y.stride(0),
            HAS_SCALE_IN=scale_in is not None,
            HAS_SCALE_OUT=scale_out is not None,
            BLOCK_M=block_m,
            num_warps=4,
        )
    return y.reshape(*lead, n)
