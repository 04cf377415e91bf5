"""EXL3 trellis decode and dense-weight reconstruction (Triton); torch reference: ``kernels.exl3_ref``.

``decode_tiles`` is the one place that turns packed trellis tiles into codebook values; the fused matmul
(``kernels.exl3_matmul``) calls it too. It works the way the format was designed for: the 256 states of a tile are
read as 32 lanes of 8 consecutive states, each lane from one or two 32-bit words, with a few shifts per state. Eight
values of a lane land on the tile's mma-fragment positions (EXL3_FORMAT.md section 2), assembled with joins and a
permute that cost no data movement before the tile is handed to ``tl.dot`` or stored.

``reconstruct_weight`` builds ``W = diag(suh) H W-hat H diag(svh)`` one 128 x 128 block per program. The block
Hadamard is split one level (H128 = [[H64, H64], [H64, -H64]]): four 64 x 64 quadrants, each multiplied by H64
on the tensor cores, recombined with adds. That halves the Hadamard's tensor work against two dense 128-wide
products, which matters because prefill pays for it on every forward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.hadamard import HAD_BLOCK, check_device, hadamard_signs

CODEBOOK_IDS = {"3inst": 0, "mcg": 1, "mul1": 2}
TILE = 16
RECONSTRUCT_WARPS = 4  # per 128 x 128 block; 8 measured 35-45% slower on an H200


def group_size(K: int) -> int:
    """States decoded from one pair of 32-bit words: the largest group whose bits always fit in 64."""
    return 8 if K <= 4 else 2 if K == 7 else 4


def check_trellis(trellis: torch.Tensor, codebook: str) -> int:
    """Validate a trellis tensor and codebook name; returns K (bits per weight)."""
    if codebook not in CODEBOOK_IDS:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {', '.join(CODEBOOK_IDS)}")
    if trellis.dtype != torch.int16:
        raise TypeError(f"trellis must be int16, got {trellis.dtype}")
    if trellis.dim() != 3 or trellis.shape[-1] % 16 or not 1 <= trellis.shape[-1] // 16 <= 8:
        raise ValueError(f"trellis must have shape (in/16, out/16, 16*K) with K in 1..8, got {tuple(trellis.shape)}")
    return trellis.shape[-1] // 16


def use_asm() -> bool:
    """Inline PTX for the codebooks on CUDA; the interpreter (TRITON_INTERPRET=1) runs the portable ops."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


def trellis_words(trellis: torch.Tensor) -> torch.Tensor:
    """The trellis as little-endian 32-bit words: each holds 32 consecutive bits of a tile's ring, MSB first."""
    return trellis.contiguous().view(torch.int32)


@triton.jit
def codebook_value(state, CODEBOOK: tl.constexpr, ASM: tl.constexpr):
    """uint32 16-bit trellis states -> float16 codebook values, rounded exactly as ExLlamaV3 rounds them.

    ASM (CUDA only) folds mask+xor into one lop3 and the byte sum into one dp4a; the portable path computes
    the same bits with plain integer ops (the interpreter runs that one).
    """
    if CODEBOOK == 2:  # MUL1: fp16 fma(1024 + byte_sum(x), 0x1EEE, 0xC931), rounded once
        x = state * 0x83DCD12D
        if ASM:
            # dp4a: 0x6400 + byte sum = the fp16 bits of 1024 + byte_sum (ulp 1 in [1024, 2048))
            bits = tl.inline_asm_elementwise(
                "dp4a.u32.u32 $0, $1, 0x01010101, 0x6400;", "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1
            )
            h = bits.to(tl.uint16).to(tl.float16, bitcast=True)
            return tl.fma(h, tl.full((), 0.0067672729492187500, tl.float16), tl.full((), -10.3828125, tl.float16))
        else:
            pairs = (x & 0x00FF00FF) + ((x >> 8) & 0x00FF00FF)
            byte_sum = (pairs + (pairs >> 16)) & 0xFFFF
            f = (byte_sum * 8192 + 0x44800000).to(tl.float32, bitcast=True)  # the fp32 bits of 1024 + byte_sum
            return (f * 0.0067672729492187500 - 10.3828125).to(tl.float16)  # exact in fp32, one rounding
    else:  # 3INST / MCG: mask and xor, then the fp16 sum of the two halves
        if CODEBOOK == 0:
            x = state * 89226354 + 64248484
        else:
            x = state * 0xCBAC1FED
        if ASM:
            x = tl.inline_asm_elementwise(
                "lop3.b32 $0, $1, 0x8FFF8FFF, 0x3B603B60, 0x6A;", "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1
            )
        else:
            x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        lo = x.to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        return lo + hi


