"""EXL3 linear forward ``y = (((x * suh) H) W-hat) H * svh + bias`` (Triton); reference: ``exl3_ref.exl3_matmul_ref``.

Small batches (decode, <= 32 rows) never build W. Three launches:

1. ``hadamard_transform``: ``xh = (x * suh) H`` in fp16 (rows x in: tiny).
2. ``_gemv_kernel``: the grid is (output blocks of 128 columns) x (split-K slices of the input axis), so even a
   1024-wide layer fills the GPU. Each program streams its trellis tiles through ``decode_tiles`` in 128-row steps
   and multiplies them transposed, ``W^T xh^T``: the 128 weight columns fill the MMA's 64-row side while the batch
   (padded to 16 or 32) rides along, so 16 rows cost what one row costs. It writes fp32 partial sums.
3. ``_finish_kernel``: adds the slices in slice order (deterministic: a row gets the same bits alone or batched
   with up to 16 rows), applies the output Hadamard (tf32: sums may exceed fp16), ``svh`` and bias, and casts.

A single-launch version (input Hadamard and a last-arriver split-K epilogue inside the weight kernel) passed the
interpreter tests but faulted on an H200 at Llama sizes; see the kernels notes in BENCHMARKS.md before retrying it.

Large batches (prefill) rebuild the dense weight once (``reconstruct_weight``) and use the library matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.exl3_reconstruct import (
    CODEBOOK_IDS,
    TILE,
    check_trellis,
    decode_tiles,
    group_size,
    reconstruct_weight,
    trellis_words,
    use_asm,
)
from kernels.hadamard import HAD_BLOCK, check_device, hadamard_signs, hadamard_transform

MAX_FUSED_ROWS = 32  # above this, rebuilding W once and running a dense matmul is cheaper
MAX_STEPS = 8  # bounds the number of compiled variants (STEPS is a constexpr)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the weight kernel: split-K slices (0: about `waves` programs per SM) and warps."""

    splits: int = 0
    waves: int = 4
    num_warps: int = 8


