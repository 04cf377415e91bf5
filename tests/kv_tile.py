"""The attention kernel's tile loader run alone, for tests that hold it to the reference bit for bit: the CPU tests
through Triton's interpreter (they import this after setting TRITON_INTERPRET), tests/gpu compiled on CUDA."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import kv_quant_ref
from kernels import paged_attention as triton_attention


@triton.jit
def _tile_kernel(
    out_ptr, pages_ptr, scales_ptr, slots_ptr, kv_head, stride_slot, stride_scale_slot, num_keys,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
    WORD_LOADS: tl.constexpr,
):  # fmt: skip
    """The kernel's tile loader alone: its [BLOCK_N, BLOCK_D] tile for the slots of one kv head, stored as is."""
    rows = tl.arange(0, BLOCK_N)
    k_ok = rows < num_keys
    slots = tl.load(slots_ptr + rows, mask=k_ok, other=0).to(tl.int64)
    tile = triton_attention._load_kv_tile(
        pages_ptr, scales_ptr, slots, k_ok, kv_head, stride_slot, stride_scale_slot, triton_attention.FLOAT_MAGIC,
        HEAD_DIM, BLOCK_N, BLOCK_D, BITS, WORD_LOADS, tl.float32,
    )  # fmt: skip
    dims = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * BLOCK_D + dims[None, :], tile)


def check_tile_loader(bits: int, word_loads: bool, device: str, head_dim: int = 96, num_slots: int = 12) -> None:
    """Random words (every code, straddling ones and set sign bits included) and scales; the loader's tile for kv
    head 1 of a shuffled set of slots (the last slot among them, so its head ends the buffer) must equal the
    reference's dequantized values exactly, and padding keys and dims must read as zeros."""
    gen = torch.Generator().manual_seed(bits * 10 + int(word_loads))
    pages = kv_quant_ref.empty_quant_pages(num_slots // 4, 4, 2, head_dim, bits, device)
    codes = torch.randint(-(1 << 31), 1 << 31, pages.codes.shape, generator=gen, dtype=torch.int64)
    pages.codes.copy_(codes.to(torch.int32))
    pages.scales.copy_(torch.rand(pages.scales.shape, generator=gen) * 4)
    slots = torch.randperm(num_slots, generator=gen)[: num_slots - 1]
    slots[0] = num_slots - 1
    block_n, block_d = triton.next_power_of_2(num_slots), max(32, triton.next_power_of_2(head_dim))
    out = torch.full((block_n, block_d), float("nan"), device=device)
    _tile_kernel[(1,)](
        out, pages.codes, pages.scales, slots.to(device), 1, pages.codes[0, 0].numel(), pages.scales[0, 0].numel(),
        len(slots), HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_D=block_d, BITS=bits, WORD_LOADS=word_loads,
    )  # fmt: skip
    flat_codes = pages.codes.view(num_slots, 2, -1)[slots.to(device), 1]
    flat_scales = pages.scales.view(num_slots, 2, -1)[slots.to(device), 1]
    want = kv_quant_ref.dequantize_ref(flat_codes, flat_scales, bits, rotated=True)
    assert torch.equal(out[: len(slots), :head_dim], want)
    assert not out[len(slots) :].any() and not out[:, head_dim:].any()
