"""EXL3 linear forward ``y = (((x * suh) H) W-hat) H * svh + bias`` (Triton); reference: ``exl3_ref.exl3_matmul_ref``.

Small batches (decode, <= 32 rows) never build W. Three launches:

1. ``hadamard_transform``: ``xh = (x * suh) H`` in fp16 (rows x in: tiny).
2. ``_gemv_kernel``: the grid is (output blocks of 128 columns) x (split-K slices of the input axis), so even a
   1024-wide layer fills the GPU. Each program walks its slice in 128-row steps, decodes each step's trellis tiles
   through ``decode_tiles`` as two 64-row halves (fewer live registers than one 128-row tile) and multiplies them
   transposed, ``W^T xh^T``: the 128 weight columns fill the MMA's 64-row side while the batch (padded to 16 or 32)
   rides along, so 16 rows cost what one row costs. It writes fp32 partial sums laid out (slice, row, column),
   real rows only.
3. ``_finish_kernel``: one program per (128 columns, row) loads all of the row's slices at once and adds them with
   a fixed-shape ``tl.sum`` tree (no atomics: a row gets the same bits alone or batched with up to 16 rows, whatever
   the scheduling), then applies the output Hadamard (one Sylvester level, H128 = [[H64, H64], [H64, -H64]]: exact
   +-1 products summed in fp32, since sums may exceed fp16), ``svh`` and bias, and casts. On an H200 this parallel
   sum took the 4096 x 4096 layer from 21.5 to 14.7 us against the serial loop it replaced.

Fewer launches did not survive the GPU (Triton 3.6, H200 and H100): a last-arriver split-K epilogue faulted at Llama
sizes, and the input Hadamard computed inside the weight kernel passed the interpreter but not the GPU, twice: as
a tf32 ``tl.dot`` feeding the weight ``tl.dot`` (out-of-bounds reads at 8 warps, wrong sums at 4), and as two
64 x 64 fp16 dots per step (Sylvester split) whose results reached the weight dot in registers or through a
per-program scratch line (non-finite outputs at 8 warps, illegal addresses at 4). See BENCHMARKS.md.
``GemvConfig.input_hadamard`` has two in-kernel forms: six butterfly levels of adds per 64-row half (no dot at all),
and one H64 fp16 dot per half feeding the weight dot. Both compile for sm_90a without spills (bench/kernel_sass.py)
and match the reference in the interpreter; on an H100 the butterfly is right and saves the launch for layers of up
to 4096 x 4096 weights at up to 16 rows (``default_config``), while the dot form gives wrong sums
(bench/dot_chain_probe.py, form 1).

Large batches (prefill) rebuild the dense weight once (``reconstruct_weight``) and use the library matmul.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.exl3_reconstruct import (
    CODEBOOK_IDS,
    TILE,
    check_trellis,
    decode_tile_words,
    decode_tiles,
    group_size,
    reconstruct_weight,
    tile_words,
    trellis_words,
    use_asm,
)
from kernels.hadamard import HAD_BLOCK, check_device, hadamard_signs, hadamard_transform

MAX_FUSED_ROWS = 32  # above this, rebuilding W once and running a dense matmul is cheaper
MAX_STEPS = 8  # bounds the number of compiled variants (STEPS is a constexpr)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shapes of the weight and finish kernels (the bench sweeps them).

    splits: split-K slices of the weight kernel (0: about ``waves`` programs per SM); num_warps / num_stages: the
    weight kernel's (num_stages 2 measured 3-6x slower on an H200). finish_warps: the finish kernel's;
    finish_chunk: slices it loads per tile (a power of two; more are added chunk after chunk, in chunk order).
    """

    splits: int = 0
    waves: int = 4
    num_warps: int = 8
    num_stages: int = 1
    finish_warps: int = 4
    finish_chunk: int = 32
    # Load the next step's trellis words while this step decodes (a register double buffer; the kernel's one stage
    # leaves its loads synchronous otherwise). Timed on an H100: faster only at one wave, slower at the default four.
    prefetch: bool = False
    # Where the input Hadamard ``(x * suh) H`` is formed: "launch" (its own kernel, xh read by the weight kernel),
    # "butterfly" (inside the weight kernel, six add/subtract levels per 64-row half) or "dot" (inside, an H64 fp16
    # dot per half). The in-kernel forms save a launch but repeat the transform in every column block's program.
    input_hadamard: str = "launch"


