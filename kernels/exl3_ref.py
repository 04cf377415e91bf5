"""Bit-exact torch reference for EXL3 weights: trellis unpacking, the three codebooks, tile layout, Hadamard.

This is the ground truth the Triton kernels (kernels/exl3_*.py) are tested against, and the CPU path of
``Exl3Linear``. Everything is vectorized over tiles; see docs EXL3_FORMAT.md for the format itself.

Facts checked against ExLlamaV3's sources (MIT): the codebook constants and the fp16 rounding of each decode
(codebook.cuh), the MSB-first bit ring and pairwise 16-bit word swap (pack.cu), the state window read
(exl3_dq.cuh), the tensor-core tile order (quantize.py), and the natural (Sylvester) Hadamard order (the
warp-shuffle butterfly in hadamard_inner.cuh).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

CODEBOOKS = ("3inst", "mcg", "mul1")
MCG_MULT = 0xCBAC1FED
MUL1_MULT = 0x83DCD12D
_INST3_MULT = 89226354
_INST3_ADD = 64248484
_MASK32 = 0xFFFFFFFF
HAD_BLOCK = 128
TILE = 16


def _check_k(K: int) -> None:
    if not isinstance(K, int) or not 1 <= K <= 8:
        raise ValueError(f"bits per weight K must be an integer in 1..8, got {K!r}")


def _check_codebook(codebook: str) -> None:
    if codebook not in CODEBOOKS:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {', '.join(CODEBOOKS)}")


@lru_cache(maxsize=8)
def _tile_positions_cpu() -> torch.Tensor:
    s = torch.arange(256)
    lane, j = s // 8, s % 8
    r0, c0 = 2 * (lane % 4), lane // 4
    # j bit 0 -> row +1, bit 1 -> row +8, bit 2 -> col +8 (mma fragment order)
    row = r0 + (j & 1) + 8 * ((j >> 1) & 1)
    col = c0 + 8 * ((j >> 2) & 1)
    return row * TILE + col


def tile_positions(device: torch.device | str | None = None) -> torch.Tensor:
    """LongTensor[256]: trellis sequence position s -> row*16 + col inside the tile (row = input index)."""
    pos = _tile_positions_cpu()
    return pos if device is None else pos.to(device)


@lru_cache(maxsize=16)
def _window_index(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each step t: the logical word holding the window's first bit, and the right shift that aligns it."""
    t = torch.arange(256)
    start = ((t + 1) * K - 16) % (256 * K)  # state_t is the 16-bit window ending at bit (t+1)*K
    return start // 16, 16 - start % 16


def _logical_words(trellis: torch.Tensor, K: int) -> torch.Tensor:
    """Stored int16 words -> logical ring words as int32 in 0..65535, undoing the pairwise swap."""
    if trellis.dtype != torch.int16:
        raise TypeError(f"trellis must be int16, got {trellis.dtype}")
    if trellis.shape[-1] != 16 * K:
        raise ValueError(f"trellis last dim must be 16*K = {16 * K} for K={K}, got {trellis.shape[-1]}")
    words = trellis.to(torch.int32) & 0xFFFF
    shape = words.shape
    return words.reshape(*shape[:-1], 8 * K, 2).flip(-1).reshape(shape)


def unpack_states(trellis: torch.Tensor, K: int) -> torch.Tensor:
    """int16 [..., 16*K] packed tiles -> int32 [..., 256] 16-bit trellis states in sequence order."""
    _check_k(K)
    words = _logical_words(trellis, K)
    # pairs[w] = 32 consecutive ring bits starting at word w (int32 wrap is harmless: we keep 16 low bits)
    pairs = (words << 16) | torch.roll(words, -1, -1)
    w0, shift = (x.to(words.device) for x in _window_index(K))
    windows = torch.gather(pairs, -1, w0.expand(*pairs.shape[:-1], 256))
    return windows.bitwise_right_shift(shift.to(torch.int32)) & 0xFFFF