@triton.jit
def _group_start(lane, q: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """The first bit of group q's first window for each lane, kept >= 0 (counted modulo the tile's ring)."""
    return (8 * lane + q * G + 1) * K + (256 * K - 16)


@triton.jit
def _group_words(words_ptr, tile_off, lane, q: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """[lane, tile] (a, b): the two ring words holding the windows of states 8*lane + q*G .. + G-1.

    Lanes run along the first axis: the compiler then puts consecutive lanes, which read neighbouring words of one
    tile, in consecutive threads, so each warp-wide load touches one or two cache lines.
    """
    WORDS: tl.constexpr = 8 * K
    i0 = (_group_start(lane, q, K, G) // 32) % WORDS
    i1 = (i0 + 1) % WORDS
    a = tl.load(words_ptr + i0[:, None] + tile_off[None, :]).to(tl.uint32, bitcast=True)
    b = tl.load(words_ptr + i1[:, None] + tile_off[None, :]).to(tl.uint32, bitcast=True)
    return a, b


@triton.jit
def _group_window(a, b, lane, q: tl.constexpr, K: tl.constexpr, G: tl.constexpr):
    """[lane, tile]: the group's bits from its two words, right-aligned: the group's last state is the low 16 bits."""
    pair = (a.to(tl.uint64) << 32) | b.to(tl.uint64)
    # end of the last window, counted from a's first bit; <= 64 by choice of G
    end = (_group_start(lane, q, K, G) % 32) + 16 + (G - 1) * K
    return pair >> (64 - end).to(tl.uint64)[:, None]


@triton.jit
def _state_value(window, g: tl.constexpr, K: tl.constexpr, G: tl.constexpr, CODEBOOK: tl.constexpr, ASM: tl.constexpr):
    state = ((window >> ((G - 1 - g) * K)) & 0xFFFF).to(tl.uint32)
    return codebook_value(state, CODEBOOK, ASM)


@triton.jit
def tile_words(
    words_ptr, tile_row0, tile_col0, tiles_per_row, K: tl.constexpr, G: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr
):
    """The ring words ``decode_tile_words`` turns into the tiles at rows 16*tile_row0 .., columns 16*tile_col0 ..:
    a tuple (a, b, a, b, ...) with one pair per group of G states (8 / G pairs). Loaded apart from decoding so that
    a caller can fetch the next tiles' words while it decodes these."""
    t = tl.arange(0, TR * TC)
    tile_off = ((tile_row0 + t // TC) * tiles_per_row + tile_col0 + t % TC) * (8 * K)
    lane = tl.arange(0, 32)
    a0, b0 = _group_words(words_ptr, tile_off, lane, 0, K, G)
    if G == 8:
        words = (a0, b0)
    else:
        a1, b1 = _group_words(words_ptr, tile_off, lane, 1, K, G)
        if G == 4:
            words = (a0, b0, a1, b1)
        else:
            a2, b2 = _group_words(words_ptr, tile_off, lane, 2, K, G)
            a3, b3 = _group_words(words_ptr, tile_off, lane, 3, K, G)
            words = (a0, b0, a1, b1, a2, b2, a3, b3)
    return words


@triton.jit
def decode_tile_words(
    words, K: tl.constexpr, G: tl.constexpr, CODEBOOK: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    """W-hat tiles as a float16 (16*TR, 16*TC) tensor from the words ``tile_words`` loaded for them."""
    lane = tl.arange(0, 32)
    # values v{j} [lane, tile] for the lane's 8 consecutive states 8*lane + j
    w0 = _group_window(words[0], words[1], lane, 0, K, G)
    if G == 8:
        v0 = _state_value(w0, 0, K, G, CODEBOOK, ASM)
        v1 = _state_value(w0, 1, K, G, CODEBOOK, ASM)
        v2 = _state_value(w0, 2, K, G, CODEBOOK, ASM)
        v3 = _state_value(w0, 3, K, G, CODEBOOK, ASM)
        v4 = _state_value(w0, 4, K, G, CODEBOOK, ASM)
        v5 = _state_value(w0, 5, K, G, CODEBOOK, ASM)
        v6 = _state_value(w0, 6, K, G, CODEBOOK, ASM)
        v7 = _state_value(w0, 7, K, G, CODEBOOK, ASM)
    elif G == 4:
        w1 = _group_window(words[2], words[3], lane, 1, K, G)
        v0 = _state_value(w0, 0, K, G, CODEBOOK, ASM)
        v1 = _state_value(w0, 1, K, G, CODEBOOK, ASM)
        v2 = _state_value(w0, 2, K, G, CODEBOOK, ASM)
        v3 = _state_value(w0, 3, K, G, CODEBOOK, ASM)
        v4 = _state_value(w1, 0, K, G, CODEBOOK, ASM)
        v5 = _state_value(w1, 1, K, G, CODEBOOK, ASM)
        v6 = _state_value(w1, 2, K, G, CODEBOOK, ASM)
        v7 = _state_value(w1, 3, K, G, CODEBOOK, ASM)
    else:
        w1 = _group_window(words[2], words[3], lane, 1, K, G)
        w2 = _group_window(words[4], words[5], lane, 2, K, G)
        w3 = _group_window(words[6], words[7], lane, 3, K, G)
        v0 = _state_value(w0, 0, K, G, CODEBOOK, ASM)
        v1 = _state_value(w0, 1, K, G, CODEBOOK, ASM)
        v2 = _state_value(w1, 0, K, G, CODEBOOK, ASM)
        v3 = _state_value(w1, 1, K, G, CODEBOOK, ASM)
        v4 = _state_value(w2, 0, K, G, CODEBOOK, ASM)
        v5 = _state_value(w2, 1, K, G, CODEBOOK, ASM)
        v6 = _state_value(w3, 0, K, G, CODEBOOK, ASM)
        v7 = _state_value(w3, 1, K, G, CODEBOOK, ASM)
    # j = j0 + 2*j1 + 4*j2 -> new minor axes (j0, j1, j2), all in one thread's registers
    v = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
    # lane = 4*c0 + q; state (lane, j) sits at row 2q + j0 + 8*j1, column c0 + 8*j2 of its tile
    v = tl.reshape(v, (8, 4, TR, TC, 2, 2, 2))  # (c0, q, tr, tc, j0, j1, j2)
    v = tl.permute(v, (2, 5, 1, 4, 3, 6, 0))  # (tr, j1, q, j0, tc, j2, c0)
    return tl.reshape(v, (16 * TR, 16 * TC))


@triton.jit
def decode_tiles(
    words_ptr,
    tile_row0,
    tile_col0,
    tiles_per_row,
    K: tl.constexpr,
    G: tl.constexpr,
    CODEBOOK: tl.constexpr,
    TR: tl.constexpr,
    TC: tl.constexpr,
    ASM: tl.constexpr,
):
    """W-hat rows 16*tile_row0 .. +16*TR, columns 16*tile_col0 .. +16*TC as a float16 (16*TR, 16*TC) tensor."""
    words = tile_words(words_ptr, tile_row0, tile_col0, tiles_per_row, K, G, TR, TC)
    return decode_tile_words(words, K, G, CODEBOOK, TR, TC, ASM)


@triton.jit
def _decode_kernel(
    words_ptr, w_ptr, tiles_per_row, n_cols, K: tl.constexpr, G: tl.constexpr, CODEBOOK: tl.constexpr, ASM: tl.constexpr
):
    """W-hat only (no transforms), one 128 x 128 block per program."""
    tr0 = tl.program_id(0) * 8
    tc0 = tl.program_id(1) * 8
    w = decode_tiles(words_ptr, tr0, tc0, tiles_per_row, K, G, CODEBOOK, 8, 8, ASM)
    rows = tr0 * 16 + tl.arange(0, 128)
    cols = tc0 * 16 + tl.arange(0, 128)
    tl.store(w_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], w)


@triton.jit
def _store_quadrant(w_ptr, w, row0, col0, n_cols, suh_ptr, svh_ptr):
    rows = row0 + tl.arange(0, 64)
    cols = col0 + tl.arange(0, 64)
    w = w * (tl.load(suh_ptr + rows).to(tl.float32)[:, None] * (1.0 / 128))
    w = w * tl.load(svh_ptr + cols).to(tl.float32)[None, :]
    tl.store(w_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], w.to(w_ptr.dtype.element_ty))


@triton.jit
def _reconstruct_kernel(
    words_ptr,
    h64_ptr,
    suh_ptr,
    svh_ptr,
    w_ptr,
    tiles_per_row,
    n_cols,
    K: tl.constexpr,
    G: tl.constexpr,
    CODEBOOK: tl.constexpr,
    ASM: tl.constexpr,
):
    """W = diag(suh) H W-hat H diag(svh) for one 128 x 128 block, from four 64 x 64 quadrants."""
    tr0 = tl.program_id(0) * 8
    tc0 = tl.program_id(1) * 8
    hidx = tl.arange(0, 64)
    h = tl.load(h64_ptr + hidx[:, None] * 64 + hidx[None, :])  # +-1, fp16
    # right side, per row half r: [D_r0, D_r1] H128 = [D_r0 H + D_r1 H, D_r0 H - D_r1 H] (unnormalized)
    a = tl.dot(decode_tiles(words_ptr, tr0, tc0, tiles_per_row, K, G, CODEBOOK, 4, 4, ASM), h)
    b = tl.dot(decode_tiles(words_ptr, tr0, tc0 + 4, tiles_per_row, K, G, CODEBOOK, 4, 4, ASM), h)
    e00 = (a + b).to(tl.float16)
    e01 = (a - b).to(tl.float16)
    a = tl.dot(decode_tiles(words_ptr, tr0 + 4, tc0, tiles_per_row, K, G, CODEBOOK, 4, 4, ASM), h)
    b = tl.dot(decode_tiles(words_ptr, tr0 + 4, tc0 + 4, tiles_per_row, K, G, CODEBOOK, 4, 4, ASM), h)
    e10 = (a + b).to(tl.float16)
    e11 = (a - b).to(tl.float16)
    # left side, per column half c: H128 [E_0c; E_1c] = [H E_0c + H E_1c; H E_0c - H E_1c]
    row0 = tr0 * 16
    col0 = tc0 * 16
    a = tl.dot(h, e00)
    b = tl.dot(h, e10)
    _store_quadrant(w_ptr, a + b, row0, col0, n_cols, suh_ptr, svh_ptr)
    _store_quadrant(w_ptr, a - b, row0 + 64, col0, n_cols, suh_ptr, svh_ptr)
    a = tl.dot(h, e01)
    b = tl.dot(h, e11)
    _store_quadrant(w_ptr, a + b, row0, col0 + 64, n_cols, suh_ptr, svh_ptr)
    _store_quadrant(w_ptr, a - b, row0 + 64, col0 + 64, n_cols, suh_ptr, svh_ptr)


def decode_trellis(trellis: torch.Tensor, codebook: str) -> torch.Tensor:
    """int16 (in/16, out/16, 16*K) -> float16 W-hat (in, out): codebook values in place, no transforms.

    Bit-exact with ``kernels.exl3_ref.decode_trellis``. in and out must be multiples of 128 (EXL3 pads to that).
    """
    K = check_trellis(trellis, codebook)
    k, n = trellis.shape[0] * TILE, trellis.shape[1] * TILE
    if k % HAD_BLOCK or n % HAD_BLOCK:
        raise ValueError(f"trellis covers ({k}, {n}) weights; both must be multiples of {HAD_BLOCK}")
    check_device(trellis)
    w = torch.empty((k, n), dtype=torch.float16, device=trellis.device)
    grid = (k // HAD_BLOCK, n // HAD_BLOCK)
    _decode_kernel[grid](
        trellis_words(trellis),
        w,
        n // TILE,
        n,
        K=K,
        G=group_size(K),
        CODEBOOK=CODEBOOK_IDS[codebook],
        ASM=use_asm(),
        num_warps=8,
    )
    return w


def reconstruct_weight(
    trellis: torch.Tensor,
    suh: torch.Tensor,
    svh: torch.Tensor,
    codebook: str,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Dense W = diag(suh) H W-hat H diag(svh), shape (in_pad, out_pad), for prefill-sized matmuls ``x @ W``.

    Matches ``kernels.exl3_ref.reconstruct_weight`` within fp16 rounding (one extra fp16 rounding inside the
    Hadamard). ``out_dtype`` may be float16 (default) or bfloat16, to multiply bf16 activations without a cast.
    """
    K = check_trellis(trellis, codebook)
    k, n = trellis.shape[0] * TILE, trellis.shape[1] * TILE
    if k % HAD_BLOCK or n % HAD_BLOCK:
        raise ValueError(f"trellis covers ({k}, {n}) weights; both must be multiples of {HAD_BLOCK}")
    if tuple(suh.shape) != (k,) or tuple(svh.shape) != (n,):
        raise ValueError(f"suh/svh must have shapes ({k},)/({n},), got {tuple(suh.shape)}/{tuple(svh.shape)}")
    if out_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be float16 or bfloat16, got {out_dtype}")
    check_device(trellis, suh, svh)
    w = torch.empty((k, n), dtype=out_dtype, device=trellis.device)
    grid = (k // HAD_BLOCK, n // HAD_BLOCK)
    _reconstruct_kernel[grid](
        trellis_words(trellis),
        hadamard_signs(64, trellis.device, torch.float16),
        suh,
        svh,
        w,
        n // TILE,
        n,
        K=K,
        G=group_size(K),
        CODEBOOK=CODEBOOK_IDS[codebook],
        ASM=use_asm(),
        num_warps=RECONSTRUCT_WARPS,
    )
    return w