DEFAULT_CONFIG = GemvConfig()
# Layers of at most this many weights form the input Hadamard in the weight kernel (butterfly, 4 warps): on an H100
# (2026-12-07, BENCHMARKS.md) 4096 x 4096 took 12.8 vs 13.9 us and 4096 x 1024 7.7 vs 10.4 us, while 4096 x 14336 and
# 14336 x 4096 lost 1.4-2 us to the transform repeated in every column block's program
SMALL_LAYER_WEIGHTS = 4096 * 4096
SMALL_LAYER_CONFIG = GemvConfig(num_warps=4, input_hadamard="butterfly")
INPUT_HADAMARD = {"launch": 0, "butterfly": 1, "dot": 2}
INV_SQRT128 = tl.constexpr(0.08838834764831845)  # 1/sqrt(128): the orthonormal Hadamard's scale


def default_config(in_features: int, out_features: int, rows: int = 1) -> GemvConfig:
    """The launch config a layer gets when the caller names none: SMALL_LAYER_CONFIG up to SMALL_LAYER_WEIGHTS and
    16 rows (the in-kernel form was checked on the GPU with 16-row programs only; 17-32 rows take 32-row ones)."""
    small = in_features * out_features <= SMALL_LAYER_WEIGHTS and rows <= 16
    return SMALL_LAYER_CONFIG if small else DEFAULT_CONFIG


@triton.jit
def _butterfly_level(v, H: tl.constexpr, BLOCK_M: tl.constexpr):
    """One Sylvester butterfly level over axis 0 of v [64, BLOCK_M]: rows j and j + H of each 2H-row block become
    their sum and difference (the pair's axis is moved last so that split/join can reach it)."""
    v4 = tl.permute(tl.reshape(v, (64 // (2 * H), 2, H, BLOCK_M)), (0, 2, 3, 1))
    a, b = tl.split(v4)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 3, 1, 2)), (64, BLOCK_M))


@triton.jit
def _input_hadamard(x_ptr, suh_ptr, h64, rows, row_ok, stride_x, n_in, step, BLOCK_M: tl.constexpr,
                    IN_HAD: tl.constexpr):  # fmt: skip
    """``((x * suh) H128)^T`` for input rows ``step * 128 ...``, as two fp16 [64, BLOCK_M] halves. H128 is one
    Sylvester level over H64: with a, b the step's two 64-row halves, the result is H64 (a + b) and H64 (a - b).
    ``h64``: the fp16 H64 tile, loaded once per program (read only by the dot form)."""
    r64 = tl.arange(0, 64)
    feat_a = step * 128 + r64
    feat_b = feat_a + 64
    x_t = x_ptr + rows[None, :] * stride_x
    a = tl.load(x_t + feat_a[:, None], mask=row_ok[None, :] & (feat_a < n_in)[:, None], other=0.0).to(tl.float32)
    b = tl.load(x_t + feat_b[:, None], mask=row_ok[None, :] & (feat_b < n_in)[:, None], other=0.0).to(tl.float32)
    a *= tl.load(suh_ptr + feat_a).to(tl.float32)[:, None] * INV_SQRT128
    b *= tl.load(suh_ptr + feat_b).to(tl.float32)[:, None] * INV_SQRT128
    if IN_HAD == 1:
        xh_a, xh_b = a + b, a - b
        for level in tl.static_range(6):
            xh_a = _butterfly_level(xh_a, 1 << level, BLOCK_M)
            xh_b = _butterfly_level(xh_b, 1 << level, BLOCK_M)
        return xh_a.to(tl.float16), xh_b.to(tl.float16)
    return tl.dot(h64, (a + b).to(tl.float16)).to(tl.float16), tl.dot(h64, (a - b).to(tl.float16)).to(tl.float16)