@triton.jit
def _gemv_kernel(
    xh_ptr,
    words_ptr,
    part_ptr,
    M,
    n_cols,
    stride_xh,
    K: tl.constexpr,
    G: tl.constexpr,
    CODEBOOK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STEPS: tl.constexpr,  # 128-row steps per slice (constexpr: the interpreter cannot loop over a runtime count)
    ASM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    r128 = tl.arange(0, 128)
    acc = tl.zeros((128, BLOCK_M), dtype=tl.float32)  # (W^T xh^T) for this program's 128 columns
    for i in range(STEPS):
        step = pid_s * STEPS + i
        xh = tl.load(
            xh_ptr + rows[None, :] * stride_xh + step * 128 + r128[:, None], mask=(rows < M)[None, :], other=0.0
        )
        w = decode_tiles(words_ptr, step * 8, pid_n * 8, n_cols // 16, K, G, CODEBOOK, 8, 8, ASM)
        acc = tl.dot(tl.trans(w), xh, acc)
    cols = pid_n * 128 + r128
    tl.store(part_ptr + (pid_s * n_cols + cols[:, None]) * BLOCK_M + rows[None, :], acc)


@triton.jit
def _finish_kernel(
    part_ptr,
    h_ptr,
    svh_ptr,
    bias_ptr,
    y_ptr,
    M,
    n_cols,
    n_bias,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLITS: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    r128 = tl.arange(0, 128)
    cols = tl.program_id(0) * 128 + r128
    acc = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    for s in range(SPLITS):  # slice order: results do not depend on scheduling
        acc += tl.load(part_ptr + (s * n_cols + cols[None, :]) * BLOCK_M + rows[:, None])
    y = tl.dot(acc, tl.load(h_ptr + r128[:, None] * 128 + r128[None, :])) * 0.08838834764831845  # 1/sqrt(128)
    y *= tl.load(svh_ptr + cols).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < n_bias, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None])


def _check_layer(
    x: torch.Tensor,
    trellis: torch.Tensor,
    suh: torch.Tensor,
    svh: torch.Tensor,
    codebook: str,
    bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    K = check_trellis(trellis, codebook)
    k, n = trellis.shape[0] * TILE, trellis.shape[1] * TILE
    if k % HAD_BLOCK or n % HAD_BLOCK:
        raise ValueError(f"trellis covers ({k}, {n}) weights; both must be multiples of {HAD_BLOCK}")
    if tuple(suh.shape) != (k,) or tuple(svh.shape) != (n,):
        raise ValueError(f"suh/svh must have shapes ({k},)/({n},), got {tuple(suh.shape)}/{tuple(svh.shape)}")
    if x.shape[-1] > k:
        raise ValueError(f"x has {x.shape[-1]} input features but the layer holds only {k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] > n):
        raise ValueError(f"bias must be 1-D with at most {n} entries, got shape {tuple(bias.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_device(x, trellis, suh, svh)
    return K, k, n


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter: any number gives the same result; a few splits keep split-K exercised


def _steps_per_split(k_steps: int, target_splits: int) -> int:
    """128-row steps per program: a power of two dividing k_steps, near k_steps / target_splits.

    Powers of two, at most MAX_STEPS, keep the compiled variants (STEPS is a constexpr) to a handful per model.
    """
    steps = 1
    while k_steps % (steps * 2) == 0 and steps * 2 * max(1, target_splits) <= k_steps and steps < MAX_STEPS:
        steps *= 2
    return steps


def exl3_gemv(
    x: torch.Tensor,
    trellis: torch.Tensor,
    suh: torch.Tensor,
    svh: torch.Tensor,
    codebook: str,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """The fused small-batch path: x [..., in] (at most 32 rows) -> y [..., out_pad] in x's dtype, W never built."""
    K, k, n = _check_layer(x, trellis, suh, svh, codebook, bias)
    cfg = config or GemvConfig()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > MAX_FUSED_ROWS:
        raise ValueError(f"the fused kernel takes at most {MAX_FUSED_ROWS} rows, got {m}; use exl3_matmul")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    k_steps, col_blocks = k // HAD_BLOCK, n // HAD_BLOCK
    if cfg.splits and (k_steps % cfg.splits or k_steps // cfg.splits > MAX_STEPS):
        raise ValueError(
            f"splits={cfg.splits} must divide the {k_steps} input blocks of a ({k}, {n}) layer "
            f"into at most {MAX_STEPS} each"
        )
    steps = (
        k_steps // cfg.splits if cfg.splits else _steps_per_split(k_steps, cfg.waves * _num_sms(x.device) // col_blocks)
    )
    splits = k_steps // steps
    block_m = 16 if m <= 16 else 32
    xh = hadamard_transform(x2, scale_in=suh, out_features=k, out_dtype=torch.float16)
    partial = torch.empty((splits, n, block_m), dtype=torch.float32, device=x.device)
    _gemv_kernel[(col_blocks, splits)](
        xh,
        trellis_words(trellis),
        partial,
        m,
        n,
        xh.stride(0),
        K=K,
        G=group_size(K),
        CODEBOOK=CODEBOOK_IDS[codebook],
        BLOCK_M=block_m,
        STEPS=steps,
        ASM=use_asm(),
        num_warps=cfg.num_warps,
        num_stages=1,
    )
    _finish_kernel[(col_blocks,)](
        partial,
        hadamard_signs(HAD_BLOCK, x.device),
        svh,
        bias if bias is not None else svh,
        y,
        m,
        n,
        bias.shape[0] if bias is not None else 0,
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        SPLITS=splits,
        num_warps=4,
    )
    return y.reshape(*lead, n)


def exl3_matmul(
    x: torch.Tensor,
    trellis: torch.Tensor,
    suh: torch.Tensor,
    svh: torch.Tensor,
    codebook: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """EXL3 linear: x [..., in] (in <= in_pad) -> y [..., out_pad] in x's dtype (float16 or bfloat16).

    Up to 32 rows: the fused kernel. More: W rebuilt in x's dtype, then ``x @ W`` (+ bias) by the library matmul.
    """
    _check_layer(x, trellis, suh, svh, codebook, bias)
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= MAX_FUSED_ROWS:
        return exl3_gemv(x, trellis, suh, svh, codebook, bias)
    w_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
    w = reconstruct_weight(trellis, suh, svh, codebook, out_dtype=w_dtype)
    if x.shape[-1] < w.shape[0]:
        w = w[: x.shape[-1]]  # the missing input features are zero padding: their rows never contribute
    y = x.to(w_dtype) @ w
    if bias is not None:
        y[..., : bias.shape[0]] += bias.to(w_dtype)
    return y.to(x.dtype)
