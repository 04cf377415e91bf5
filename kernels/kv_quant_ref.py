"""KV-cache quantization (EXL3_FORMAT.md §6): the format, and its torch reference (the CPU path and the oracle of
the Triton append kernel in kernels/kv_quant.py). Pure torch: importing it never imports triton.

Each token's keys (or values) of one kv head are cut into groups of 32 along head_dim. A group is rotated by the
orthonormal 32-point Hadamard matrix (spreading outliers over the group), scaled by its absmax (one fp16 scale), and
quantized on a midpoint grid of 2^b levels:

    q = clamp(floor(v / s * 2^(b-1) + 2^(b-1)), 0, 2^b - 1)        v ~= ((2q + 1) / 2^b - 1) * s

so the error of every rotated value is at most s / 2^b (half a step). The b-bit codes of a group are stored as one
little-endian *bitstream* in b int32 words: code l occupies stream bits [l*b, l*b + b), i.e. it starts at bit
(l*b) & 31 of word (l*b) >> 5 of the group, lowest bit first. Widths that divide 32 (2, 4, 8) pack 32 / b whole codes
per word; 3, 5, 6 and 7 let some codes straddle two consecutive words of the group. A reader gets a value with one
load (two for a straddling code), a shift and a mask, instead of one load and shift per bit.

Values stay in the rotated domain in the cache. H is symmetric and its own inverse, so attention never un-rotates a
key: q . k = (H q) . (H k) -- it rotates the query once. Likewise it sums rotated values and un-rotates the output.

Page layout (one layer, one of K or V): ``codes [pages, page_size, kv_heads, head_dim / 32 * bits]`` int32 and
``scales [pages, page_size, kv_heads, head_dim / 32]`` fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32
MIN_BITS, MAX_BITS = 2, 8
INV_SQRT_GROUP = GROUP**-0.5


@dataclass
class QuantPages:
    """One layer's keys or values, quantized: bitstream-packed codes and one fp16 scale per 32-value group."""

    codes: torch.Tensor  # [pages, page_size, kv_heads, head_dim // 32 * bits] int32
    scales: torch.Tensor  # [pages, page_size, kv_heads, head_dim // 32] float16
    bits: int

    @property
    def head_dim(self) -> int:
        return self.scales.shape[-1] * GROUP

    @property
    def page_size(self) -> int:
        return self.codes.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.codes.shape[2]


def check_bits(bits: int, what: str = "KV cache") -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}")


def check_head_dim(head_dim: int) -> None:
    if head_dim % GROUP:
        raise ValueError(f"a quantized KV cache needs head_dim divisible by {GROUP}, got {head_dim}")


def empty_quant_pages(
    num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, bits: int, device: torch.device | str
) -> QuantPages:
    check_bits(bits)
    check_head_dim(head_dim)
    groups = head_dim // GROUP
    codes = torch.zeros((num_pages, page_size, num_kv_heads, groups * bits), dtype=torch.int32, device=device)
    scales = torch.zeros((num_pages, page_size, num_kv_heads, groups), dtype=torch.float16, device=device)
    return QuantPages(codes, scales, bits)


def quant_bytes_per_value(bits: int) -> float:
    """Cache bytes per quantized value: b bits plus a 16-bit scale shared by 32 values."""
    return (bits * GROUP + 16) / 8 / GROUP


_HADAMARD: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def hadamard_signs(device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 32 x 32 Sylvester Hadamard matrix (+-1 entries, symmetric), cached per device and dtype."""
    key = (str(device), dtype)
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < GROUP:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        _HADAMARD[key] = h.to(device=device, dtype=dtype)
    return _HADAMARD[key]


def rotate_groups(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] with every 32-wide group of the last axis times H / sqrt(32), in float32. Its own inverse."""
    check_head_dim(x.shape[-1])
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    return (groups @ hadamard_signs(x.device) * INV_SQRT_GROUP).reshape(x.shape)


# -- torch reference ----------------------------------------------------------------------------------------------
def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., G*32] (each in [0, 2^bits)) -> bitstream words [..., G*bits] int32."""
    codes = q.to(torch.int64).reshape(*q.shape[:-1], -1, GROUP)
    # A group's stream, lowest bit first: bit i of code l is stream bit l*bits + i, and stream bit 32j + k is bit k of
    # word j, so flattening [32, bits] and cutting the result into rows of 32 gives the words' bits.
    stream = (codes[..., None] >> torch.arange(bits, device=q.device)) & 1  # [..., G, 32, bits]
    stream = stream.reshape(*codes.shape[:-1], bits, 32)
    words = (stream << torch.arange(32, device=q.device)).sum(-1)  # [..., G, bits]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # uint32 bit pattern as int32
    return words.reshape(*q.shape[:-1], -1)


def unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bitstream words [..., G*bits] int32 -> integer codes [..., G*32] (int64); the inverse of ``pack_codes``."""
    words = codes.reshape(*codes.shape[:-1], -1, bits, 1)
    stream = (words >> torch.arange(32, dtype=torch.int32, device=codes.device)) & 1  # [..., G, bits, 32]
    stream = stream.reshape(*words.shape[:-2], GROUP, bits)  # the same stream, cut per code
    q = (stream << torch.arange(bits, dtype=torch.int32, device=codes.device)).sum(-1, dtype=torch.int64)
    return q.reshape(*codes.shape[:-1], -1)


def quantize_ref(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D/32*bits] int32 bitstream words, scales [..., D/32] fp16), rotating each group."""
    check_bits(bits)
    rotated = rotate_groups(x).reshape(*x.shape[:-1], -1, GROUP)
    scales = rotated.abs().amax(-1).to(torch.float16)
    s = scales.float()
    half = float(1 << (bits - 1))
    t = rotated / torch.where(s > 0, s, torch.ones_like(s))[..., None]  # s == 0: a zero group, coded as 0
    q = torch.floor(t * half + half).clamp(0, (1 << bits) - 1).to(torch.int64)
    return pack_codes(q.reshape(*x.shape[:-1], -1), bits), scales


def dequantize_ref(codes: torch.Tensor, scales: torch.Tensor, bits: int, rotated: bool = False) -> torch.Tensor:
    """float32 [..., D] from quantize_ref's output; ``rotated=True`` stays in the rotated domain (what attention
    reads), otherwise the rotation is undone."""
    q = unpack_codes(codes, bits).reshape(*scales.shape, GROUP).float()
    values = ((2 * q + 1) / (1 << bits) - 1) * scales.float()[..., None]
    values = values.reshape(*scales.shape[:-1], -1)
    return values if rotated else rotate_groups(values)


def write_pages_ref(pages: QuantPages, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantize x [T, kv_heads, D] and store it at the slots [T] (the CPU path of the append step)."""
    codes, scales = quantize_ref(x, pages.bits)
    pages.codes.view(-1, *pages.codes.shape[2:]).index_copy_(0, slot_mapping, codes)
    pages.scales.view(-1, *pages.scales.shape[2:]).index_copy_(0, slot_mapping, scales)
