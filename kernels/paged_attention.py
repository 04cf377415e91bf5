"""Paged attention in Triton: decode and (chunked) prefill over a paged KV cache, fp or quantized pages.

The torch reference is ``inference_worker.attention.paged_attention``; tests compare the two on ragged batches.

One kernel serves every step. A program owns one *query block* of one sequence and one kv head: the rows of its
tile are (query token, query head of that kv head's group) pairs, so GQA heads share every K/V tile they read, and
a decode step (one token per sequence) fills its rows with the group's heads instead of wasting them. The program
walks the sequence's keys through its block table in BLOCK_N tiles (any page size works: each key finds its page),
with an online softmax. Long contexts are split over several programs (flash-decoding) when the batch alone would
not fill the GPU; a second small kernel merges the splits.

Quantized pages (kernels/kv_quant_ref.py) are read directly. Each row's words are loaded once, and every word's
codes are dequantized in the thread that loaded it, with the word's group constants computed once: one shift and one
and-or place a code in a float's mantissa, one exact fma scales it (_dequant_field). tl.join then lays a word's
codes side by side, so the tile reaches the MMA's shared memory in 16-byte stores. Keys and values sit rotated by
the 32-point Hadamard, so the kernel rotates the query once (q . k = Hq . Hk) and un-rotates the output once
(sum p Hv = H sum p v) instead of touching every cached element twice. With quantized pages the dots run keys-major
(K q^T, V^T p^T), the tile as the A operand of Hopper's wgmma: 51 warp instructions per key at K4/V4 against 60
for q K^T, p V. bench/kernel_sass.py counts what the key loop issues for each variant (sm_90a, no GPU needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from kernels.hadamard import check_device
from kernels.kv_quant_ref import QuantPages, hadamard_signs

LOG2E = 1.4426950408889634
# The bits of 2^23 as a float32. The dequantizer ORs a code into them; handed to the kernel as an argument, the
# constant sits in a register, and ptxas folds the preceding AND (whose mask is an immediate) and this OR into one
# LOP3: with both as immediates it needs two instructions per value.
FLOAT_MAGIC = 0x4B000000


# Prefill rows per program (query tokens x group heads) when AttentionConfig.block_m is None. On an H100 (2K chunk
# over 30K cached tokens, bench/kv_cache.py --sweep): 128 rows fastest over fp16 pages and over dequantized copies
# (3.40 / 4.35 ms against 4.14 / 5.60 at 64), 64 over quantized pages read directly (7.79 ms against 13.5 at 128).
PREFILL_ROWS = 128
PREFILL_ROWS_QUANTIZED = 64
SHORT_QUERY_ROWS = 64  # prefill queries of at most this many rows (speculative verification) take no more


@dataclass(frozen=True)
class AttentionConfig:
    # rows per program (query tokens x group heads); None: 16 for decode, else PREFILL_ROWS or, over quantized pages
    # read directly, PREFILL_ROWS_QUANTIZED
    block_m: int | None = None
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int | None = None  # split contexts until about this many programs run; None: 4 per SM
    # Quantized pages of 2, 4 or 8 bits: load each row's words once and dequantize each word's codes in the thread
    # that loaded it (True), or let every value gather its own word (False, what 3, 5, 6 and 7 bits always do).
    # Both are exact; bench/kv_cache.py times them.
    word_loads: bool = True
    # Dot order: K q^T and V^T p^T (True: the K/V tile is the A operand of Hopper's wgmma, fewer instructions per
    # key for a dequantized tile) or q K^T and p V (False). None: keys-major when either side is quantized or the
    # step decodes (fp16 decode on an H100: 732 against 825 us at 16 x 32K).
    keys_major: bool | None = None
    # Long prefills over fully quantized pages: when each cached tile would be dequantized by at least this many query
    # blocks on average, dequantize the batch's pages once into a transient bf16/fp16 copy (still rotated) and attend
    # over that instead. The copy must fit half of the memory the allocator can still hand out. None: never.
    # On an H100 a 2K chunk over 30K K4/V4 tokens took 4.35 ms this way against 7.79 ms directly (fp16: 3.40).
    dequantize_reuse: int | None = 4


@dataclass
class AttentionPlan:
    """How one ragged batch maps onto programs; the same for every layer of a forward, so built once per step."""

    block_seq: torch.Tensor  # [NB] int32: the sequence of each query block
    block_tok: torch.Tensor  # [NB] int32: its first query token, counted within the sequence's chunk
    q_start: torch.Tensor  # [B] int32: the sequence's first row in q
    q_len: torch.Tensor  # [B] int32
    ctx_len: torch.Tensor  # [B] int32
    num_tokens: int
    group: int  # query heads per kv head
    block_m: int
    tokens_per_block: int
    block_n: int
    split_len: int  # keys per split, a multiple of block_n
    num_splits: int
    config: AttentionConfig
    # (page ids, block tables over the copies) when layers attend over dequantized page copies: the same for every
    # layer of the batch, so worked out by the first layer that needs it (see _dequantized_copies)
    copy_layout: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: keep tests small but still exercise splitting


def _prefill_rows(
    query_lens: list[int], context_lens: list[int], group: int, kv_bits: tuple[int | None, int | None],
    config: AttentionConfig,
) -> int:  # fmt: skip
    """PREFILL_ROWS unless the kernel will read quantized pages directly: either side is quantized and the batch will
    not attend over dequantized copies (_dequantized_copies' test, counted in tokens: the plan knows no page size).
    Short queries (speculative verification: a few tokens per sequence) keep 64 rows: 128 would be mostly padding."""
    if max(query_lens) * group <= SHORT_QUERY_ROWS:
        return SHORT_QUERY_ROWS
    if kv_bits == (None, None):
        return PREFILL_ROWS
    if None in kv_bits or config.dequantize_reuse is None:
        return PREFILL_ROWS_QUANTIZED
    copies = _tiles_reused(query_lens, context_lens, max(1, PREFILL_ROWS // group), 1, config.dequantize_reuse)
    return PREFILL_ROWS if copies else PREFILL_ROWS_QUANTIZED


def _tiles_reused(
    query_lens: list[int], context_lens: list[int], tokens_per_block: int, page_size: int, reuse: int
) -> bool:
    """Whether query blocks of ``tokens_per_block`` tokens would dequantize each cached page ``reuse`` times or more
    on average (every query block of a sequence reads its whole context); counted in tokens with page_size 1."""
    if max(query_lens) <= tokens_per_block:  # one block per sequence (decode): each page is read once
        return reuse <= 1
    pages = [-(-c // page_size) for c in context_lens]
    reads = sum(-(-n // tokens_per_block) * p for n, p in zip(query_lens, pages, strict=True))
    return reads >= reuse * sum(pages)


def plan_attention(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    device: torch.device | str,
    config: AttentionConfig | None = None,
    kv_bits: tuple[int | None, int | None] = (None, None),
) -> AttentionPlan:
    """Programs for one step: query blocks of ``block_m`` rows per sequence and kv head, and how many splits of
    the keys each gets (small tensors, built on the host once and shared by every layer). ``kv_bits``, the cache's
    (key, value) bits (None: unquantized), picks the prefill rows when ``config.block_m`` does not."""
    config = config or AttentionConfig()
    device = torch.device(device)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} kv heads evenly")
    if len(query_lens) != len(context_lens) or not query_lens:
        raise ValueError(f"need one context length per query length, got {len(query_lens)} and {len(context_lens)}")
    if any(ql < 1 or ql > cl for ql, cl in zip(query_lens, context_lens, strict=True)):
        raise ValueError(f"each sequence needs 1 <= query_len <= context_len, got {query_lens} and {context_lens}")
    group = num_heads // num_kv_heads
    decode = max(query_lens) == 1
    block_m = config.block_m or (16 if decode else _prefill_rows(query_lens, context_lens, group, kv_bits, config))
    block_m = max(block_m, triton.next_power_of_2(group))
    tokens_per_block = block_m // group

    q_lens = torch.tensor(query_lens, dtype=torch.int32)
    blocks_per_seq = (q_lens + tokens_per_block - 1) // tokens_per_block
    block_seq = torch.repeat_interleave(torch.arange(len(query_lens), dtype=torch.int32), blocks_per_seq)
    first_block = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    block_tok = (torch.arange(len(block_seq), dtype=torch.int32) - first_block[block_seq]) * tokens_per_block

    # Split the keys when the batch gives fewer programs than the GPU wants (decode over long contexts).
    tiles = -(-max(context_lens) // config.block_n)
    programs = len(block_seq) * num_kv_heads
    target = config.target_programs or 4 * _num_sms(device)
    splits = max(1, min(tiles, -(-target // programs)))
    tiles_per_split = -(-tiles // splits)
    splits = -(-tiles // tiles_per_split)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.int32).to(device, non_blocking=True)

    return AttentionPlan(
        block_seq=dev(block_seq),
        block_tok=dev(block_tok),
        q_start=dev(torch.cumsum(q_lens, 0) - q_lens),
        q_len=dev(q_lens),
        ctx_len=dev(torch.tensor(context_lens)),
        num_tokens=int(q_lens.sum()),
        group=group,
        block_m=block_m,
        tokens_per_block=tokens_per_block,
        block_n=config.block_n,
        split_len=tiles_per_split * config.block_n,
        num_splits=splits,
        config=config,
    )


@triton.jit
def _rotate_groups(x, h_ptr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """x [ROWS, BLOCK_D] with each 32-wide group of dims times H32 / sqrt(32), in float32 (x's dtype feeds the dot).

    One 32 x 32 dot over the groups laid out as rows: a block-diagonal [BLOCK_D, BLOCK_D] matrix did the same with
    16x the operand, whose registers spilled the prefill kernel (9-21 KB at 64-128 rows, counted for sm_90a).
    """
    r = tl.arange(0, 32)
    h = tl.load(h_ptr + r[:, None] * 32 + r[None, :]).to(x.dtype)
    y = tl.dot(tl.reshape(x, (ROWS * (BLOCK_D // 32), 32)), h, input_precision=PRECISION)
    return tl.reshape(y, (ROWS, BLOCK_D)) * 0.17677669529663687


@triton.jit
def _dequant_field(words, shift: tl.constexpr, a, c, magic, BITS: tl.constexpr):
    """The code at bit ``shift`` of each word, dequantized with its word's constants from _word_constants: the code
    is moved to mantissa bit 12 of 2^23 (one shift and one and-or), f = 2^23 + code 2^12, and one fma turns f into
    code a + c exactly (a and c absorb 2^-12 and the 2^23; see _word_constants)."""
    if shift > 12:
        moved = words >> (shift - 12)
    elif shift < 12:
        moved = words << (12 - shift)
    else:
        moved = words
    f = ((moved & (((1 << BITS) - 1) << 12)) | magic).to(tl.float32, bitcast=True)
    return f * a + c


@triton.jit
def _word_constants(scale, BITS: tl.constexpr):
    """(a', c') with f a' + c' = code a + c, the reference's ((2 code + 1) / 2^b - 1) s, for f = 2^23 + code 2^12:
    a' = a / 2^12 = 2 s / 2^b / 2^12 and c' = c - 2^11 a = -s (2^(12 - b) + 1 - 2^-b). For a float16 s both are exact
    in float32 (the factor has 13 significant bits for every b from 2 to 8), and so is the fma's result, a number of
    b + 12 significant bits: the values equal the reference's bit for bit."""
    s = scale.to(tl.float32)
    a = s * (2.0 / (1 << BITS) / 4096.0)
    c = s * -(4096.0 / (1 << BITS) + 1.0 - 1.0 / (1 << BITS))
    return a, c


@triton.jit
def _four_codes(words, a, c, magic, first: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    """[..., 2, 2]: the codes at shifts first + step * m, m = 2 * i + k at [..., i, k]. tl.join adds its pair as the
    last dim, so the innermost join holds the pairs m apart by 2 and the outer one those apart by 1."""
    return tl.join(
        tl.join(
            _dequant_field(words, first, a, c, magic, BITS), _dequant_field(words, first + 2 * step, a, c, magic, BITS)
        ),
        tl.join(
            _dequant_field(words, first + step, a, c, magic, BITS),
            _dequant_field(words, first + 3 * step, a, c, magic, BITS),
        ),
    )


@triton.jit
def _eight_codes(words, a, c, magic, first: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    """[..., 2, 2, 2]: the codes at shifts first + step * m in row-major order of m (as _four_codes, one level up)."""
    even = _four_codes(words, a, c, magic, first, 2 * step, BITS)
    return tl.join(even, _four_codes(words, a, c, magic, first + step, 2 * step, BITS))


@triton.jit
def _joined_values(
    pages_ptr,
    scales_ptr,
    slots,
    k_ok,
    kv_head,
    stride_slot,
    stride_scale_slot,
    magic,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] float32 values for BITS in (2, 4, 8): each row's words are loaded once, each word's group
    constants are computed once, and the word's 32 / BITS codes are dequantized in the word's own layout and then
    joined into consecutive dims (code l of word w is dim w * 32 / BITS + l), so no value changes threads. Words
    load as [words, keys], not [keys, words]: then a word's joined codes land in consecutive registers of its thread
    and the tile reaches shared memory in 16-byte stores (2-byte ones the other way round; bench/kernel_sass.py)."""
    BLOCK_W: tl.constexpr = BLOCK_D // 32 * BITS
    words_per_head: tl.constexpr = HEAD_DIM // 32 * BITS
    w = tl.arange(0, BLOCK_W)
    ok = k_ok[None, :] & (w < words_per_head)[:, None]
    words = tl.load(pages_ptr + slots[None, :] * stride_slot + kv_head * words_per_head + w[:, None], mask=ok, other=0)
    words = words.to(tl.uint32, bitcast=True)
    # A row's group scales are contiguous: loaded as one run per row (vectorized, so the pipeliner can prefetch them
    # like the words), then each group's constants repeat over its BITS words.
    BLOCK_G: tl.constexpr = BLOCK_D // 32
    g = tl.arange(0, BLOCK_G)
    g_ok = k_ok[None, :] & (g < HEAD_DIM // 32)[:, None]
    scale = tl.load(
        scales_ptr + slots[None, :] * stride_scale_slot + kv_head * (HEAD_DIM // 32) + g[:, None], mask=g_ok, other=0.0
    )
    a_g, c_g = _word_constants(scale, BITS)
    a = tl.reshape(tl.broadcast_to(a_g[:, None, :], [BLOCK_G, BITS, BLOCK_N]), [BLOCK_W, BLOCK_N])
    c = tl.reshape(tl.broadcast_to(c_g[:, None, :], [BLOCK_G, BITS, BLOCK_N]), [BLOCK_W, BLOCK_N])
    if BITS == 8:
        v = _four_codes(words, a, c, magic, 0, 8, BITS)
        v = tl.permute(v, (1, 0, 2, 3))
    elif BITS == 4:
        v = _eight_codes(words, a, c, magic, 0, 4, BITS)
        v = tl.permute(v, (1, 0, 2, 3, 4))
    else:  # 16 two-bit codes: code 2m + i is the i-th join of the eights at shifts 4m and 4m + 2
        v = tl.join(_eight_codes(words, a, c, magic, 0, 4, BITS), _eight_codes(words, a, c, magic, 2, 4, BITS))
        v = tl.permute(v, (1, 0, 2, 3, 4, 5))
    return tl.reshape(v, [BLOCK_N, BLOCK_D])


@triton.jit
def _gather_codes(group_words, group_ok, BITS: tl.constexpr):
    """[BLOCK_N, BLOCK_G, 32] uint32 whose low BITS bits are the codes, every value loading its own word (the cache
    serves the repeats) and, when BITS does not divide 32, the next one for a code that straddles the two.
    ``group_words``: [BLOCK_N, BLOCK_G] pointers to each group's first word."""
    start = tl.arange(0, 32) * BITS  # the stream bit where code l starts
    word = start >> 5
    shift = (start & 31).to(tl.uint32)[None, None, :]
    mask = group_ok[:, :, None]
    lo = tl.load(group_words[:, :, None] + word[None, None, :], mask=mask, other=0)
    fields = lo.to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:
        # The high bits come from the next word, shifted up to meet the low ones. For a code that does not straddle,
        # they land at bit 32 - shift >= BITS, above the code (the last word of the group reads itself: it is in
        # bounds). Two shifts, as one by 32 - shift would be undefined at shift 0.
        after = tl.minimum(word + 1, BITS - 1)
        hi = tl.load(group_words[:, :, None] + after[None, None, :], mask=mask, other=0)
        fields |= (hi.to(tl.uint32, bitcast=True) << 1) << (31 - shift)
    return fields


@triton.jit
def _codes_as_float(fields, BITS: tl.constexpr):
    """The low BITS bits of each uint32 as float32, exactly: OR them into the mantissa of 2^23, subtract 2^23 (an
    integer-to-float conversion runs at a fraction of the rate of these two instructions)."""
    return ((fields & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_kv_tile(
    pages_ptr,
    scales_ptr,
    slots,
    k_ok,
    kv_head,
    stride_slot,
    stride_scale_slot,
    magic,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """[BLOCK_N, BLOCK_D] keys or values of one kv head at the given slots, as OUT_DTYPE (dequantized if BITS).
    ``magic``: FLOAT_MAGIC, passed in at run time (see there)."""
    dims = tl.arange(0, BLOCK_D)
    if BITS == 0:
        ptrs = pages_ptr + slots[:, None] * stride_slot + kv_head * HEAD_DIM + dims[None, :]
        tile = tl.load(ptrs, mask=k_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    elif WORD_LOADS and 32 % BITS == 0:
        tile = _joined_values(
            pages_ptr, scales_ptr, slots, k_ok, kv_head, stride_slot, stride_scale_slot, magic,
            HEAD_DIM, BLOCK_N, BLOCK_D, BITS,
        )  # fmt: skip
    else:
        # Work on [BLOCK_N, groups, 32] (d = 32 * group + lane) so that per-group terms broadcast over their lanes.
        BLOCK_G: tl.constexpr = BLOCK_D // 32
        groups = tl.arange(0, BLOCK_G)
        group_ok = k_ok[:, None] & (groups < HEAD_DIM // 32)[None, :]
        group = kv_head * (HEAD_DIM // 32) + groups
        fields = _gather_codes(pages_ptr + slots[:, None] * stride_slot + (group * BITS)[None, :], group_ok, BITS)
        scale = tl.load(scales_ptr + slots[:, None] * stride_scale_slot + group[None, :], mask=group_ok, other=0.0)
        # ((2q + 1) / 2^b - 1) s = q a + c with a = 2s / 2^b and c = s (1 / 2^b - 1), once per group: one fma per
        # value. As exact as the reference: q a and c fit in 19 significant bits, so only the sum is rounded.
        a = scale.to(tl.float32) * (2.0 / (1 << BITS))
        c = scale.to(tl.float32) * (1.0 / (1 << BITS) - 1.0)
        value = _codes_as_float(fields, BITS) * a[:, :, None] + c[:, :, None]
        tile = tl.reshape(value, [BLOCK_N, BLOCK_D])
    return tile.to(OUT_DTYPE)


@triton.jit
def _store_rows(
    out_ptr,
    acc,
    l_sum,
    h_ptr,
    q_start,
    tok,
    head,
    row_ok,
    dims,
    dim_ok,
    stride_ot,
    stride_oh,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UNROTATE: tl.constexpr,
):
    out = acc / l_sum[:, None]
    if UNROTATE:  # values were summed in the rotated domain: apply H (its own inverse) once per output row
        out = _rotate_groups(out, h_ptr, BLOCK_M, BLOCK_D, "ieee")
    ptrs = out_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    out_ptr,
    k_ptr,
    k_scales_ptr,
    v_ptr,
    v_scales_ptr,
    h_ptr,
    block_tables_ptr,
    block_seq_ptr,
    block_tok_ptr,
    q_start_ptr,
    q_len_ptr,
    ctx_len_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_k_slot,
    stride_ks_slot,
    stride_v_slot,
    stride_vs_slot,
    split_len,
    window,
    float_magic,
    PAGE_SIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    K_BITS: tl.constexpr,
    V_BITS: tl.constexpr,
    SPLIT: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    KEYS_MAJOR: tl.constexpr,
    ROTATED_K: tl.constexpr,  # keys / values sit in the rotated domain (quantized pages, or dequantized copies)
    ROTATED_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(block_seq_ptr + block)
    tok0 = tl.load(block_tok_ptr + block)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_len_ptr + seq)
    ctx = tl.load(ctx_len_ptr + seq)

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP_SIZE
    head = kv_head * GROUP_SIZE + rows % GROUP_SIZE
    row_ok = (rows < TOKENS_PER_BLOCK * GROUP_SIZE) & (tok < q_len)
    # keys past the block's last query token are in everyone's future
    kv_end = ctx - q_len + tl.minimum(tok0 + TOKENS_PER_BLOCK, q_len)
    q_pos = tl.where(row_ok, ctx - q_len + tok, kv_end - 1)  # padding rows copy the last real one: never empty
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if ROTATED_K:  # keys are stored rotated: rotate the query once instead of un-rotating every key
        q = _rotate_groups(q, h_ptr, BLOCK_M, BLOCK_D, DOT_PRECISION).to(q.dtype)

    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_end)
    if HAS_WINDOW:  # keys older than the first query's window are nobody's
        lo = tl.maximum(lo, ctx - q_len + tok0 - window + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        page = tl.load(table + k_pos // PAGE_SIZE, mask=k_ok, other=0)
        slots = page.to(tl.int64) * PAGE_SIZE + k_pos % PAGE_SIZE
        k = _load_kv_tile(
            k_ptr, k_scales_ptr, slots, k_ok, kv_head, stride_k_slot, stride_ks_slot, float_magic,
            HEAD_DIM, BLOCK_N, BLOCK_D, K_BITS, WORD_LOADS, q.dtype,
        )  # fmt: skip
        if KEYS_MAJOR:  # s^T = K q^T: the key tile is the MMA's A operand
            s = tl.trans(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)) * sm_scale_log2
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if HAS_WINDOW:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_kv_tile(
            v_ptr, v_scales_ptr, slots, k_ok, kv_head, stride_v_slot, stride_vs_slot, float_magic,
            HEAD_DIM, BLOCK_N, BLOCK_D, V_BITS, WORD_LOADS, q.dtype,
        )  # fmt: skip
        if KEYS_MAJOR:  # acc^T += V^T p^T, the value tile as the A operand
            pv = tl.trans(tl.dot(tl.trans(v), tl.trans(p.to(q.dtype)), input_precision=DOT_PRECISION))
        else:
            pv = tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:  # partial softmax state for the merge kernel: [block, kv_head, split, row]
        part = ((block * tl.num_programs(1) + kv_head) * tl.num_programs(2) + split).to(tl.int64) * BLOCK_M + rows
        tl.store(part_m_ptr + part, m_i)
        tl.store(part_l_ptr + part, l_i)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc)
    else:
        _store_rows(
            out_ptr, acc, l_i, h_ptr, q_start, tok, head, row_ok, dims, dim_ok, stride_ot, stride_oh, BLOCK_M, BLOCK_D,
            ROTATED_V,
        )  # fmt: skip


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    out_ptr,
    h_ptr,
    block_seq_ptr,
    block_tok_ptr,
    q_start_ptr,
    q_len_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    GROUP_SIZE: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UNROTATE: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(block_seq_ptr + block)
    tok0 = tl.load(block_tok_ptr + block)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_len_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP_SIZE
    head = kv_head * GROUP_SIZE + rows % GROUP_SIZE
    row_ok = (rows < TOKENS_PER_BLOCK * GROUP_SIZE) & (tok < q_len)
    dims = tl.arange(0, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = (block * tl.num_programs(1) + kv_head).to(tl.int64) * num_splits
    for split in range(0, num_splits):
        part = (first + split) * BLOCK_M + rows
        m_s = tl.load(part_m_ptr + part)
        m_new = tl.maximum(m_i, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split that saw no key has l = 0, acc = 0
        alpha = tl.exp2(m_i - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l_i = l_i * alpha + tl.load(part_l_ptr + part) * beta
        acc = acc * alpha[:, None] + tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :]) * beta[:, None]
        m_i = m_new
    _store_rows(
        out_ptr, acc, l_i, h_ptr, q_start, tok, head, row_ok, dims, dims < HEAD_DIM, stride_ot, stride_oh, BLOCK_M,
        BLOCK_D, UNROTATE,
    )  # fmt: skip


@triton.jit
def _dequantize_pages_kernel(
    pages_ptr,
    scales_ptr,
    page_ids_ptr,
    out_ptr,
    stride_slot,
    stride_scale_slot,
    magic,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BITS: tl.constexpr,
):
    """Copy p of one kv head: the rotated values of page page_ids[p], in out's dtype, at out[p, :, head, :]."""
    copy = tl.program_id(0)
    kv_head = tl.program_id(1)
    page = tl.load(page_ids_ptr + copy).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < PAGE_SIZE
    tile = _load_kv_tile(
        pages_ptr, scales_ptr, page * PAGE_SIZE + rows, row_ok, kv_head, stride_slot, stride_scale_slot, magic,
        HEAD_DIM, BLOCK_N, BLOCK_D, BITS, True, out_ptr.dtype.element_ty,
    )  # fmt: skip
    dims = tl.arange(0, BLOCK_D)
    slot = (copy * PAGE_SIZE + rows).to(tl.int64)
    ptrs = out_ptr + (slot[:, None] * tl.num_programs(1) + kv_head) * HEAD_DIM + dims[None, :]
    tl.store(ptrs, tile, mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])


def dequantize_pages(pages: QuantPages, page_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[len(page_ids), page_size, kv_heads, head_dim] in ``dtype``: the listed pages dequantized, still rotated
    (what the attention kernel reads from quantized pages, value for value)."""
    num_pages, page_size, num_kv_heads, head_dim = len(page_ids), pages.page_size, pages.num_kv_heads, pages.head_dim
    out = torch.empty(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=pages.codes.device)
    if num_pages:
        _dequantize_pages_kernel[(num_pages, num_kv_heads)](
            pages.codes, pages.scales, page_ids, out,
            pages.codes[0, 0].numel(), pages.scales[0, 0].numel(), FLOAT_MAGIC,
            PAGE_SIZE=page_size, HEAD_DIM=head_dim, BLOCK_N=triton.next_power_of_2(page_size),
            BLOCK_D=max(32, triton.next_power_of_2(head_dim)), BITS=pages.bits,
        )  # fmt: skip
    return out


def _allocatable_bytes(device: torch.device) -> int:
    """Memory a new allocation can still get: the device's free memory plus what torch holds cached but unused."""
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _dequantized_copies(
    k_pages: torch.Tensor | QuantPages,
    v_pages: torch.Tensor | QuantPages,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    plan: AttentionPlan,
    dtype: torch.dtype,
    config: AttentionConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(keys, values, block tables) over rotated copies of the pages the batch reads, when both sides are quantized
    and long queries would otherwise dequantize each cached tile config.dequantize_reuse times or more (every query
    block of a sequence reads its whole context); None to attend over the quantized pages directly."""
    if config.dequantize_reuse is None or not (isinstance(k_pages, QuantPages) and isinstance(v_pages, QuantPages)):
        return None
    page_size = k_pages.page_size
    if not _tiles_reused(query_lens, context_lens, plan.tokens_per_block, page_size, config.dequantize_reuse):
        return None
    pages = [-(-c // page_size) for c in context_lens]
    copy_bytes = 2 * sum(pages) * page_size * k_pages.num_kv_heads * k_pages.head_dim * torch.finfo(dtype).bits // 8
    if 2 * copy_bytes > _allocatable_bytes(block_tables.device):
        return None
    if plan.copy_layout is None:
        plan.copy_layout = _copy_layout(block_tables, pages)
    page_ids, tables = plan.copy_layout
    return dequantize_pages(k_pages, page_ids, dtype), dequantize_pages(v_pages, page_ids, dtype), tables


def _copy_layout(block_tables: torch.Tensor, pages: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(page ids to copy, block tables over the copies): copy j of sequence b is its j-th page; a page two sequences
    share is copied for each (shared prefixes are rare in long prefills)."""
    device = block_tables.device
    rows = torch.tensor([b for b, n in enumerate(pages) for _ in range(n)]).to(device)
    cols = torch.tensor([j for n in pages for j in range(n)]).to(device)
    page_ids = block_tables[rows, cols].contiguous()
    tables = torch.zeros(len(pages), max(pages), dtype=block_tables.dtype, device=device)
    tables[rows, cols] = torch.arange(len(page_ids), dtype=block_tables.dtype, device=device)
    return page_ids, tables


def _pages_args(pages: torch.Tensor | QuantPages) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(data, scales, stride per slot, scale stride per slot, bits) for one side; scales is data when unquantized."""
    if isinstance(pages, QuantPages):
        codes, scales = pages.codes, pages.scales
        return codes, scales, codes[0, 0].numel(), scales[0, 0].numel(), pages.bits
    return pages, pages, pages[0, 0].numel(), 0, 0


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor | QuantPages,
    v_pages: torch.Tensor | QuantPages,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float | None = None,
    window: int | None = None,
    plan: AttentionPlan | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, heads, head_dim] over paged K/V (see inference_worker.attention for the contract;
    ``window``: each query sees only that many latest positions, its own included).

    Pages are ``[pages, page_size, kv_heads, head_dim]`` tensors in q's dtype, or ``QuantPages``. ``plan`` (from
    ``plan_attention``) may be passed to share it between layers; it fixes the tile shapes and splits, while
    ``config`` (default: the plan's) gives the kernel's warps, stages and word loads. Returns [T, heads, head_dim]
    in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    k_data, k_scales, k_stride, ks_stride, k_bits = _pages_args(k_pages)
    v_data, v_scales, v_stride, vs_stride, v_bits = _pages_args(v_pages)
    page_size, num_kv_heads = k_data.shape[1], k_data.shape[2]
    for name, data, bits in (("k", k_data, k_bits), ("v", v_data, v_bits)):
        if not bits and (data.dtype != q.dtype or tuple(data.shape[2:]) != (num_kv_heads, head_dim)):
            raise ValueError(
                f"{name} pages must be [pages, page_size, {num_kv_heads}, {head_dim}] in {q.dtype}, got "
                f"{tuple(data.shape)} in {data.dtype}"
            )
        if bits and data.shape[1] != page_size:
            raise ValueError(f"{name} pages have page size {data.shape[1]}, the other side {page_size}")
    if not k_data.is_contiguous() or not v_data.is_contiguous():
        raise ValueError("KV pages must be contiguous tensors")
    check_device(q, k_data, v_data, block_tables)
    if plan is None:
        plan = plan_attention(
            query_lens, context_lens, num_heads, num_kv_heads, q.device, config, (k_bits or None, v_bits or None)
        )
    if plan.num_tokens != num_tokens:
        raise ValueError(f"query_lens sum to {plan.num_tokens} but q has {num_tokens} tokens")
    max_context = max(context_lens)
    if block_tables.shape[1] < -(-max_context // page_size):
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns; a {max_context}-token context needs more")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must cover at least one position, got {window}")
    if q.stride(2) != 1:
        q = q.contiguous()
    block_tables = block_tables.contiguous()

    scale = head_dim**-0.5 if scale is None else scale
    block_d = max(16, triton.next_power_of_2(head_dim))
    cfg = config or plan.config
    rotated_k, rotated_v = k_bits > 0, v_bits > 0  # quantized pages hold rotated values
    dense = _dequantized_copies(k_pages, v_pages, block_tables, query_lens, context_lens, plan, q.dtype, cfg)
    if dense is not None:  # attend over rotated bf16/fp16 copies: the kernel's unquantized path, rotation kept
        keys, values, block_tables = dense
        k_data, k_scales, k_stride, ks_stride, k_bits = _pages_args(keys)
        v_data, v_scales, v_stride, vs_stride, v_bits = _pages_args(values)
    rotated = rotated_k or rotated_v
    h = hadamard_signs(q.device, q.dtype) if rotated else q  # q: an unused placeholder
    out = torch.empty_like(q)
    num_blocks = plan.block_seq.shape[0]
    split = plan.num_splits > 1
    if split:
        part_rows = num_blocks * num_kv_heads * plan.num_splits * plan.block_m
        part_m = torch.empty(part_rows, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(part_rows, block_d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused
    decode = max(query_lens) == 1
    keys_major = cfg.keys_major if cfg.keys_major is not None else k_bits > 0 or v_bits > 0 or decode
    _paged_attention_kernel[(num_blocks, num_kv_heads, plan.num_splits)](
        q, out, k_data, k_scales, v_data, v_scales, h, block_tables,
        plan.block_seq, plan.block_tok, plan.q_start, plan.q_len, plan.ctx_len,
        part_acc, part_m, part_l,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_stride, ks_stride, v_stride, vs_stride,
        plan.split_len, window or 0, FLOAT_MAGIC,
        PAGE_SIZE=page_size, GROUP_SIZE=plan.group, TOKENS_PER_BLOCK=plan.tokens_per_block,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, HAS_WINDOW=window is not None,
        K_BITS=k_bits, V_BITS=v_bits, SPLIT=split, WORD_LOADS=cfg.word_loads, KEYS_MAJOR=keys_major,
        ROTATED_K=rotated_k, ROTATED_V=rotated_v, DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        _merge_splits_kernel[(num_blocks, num_kv_heads)](
            part_acc, part_m, part_l, out, h,
            plan.block_seq, plan.block_tok, plan.q_start, plan.q_len,
            plan.num_splits, out.stride(0), out.stride(1),
            GROUP_SIZE=plan.group, TOKENS_PER_BLOCK=plan.tokens_per_block,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=plan.block_m, UNROTATE=rotated_v,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return out


def attention_bytes(
    k_pages: torch.Tensor | QuantPages, v_pages: torch.Tensor | QuantPages, context_lens: list[int]
) -> int:
    """Bytes of K/V a step must read at least (each context once per kv head): for achieved-bandwidth figures."""
    total = 0
    for pages in (k_pages, v_pages):
        data, scales, stride, scale_stride, bits = _pages_args(pages)
        per_slot = stride * data.element_size() + (scale_stride * scales.element_size() if bits else 0)
        total += per_slot * sum(context_lens)
    return total