@triton.jit
def _gemv_kernel(
    xh_ptr,  # xh = (x * suh) H, or x itself when IN_HAD forms the transform here
    words_ptr,
    part_ptr,
    suh_ptr,
    h64_ptr,
    M,
    n_cols,
    n_in,
    stride_xh,
    K: tl.constexpr,
    G: tl.constexpr,
    CODEBOOK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STEPS: tl.constexpr,  # 128-row steps per slice (constexpr: the interpreter cannot loop over a runtime count)
    ASM: tl.constexpr,
    PREFETCH: tl.constexpr,  # load the next step's trellis words before decoding this step's (see GemvConfig)
    IN_HAD: tl.constexpr,  # INPUT_HADAMARD: 0 reads xh; 1 and 2 form it from x (see GemvConfig.input_hadamard)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    r64 = tl.arange(0, 64)
    row_ok = rows < M
    tiles_per_row = n_cols // 16
    acc = tl.zeros((128, BLOCK_M), dtype=tl.float32)  # (W^T xh^T) for this program's 128 columns
    h64 = tl.zeros((64, 64), dtype=tl.float16)  # the dot form's Hadamard operand, loaded once, before the loop
    if IN_HAD == 2:
        h64 = tl.load(h64_ptr + r64[:, None] * 64 + r64[None, :]).to(tl.float16)
    if PREFETCH:  # this step's two halves' words, loaded one step ahead
        next_a = tile_words(words_ptr, pid_s * STEPS * 8, pid_n * 8, tiles_per_row, K, G, 4, 8)
        next_b = tile_words(words_ptr, pid_s * STEPS * 8 + 4, pid_n * 8, tiles_per_row, K, G, 4, 8)
    for i in range(STEPS):
        step = pid_s * STEPS + i
        if IN_HAD == 0:
            xh_t = xh_ptr + rows[None, :] * stride_xh + step * 128 + r64[:, None]
            xh_a = tl.load(xh_t, mask=row_ok[None, :], other=0.0)
            xh_b = tl.load(xh_t + 64, mask=row_ok[None, :], other=0.0)
        else:
            xh_a, xh_b = _input_hadamard(xh_ptr, suh_ptr, h64, rows, row_ok, stride_xh, n_in, step, BLOCK_M,
                                         IN_HAD)  # fmt: skip
        if PREFETCH:
            words_a, words_b = next_a, next_b
            ahead = tl.minimum(step + 1, pid_s * STEPS + STEPS - 1)  # the last step re-reads its own words
            next_a = tile_words(words_ptr, ahead * 8, pid_n * 8, tiles_per_row, K, G, 4, 8)
            next_b = tile_words(words_ptr, ahead * 8 + 4, pid_n * 8, tiles_per_row, K, G, 4, 8)
            w_a = decode_tile_words(words_a, K, G, CODEBOOK, 4, 8, ASM)
            w_b = decode_tile_words(words_b, K, G, CODEBOOK, 4, 8, ASM)
        else:
            w_a = decode_tiles(words_ptr, step * 8, pid_n * 8, tiles_per_row, K, G, CODEBOOK, 4, 8, ASM)
            w_b = decode_tiles(words_ptr, step * 8 + 4, pid_n * 8, tiles_per_row, K, G, CODEBOOK, 4, 8, ASM)
        acc = tl.dot(tl.trans(w_a), xh_a, acc)
        acc = tl.dot(tl.trans(w_b), xh_b, acc)
    cols = pid_n * 128 + tl.arange(0, 128)
    # partials laid out (slice, row, column): the finish kernel reads a row's slices as contiguous lines
    tl.store(part_ptr + (pid_s * M + rows[None, :]) * n_cols + cols[:, None], acc, mask=row_ok[None, :])


@triton.jit
def _finish_kernel(
    part_ptr,
    h64_ptr,
    svh_ptr,
    bias_ptr,
    y_ptr,
    M,
    n_cols,
    n_bias,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SPLITS: tl.constexpr,
    CHUNK: tl.constexpr,  # slices per load tile, a power of two
    N_CHUNKS: tl.constexpr,
):
    row = tl.program_id(1)
    r64 = tl.arange(0, 64)
    cols_a = tl.program_id(0) * 128 + r64  # the block's two halves: y = [(a + b) H64, (a - b) H64]
    cols_b = cols_a + 64
    h = tl.load(h64_ptr + r64[:, None] * 64 + r64[None, :])  # independent of the partials: overlaps
    sl = tl.arange(0, CHUNK)
    acc_a = tl.zeros((64,), dtype=tl.float32)
    acc_b = tl.zeros((64,), dtype=tl.float32)
    for c in tl.static_range(N_CHUNKS):  # unrolled: the chunks' loads do not wait for each other
        s = c * CHUNK + sl
        line = part_ptr + (s[:, None] * M + row) * n_cols
        s_ok = (s < SPLITS)[:, None]
        # fixed trees over the slices, then chunk order: deterministic, and the same for any M
        acc_a += tl.sum(tl.load(line + cols_a[None, :], mask=s_ok, other=0.0), axis=0)
        acc_b += tl.sum(tl.load(line + cols_b[None, :], mask=s_ok, other=0.0), axis=0)
    # one row: exact +-products summed in fp32 (a tensor-core dot would need 16 rows)
    y_a = tl.sum((acc_a + acc_b)[:, None] * h, axis=0) * 0.08838834764831845  # 1/sqrt(128)
    y_b = tl.sum((acc_a - acc_b)[:, None] * h, axis=0) * 0.08838834764831845
    _finish_store(y_ptr + row * stride_ym, y_a, cols_a, svh_ptr, bias_ptr, n_bias, HAS_BIAS)
    _finish_store(y_ptr + row * stride_ym, y_b, cols_b, svh_ptr, bias_ptr, n_bias, HAS_BIAS)


@triton.jit
def _finish_store(y_row_ptr, y, cols, svh_ptr, bias_ptr, n_bias, HAS_BIAS: tl.constexpr):
    y *= tl.load(svh_ptr + cols).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < n_bias, other=0.0).to(tl.float32)
    tl.store(y_row_ptr + cols, y.to(y_row_ptr.dtype.element_ty))


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