def pack_codes(codes: torch.Tensor, K: int) -> torch.Tensor:
    """int [..., 256] codes (only the low K bits are used, so states may be passed) -> int16 [..., 16*K].

    The inverse of the storage: codes concatenated MSB first form a 256*K-bit ring, cut into 16-bit words,
    each pair of words swapped so a little-endian 32-bit load sees consecutive bits.
    """
    _check_k(K)
    if codes.shape[-1] != 256:
        raise ValueError(f"codes last dim must be 256 (one 16x16 tile), got {codes.shape[-1]}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    lead = codes.shape[:-1]
    c = codes.to(torch.int32) & ((1 << K) - 1)
    bit_shift = torch.arange(K - 1, -1, -1, dtype=torch.int32, device=codes.device)
    bits = (c.unsqueeze(-1) >> bit_shift) & 1  # [..., 256, K], MSB first
    bits = bits.reshape(*lead, 16 * K, 16)
    weights = torch.arange(15, -1, -1, dtype=torch.int32, device=codes.device)
    words = (bits << weights).sum(-1, dtype=torch.int32)  # [..., 16K] logical words
    words = words.reshape(*lead, 8 * K, 2).flip(-1).reshape(*lead, 16 * K)
    return torch.where(words >= 32768, words - 65536, words).to(torch.int16)


def _fp16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """int tensor of 16-bit patterns (0..65535) -> float16 with those bits."""
    signed = torch.where(bits >= 32768, bits - 65536, bits)
    return signed.to(torch.int16).view(torch.float16)


def decode_states(states: torch.Tensor, codebook: str) -> torch.Tensor:
    """16-bit trellis states (any int dtype) -> float16 codebook values, bit-exact with ExLlamaV3."""
    _check_codebook(codebook)
    s = states.to(torch.int64) & 0xFFFF
    if codebook == "mul1":
        x = (s * MUL1_MULT) & _MASK32
        byte_sum = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        # fp16(1024 + c) is exact (ulp 1 in [1024, 2048)); one fused multiply-add, rounded once to fp16.
        k_inv = _fp16_from_bits(torch.tensor(0x1EEE)).double()
        k_bias = _fp16_from_bits(torch.tensor(0xC931)).double()
        exact = (1024 + byte_sum).double() * k_inv.to(s.device) + k_bias.to(s.device)
        return exact.to(torch.float16)
    if codebook == "3inst":
        x = (s * _INST3_MULT + _INST3_ADD) & _MASK32
    else:
        x = (s * MCG_MULT) & _MASK32
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60
    lo = _fp16_from_bits(x & 0xFFFF).double()
    hi = _fp16_from_bits(x >> 16).double()
    return (lo + hi).to(torch.float16)  # the float64 sum is exact; one rounding, as in __hadd


@lru_cache(maxsize=4)
def _codebook_table_cpu(codebook: str) -> torch.Tensor:
    return decode_states(torch.arange(65536), codebook)


def codebook_table(codebook: str, device: torch.device | str | None = None) -> torch.Tensor:
    """float16 [65536]: the decoded value of every state (a lookup table identical to decode_states)."""
    _check_codebook(codebook)
    table = _codebook_table_cpu(codebook)
    return table if device is None else table.to(device)


def _place_tiles(values: torch.Tensor) -> torch.Tensor:
    """[ti, tj, 256] values in sequence order -> [ti*16, tj*16] matrix (rows = input features)."""
    ti, tj, _ = values.shape
    inverse = torch.argsort(tile_positions(values.device))  # row-major element -> sequence position
    tiles = torch.gather(values, -1, inverse.expand(ti, tj, 256)).reshape(ti, tj, TILE, TILE)
    return tiles.permute(0, 2, 1, 3).reshape(ti * TILE, tj * TILE)


def decode_trellis(trellis: torch.Tensor, K: int, codebook: str) -> torch.Tensor:
    """int16 [in/16, out/16, 16*K] -> float16 W-hat [in, out] (codebook values, tiles placed, no transforms)."""
    _check_k(K)
    _check_codebook(codebook)
    if trellis.dim() != 3:
        raise ValueError(f"trellis must be 3-D (in/16, out/16, 16*K), got shape {tuple(trellis.shape)}")
    ti, tj, _ = trellis.shape
    table = codebook_table(codebook, trellis.device)
    return _place_tiles(table[unpack_states(trellis, K)])


@lru_cache(maxsize=8)
def _hadamard_128_cpu() -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < HAD_BLOCK:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(HAD_BLOCK)


def hadamard_128(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The 128x128 Sylvester Hadamard matrix scaled by 1/sqrt(128) (symmetric and orthogonal)."""
    return _hadamard_128_cpu().to(dtype=dtype, device=device)


def _had_rows(w: torch.Tensor) -> torch.Tensor:
    """Block-diagonal H applied on the left: H @ w for each 128-row block of a [k, n] matrix."""
    k, n = w.shape
    h = hadamard_128(w.dtype, w.device)
    return (h @ w.reshape(k // HAD_BLOCK, HAD_BLOCK, n)).reshape(k, n)


def _had_last(x: torch.Tensor) -> torch.Tensor:
    """Block-diagonal H applied on the right of the last dim: x @ H for each 128-wide block."""
    shape = x.shape
    h = hadamard_128(x.dtype, x.device)
    return (x.reshape(*shape[:-1], shape[-1] // HAD_BLOCK, HAD_BLOCK) @ h).reshape(shape)


def _check_scales(trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor) -> tuple[int, int]:
    k, n = trellis.shape[0] * TILE, trellis.shape[1] * TILE
    if k % HAD_BLOCK or n % HAD_BLOCK:
        raise ValueError(f"padded shape ({k}, {n}) from trellis must be multiples of {HAD_BLOCK}")
    if tuple(suh.shape) != (k,):
        raise ValueError(f"suh must have shape ({k},) to match trellis, got {tuple(suh.shape)}")
    if tuple(svh.shape) != (n,):
        raise ValueError(f"svh must have shape ({n},) to match trellis, got {tuple(svh.shape)}")
    return k, n


def reconstruct_weight(trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, codebook: str) -> torch.Tensor:
    """Dense float16 [in_pad, out_pad] W = diag(suh) H W-hat H diag(svh), computed in float32."""
    _check_scales(trellis, suh, svh)
    w = decode_trellis(trellis, trellis.shape[-1] // 16, codebook).float()
    w = _had_rows(w) * suh.float().unsqueeze(1)
    w = _had_last(w) * svh.float().unsqueeze(0)
    return w.to(torch.float16)


def exl3_matmul_ref(
    x: torch.Tensor,
    trellis: torch.Tensor,
    suh: torch.Tensor,
    svh: torch.Tensor,
    codebook: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (((x * suh) H) W-hat) H * svh + bias without building W; float32 math, returned in x's dtype.

    x is [..., in] with in <= in_pad (missing input features are zero padding); y is [..., out_pad].
    """
    k, n = _check_scales(trellis, suh, svh)
    if x.shape[-1] > k:
        raise ValueError(f"x has {x.shape[-1]} input features but the layer holds only {k}")
    xf = x.float()
    if x.shape[-1] < k:
        xf = torch.nn.functional.pad(xf, (0, k - x.shape[-1]))
    w_hat = decode_trellis(trellis, trellis.shape[-1] // 16, codebook).float()
    y = _had_last(xf * suh.float()) @ w_hat
    y = _had_last(y) * svh.float()
    if bias is not None:
        y = y + torch.nn.functional.pad(bias.float(), (0, n - bias.shape[-1]))
    return y.to(x.dtype)
