"""KV-cache quantization, the Triton side: one kernel that quantizes, packs and stores new tokens' keys or values at
their slots, fused into the step that appends them. The format and the torch reference are in kernels/kv_quant_ref.py
(EXL3_FORMAT.md §6); tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.hadamard import check_device
from kernels.kv_quant_ref import GROUP, QuantPages, hadamard_signs


@triton.jit
def _stream_word(q, lanes, j: tl.constexpr, BITS: tl.constexpr):
    """Word j of each row's bitstream (kv_quant_ref.py): bits [32j, 32j + 32) of the codes q [rows, 32] (uint32),
    code l placed at stream bit l * BITS. A straddling code gives its low bits to one word and its high to the next."""
    at = lanes * BITS - 32 * j  # where code l starts relative to bit 0 of word j: in (-BITS, 32) if it touches it
    up = q << tl.minimum(tl.maximum(at, 0), 31).to(tl.uint32)[None, :]  # bits past 31 fall off
    down = q >> tl.minimum(tl.maximum(-at, 0), 31).to(tl.uint32)[None, :]  # a code begun in word j - 1
    part = tl.where((at >= 0)[None, :], up, down)
    part = tl.where(((at > -BITS) & (at < 32))[None, :], part, 0)
    return tl.sum(part, axis=1)  # disjoint bits: sum == or


@triton.jit
def _quantize_append_kernel(
    x_ptr,
    slot_ptr,
    h_ptr,
    codes_ptr,
    scales_ptr,
    stride_xt,
    NUM_GROUPS: tl.constexpr,  # kv_heads * head_dim / 32: the groups of one token
    BLOCK_G: tl.constexpr,
    BITS: tl.constexpr,
):
    # One program per token: its groups are the rows of a [BLOCK_G, 32] tile.
    token = tl.program_id(0)
    rows = tl.arange(0, BLOCK_G)
    lanes = tl.arange(0, 32)
    row_ok = rows < NUM_GROUPS
    x = tl.load(
        x_ptr + token.to(tl.int64) * stride_xt + rows[:, None] * 32 + lanes[None, :], mask=row_ok[:, None], other=0.0
    ).to(tl.float32)
    h = tl.load(h_ptr + lanes[:, None] * 32 + lanes[None, :])  # +-1: exact; scale after the sum
    rotated = tl.dot(x, h, input_precision="ieee") * 0.17677669529663687  # 1/sqrt(32)

    scale16 = tl.max(tl.abs(rotated), axis=1).to(tl.float16)
    s = scale16.to(tl.float32)
    half: tl.constexpr = 1 << (BITS - 1)
    t = tl.math.div_rn(rotated, tl.where(s > 0, s, 1.0)[:, None])  # IEEE division, like the reference
    q = tl.clamp(tl.floor(t * half + half), 0.0, 2 * half - 1.0).to(tl.uint32)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    tl.store(scales_ptr + slot * NUM_GROUPS + rows, scale16, mask=row_ok)
    code_row = codes_ptr + slot * (NUM_GROUPS * BITS) + rows * BITS
    for j in tl.static_range(BITS):
        tl.store(code_row + j, _stream_word(q, lanes, j, BITS).to(tl.int32, bitcast=True), mask=row_ok)


def quantize_append(pages: QuantPages, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton: quantize x [T, kv_heads, D] and store codes and scales at the slots [T], in one launch."""
    num_tokens, num_kv_heads, head_dim = x.shape
    if (num_kv_heads, head_dim) != (pages.num_kv_heads, pages.head_dim):
        raise ValueError(
            f"x has {num_kv_heads} heads of {head_dim}; the pages hold {pages.num_kv_heads} heads of {pages.head_dim}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have shape ({num_tokens},), got {tuple(slot_mapping.shape)}")
    check_device(x, slot_mapping, pages.codes)
    if num_tokens == 0:
        return
    x = x.reshape(num_tokens, num_kv_heads * head_dim)
    if x.stride(1) != 1:
        x = x.contiguous()
    num_groups = num_kv_heads * head_dim // GROUP
    _quantize_append_kernel[(num_tokens,)](
        x,
        slot_mapping,
        hadamard_signs(x.device),
        pages.codes,
        pages.scales,
        x.stride(0),
        NUM_GROUPS=num_groups,
        BLOCK_G=max(16, triton.next_power_of_2(num_groups)),  # tl.dot wants at least 16 rows
        BITS=pages.bits,
    )