def gemv_launches(
    x: torch.Tensor,
    trellis: torch.Tensor,
    suh: torch.Tensor,
    svh: torch.Tensor,
    codebook: str,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> tuple[list[Callable[[], None]], torch.Tensor]:
    """``exl3_gemv`` as its launches, in order, with their buffers allocated, and the output they fill.

    ``exl3_gemv`` runs exactly these; the bench also calls them one by one to time each launch. x has at least one
    row. The output is (rows, out_pad): reshape it to x's leading shape.
    """
    K, k, n = _check_layer(x, trellis, suh, svh, codebook, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or default_config(k, n, m)
    if m > MAX_FUSED_ROWS:
        raise ValueError(f"the fused kernel takes at most {MAX_FUSED_ROWS} rows, got {m}; use exl3_matmul")
    if m == 0:
        raise ValueError("gemv_launches needs at least one row")
    k_steps, col_blocks = k // HAD_BLOCK, n // HAD_BLOCK
    if cfg.splits and (k_steps % cfg.splits or k_steps // cfg.splits > MAX_STEPS):
        raise ValueError(
            f"splits={cfg.splits} must divide the {k_steps} input blocks of a ({k}, {n}) layer "
            f"into at most {MAX_STEPS} each"
        )
    if cfg.finish_chunk < 1 or cfg.finish_chunk & (cfg.finish_chunk - 1):
        raise ValueError(f"finish_chunk must be a power of two, got {cfg.finish_chunk}")
    if cfg.input_hadamard not in INPUT_HADAMARD:
        raise ValueError(f"input_hadamard must be one of {sorted(INPUT_HADAMARD)}, got {cfg.input_hadamard!r}")
    in_had = INPUT_HADAMARD[cfg.input_hadamard]
    steps = (
        k_steps // cfg.splits if cfg.splits else _steps_per_split(k_steps, cfg.waves * _num_sms(x.device) // col_blocks)
    )
    splits = k_steps // steps  # independent of m: a row's sums never depend on its batch
    chunk = min(cfg.finish_chunk, triton.next_power_of_2(splits))
    h64 = hadamard_signs(HAD_BLOCK // 2, x.device)  # fp32 +-1, for the finish kernel's output Hadamard
    launches: list[Callable[[], None]] = []
    if in_had == 0:
        xh = torch.empty((m, k), dtype=torch.float16, device=x.device)
        launches.append(functools.partial(hadamard_transform, x2, scale_in=suh, out_features=k, out=xh))
    else:
        xh = x2  # the weight kernel forms (x * suh) H itself
    partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    weight = functools.partial(
        _gemv_kernel[(col_blocks, splits)],
        xh,
        trellis_words(trellis),
        partial,
        suh,
        h64,
        m,
        n,
        x2.shape[1],
        xh.stride(0),
        K=K,
        G=group_size(K),
        CODEBOOK=CODEBOOK_IDS[codebook],
        BLOCK_M=16 if m <= 16 else 32,
        STEPS=steps,
        ASM=use_asm(),
        PREFETCH=cfg.prefetch,
        IN_HAD=in_had,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    finish = functools.partial(
        _finish_kernel[(col_blocks, m)],
        partial,
        h64,
        svh,
        bias if bias is not None else svh,
        y,
        m,
        n,
        bias.shape[0] if bias is not None else 0,
        y.stride(0),
        HAS_BIAS=bias is not None,
        SPLITS=splits,
        CHUNK=chunk,
        N_CHUNKS=triton.cdiv(splits, chunk),
        num_warps=cfg.finish_warps,
    )
    return [*launches, weight, finish], y


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
    lead = x.shape[:-1]
    if lead.numel() == 0:
        _, _, n = _check_layer(x, trellis, suh, svh, codebook, bias)
        return torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    launches, y = gemv_launches(x, trellis, suh, svh, codebook, bias, config)
    for launch in launches:
        launch()
    return y.reshape(*lead, y.shape[1])


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
