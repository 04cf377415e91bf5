"""Paged attention against plain dense causal SDPA on random ragged batches: the torch reference for every page size
and head layout in use, fp and quantized pages; then the Triton kernel against the reference, run by Triton's CPU
interpreter on small shapes (tests/gpu and bench/kv_cache.py repeat it at real sizes on CUDA)."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorators: kernels then run on CPU tensors
for _name in ("kernels.kv_quant", "kernels.paged_attention", "tests.kv_tile"):  # the modules with @triton.jit
    if _name in sys.modules:  # imported earlier in this process without the interpreter: decorate again
        importlib.reload(sys.modules[_name])

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.runtime.interpreter as triton_interpreter  # noqa: E402

from inference_worker.attention import attend_paged, paged_attention  # noqa: E402
from inference_worker.batch import ForwardBatch  # noqa: E402
from inference_worker.kv_cache import PagedKVCache, kv_bytes_per_token  # noqa: E402
from kernels import kv_quant_ref  # noqa: E402
from kernels import paged_attention as triton_attention  # noqa: E402
from tests import kv_tile  # noqa: E402


def _interpreter_indexes_scalars_under_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array of shape (1,))``, which numpy 2.4
    refuses (triton-lang/triton#9171), so a loop bounded by a loaded value fails. Apply the upstream fix."""
    try:
        int(np.ones(1))
        return
    except TypeError:
        pass
    patch = triton_interpreter._patch_lang_tensor
    if getattr(patch, "indexes_scalars", False):
        return

    def patched(tensor, scope):  # noqa: ANN001, ANN202
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patched.indexes_scalars = True
    triton_interpreter._patch_lang_tensor = patched


_interpreter_indexes_scalars_under_numpy_2_4()

# (query heads, kv heads, head_dim): MHA, GQA groups of 3 (SmolLM2), 4 (Llama-3-8B at its real head_dim), 8, and MQA
HEAD_LAYOUTS = [(4, 4, 32), (9, 3, 64), (32, 8, 128), (16, 2, 32), (8, 1, 32)]
PAGE_SIZES = [1, 3, 16, 256]
# (cached tokens, new tokens): decodes, a whole-prompt prefill, chunks continuing a cached prefix
SHAPES = [(0, 1), (12, 1), (0, 23), (17, 5), (31, 1), (5, 40)]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None):
    """Full-sequence causal attention for one sequence: q [L, H, D], k/v [L, KVH, D] -> [L, H, D]."""
    length = q.shape[0]
    pos = torch.arange(length)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return out.transpose(0, 1)


class RaggedBatch:
    """Random sequences in a shuffled page pool (neighbours in a table are not neighbours in memory), their cached
    part already written, and the step that adds their new tokens."""

    def __init__(self, shapes, num_heads, num_kv_heads, head_dim, page_size, kv_bits=(None, None), seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.context_lens = [c + n for c, n in shapes]
        self.query_lens = [n for _, n in shapes]
        num_pages = sum(-(-c // page_size) for c in self.context_lens) + 3
        self.cache = PagedKVCache(1, num_pages, page_size, num_kv_heads, head_dim, torch.float32, "cpu", kv_bits)
        pool = torch.randperm(num_pages, generator=gen).tolist()
        self.tables = [[pool.pop() for _ in range(-(-c // page_size))] for c in self.context_lens]
        width = max(len(t) for t in self.tables) + 1  # an extra padded column, as the scheduler may send
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in self.tables])
        self.seqs = [
            tuple(torch.randn(ctx, h, head_dim, generator=gen) for h in (num_heads, num_kv_heads, num_kv_heads))
            for ctx in self.context_lens
        ]
        for (cached, _), table, (_, k, v) in zip(shapes, self.tables, self.seqs, strict=True):
            if cached:
                self.cache.write(0, k[:cached], v[:cached], self.slots(table, range(cached)))
        self.page_size = page_size

    def slots(self, table: list[int], positions: range) -> torch.Tensor:
        ps = self.cache.page_size
        return torch.tensor([table[p // ps] * ps + p % ps for p in positions], dtype=torch.int64)

    def new(self, index: int) -> torch.Tensor:
        """q, k or v (index 0, 1, 2) of every sequence's new tokens, concatenated."""
        return torch.cat([s[index][c:] for (c, _), s in zip(self.shapes, self.seqs, strict=True)])

    def forward_batch(self) -> ForwardBatch:
        slot_mapping = torch.cat(
            [self.slots(t, range(c, c + n)) for (c, n), t in zip(self.shapes, self.tables, strict=True)]
        )
        positions = torch.cat([torch.arange(c, c + n) for c, n in self.shapes])
        return ForwardBatch(
            input_ids=torch.zeros(len(positions), dtype=torch.int64),
            positions=positions,
            query_lens=self.query_lens,
            context_lens=self.context_lens,
            block_tables=self.block_tables,
            slot_mapping=slot_mapping,
            logits_indices=torch.arange(len(self.shapes)),
        )

    def write_new(self) -> None:
        self.cache.write(0, self.new(1), self.new(2), self.forward_batch().slot_mapping)

    def expected(self, kv_bits=(None, None), window: int | None = None) -> torch.Tensor:
        """Dense attention over each whole sequence, with K/V as the cache returns them (quantized where asked)."""
        outs = []
        for (c, _), (q, k, v) in zip(self.shapes, self.seqs, strict=True):
            k, v = (
                x if b is None else kv_quant_ref.dequantize_ref(*kv_quant_ref.quantize_ref(x, b), b)
                for x, b in ((k, kv_bits[0]), (v, kv_bits[1]))
            )
            outs.append(dense_causal_attention(q, k, v, window)[c:])
        return torch.cat(outs)


# -- the torch reference ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEAD_LAYOUTS)
def test_paged_attention_equals_dense_causal_sdpa_on_ragged_batches(
    page_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    batch = RaggedBatch(SHAPES, num_heads, num_kv_heads, head_dim, page_size, seed=page_size + num_heads)
    out = attend_paged(batch.new(0), batch.new(1), batch.new(2), batch.cache, 0, batch.forward_batch())
    torch.testing.assert_close(out, batch.expected(), atol=1e-5, rtol=1e-5)


def test_the_cpu_path_lays_a_batch_out_once_for_every_layer() -> None:
    # the padded layout (page ids, query rows, mask) depends on the batch, not the layer: the second layer of a
    # forward reuses the first one's, and a layer with a sliding window gets its own
    batch = RaggedBatch(SHAPES, 9, 3, 16, 16, seed=5)
    forward = batch.forward_batch()
    first = attend_paged(batch.new(0), batch.new(1), batch.new(2), batch.cache, 0, forward)
    (layout,) = forward._reference_layouts[1].values()
    again = attend_paged(batch.new(0), batch.new(1), batch.new(2), batch.cache, 0, forward)
    assert forward._reference_layouts[1] == {(None, 16): layout} and torch.equal(again, first)
    attend_paged(batch.new(0), batch.new(1), batch.new(2), batch.cache, 0, forward, window=8)
    assert set(forward._reference_layouts[1]) == {(None, 16), (8, 16)}
    torch.testing.assert_close(first, batch.expected(), atol=1e-5, rtol=1e-5)


def test_a_batch_refilled_in_place_gets_a_fresh_layout() -> None:
    # graph buffers run without capture (inference_worker/cuda_graphs.py on the CPU) keep one batch object and
    # rewrite its lengths every step: a layout built for the old lengths must not be used for the new ones
    batch = RaggedBatch(SHAPES, 9, 3, 16, 16, seed=6)
    forward = batch.forward_batch()
    attend_paged(batch.new(0), batch.new(1), batch.new(2), batch.cache, 0, forward)
    shorter = [c - 1 if q == 1 and c > 1 else c for q, c in zip(forward.query_lens, forward.context_lens, strict=True)]
    assert shorter != forward.context_lens  # the one-query sequences see one key fewer
    forward.context_lens[:] = shorter
    q = batch.new(0)
    out = attend_paged(q, batch.new(1), batch.new(2), batch.cache, 0, forward)
    (layout,) = forward._reference_layouts[1].values()
    assert forward._reference_layouts[0][1] == tuple(shorter) and layout.max_context == max(shorter)
    want = paged_attention(q, batch.cache.k[0], batch.cache.v[0], forward.block_tables, forward.query_lens, shorter)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("kv_bits", [(4, 4), (2, 8), (8, None), (None, 3)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (32, 8, 128)])
def test_attention_over_quantized_pages_equals_dense_sdpa_over_the_dequantized_keys_and_values(
    kv_bits: tuple[int | None, int | None], num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    # the reference rotates the query instead of the keys, and the output instead of every value: exact algebra
    batch = RaggedBatch(SHAPES, num_heads, num_kv_heads, head_dim, 16, kv_bits, seed=sum(b or 0 for b in kv_bits))
    out = attend_paged(batch.new(0), batch.new(1), batch.new(2), batch.cache, 0, batch.forward_batch())
    torch.testing.assert_close(out, batch.expected(kv_bits), atol=2e-5, rtol=2e-5)


def test_cache_write_puts_each_token_at_its_slot() -> None:
    cache = PagedKVCache(2, 4, 3, 2, 16, torch.float32, "cpu")
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([11, 0, 4, 5, 7])
    cache.write(1, k, v, slots)
    for i, slot in enumerate(slots.tolist()):
        page, offset = divmod(slot, 3)
        assert torch.equal(cache.k[1][page, offset], k[i]) and torch.equal(cache.v[1][page, offset], v[i])
    assert not cache.k[0].any()  # other layers untouched
    assert cache.bytes_per_token() == kv_bytes_per_token(2, 2, 16, torch.float32) == 2 * 2 * 2 * 16 * 4


def test_paged_attention_works_in_bfloat16_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(7)
    k_pages, v_pages = torch.randn(8, 4, 2, 16, generator=gen), torch.randn(8, 4, 2, 16, generator=gen)
    q = torch.randn(7, 4, 16, generator=gen)
    tables = torch.tensor([[5, 2, 7], [1, 0, 0]])
    args = (tables, [4, 3], [10, 3])
    ref = paged_attention(q, k_pages, v_pages, *args)
    low = paged_attention(q.bfloat16(), k_pages.bfloat16(), v_pages.bfloat16(), *args)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_paged_attention_names_inconsistent_batches() -> None:
    k_pages = v_pages = torch.zeros(4, 2, 1, 16)
    q = torch.zeros(3, 2, 16)
    with pytest.raises(ValueError, match="sum to 2 but q has 3 tokens"):
        paged_attention(q, k_pages, v_pages, torch.zeros(1, 2, dtype=torch.int64), [2], [4])
    with pytest.raises(ValueError, match="query_len <= context_len"):
        paged_attention(q, k_pages, v_pages, torch.zeros(1, 2, dtype=torch.int64), [3], [2])
    with pytest.raises(ValueError, match="needs more"):
        paged_attention(q, k_pages, v_pages, torch.zeros(1, 1, dtype=torch.int64), [3], [4])
    two_heads = torch.zeros(4, 2, 2, 16)
    with pytest.raises(ValueError, match="3 query heads cannot share 2 kv heads"):
        paged_attention(torch.zeros(3, 3, 16), two_heads, two_heads, torch.zeros(1, 2), [3], [3])
    with pytest.raises(ValueError, match="k and v pages disagree"):
        paged_attention(q, two_heads, v_pages, torch.zeros(1, 2), [3], [3])


# -- the Triton kernel (interpreter) against the reference -----------------------------------------------------------
TRITON_CASES = [
    # (heads, kv heads, head_dim, page size, kv bits, dtype, split contexts?)
    (4, 4, 32, 16, (None, None), torch.float32, False),
    (9, 3, 64, 3, (None, None), torch.float32, True),
    (8, 1, 32, 1, (None, None), torch.float16, True),
    (32, 8, 128, 16, (4, 4), torch.float32, True),
    (9, 3, 64, 16, (4, None), torch.float32, False),
    (9, 3, 64, 5, (None, 3), torch.float32, True),
    (16, 2, 64, 16, (2, 8), torch.float16, False),
    (6, 2, 96, 16, (4, 4), torch.float32, True),  # head_dim not a power of two: 3 groups in a 4-group tile
    (4, 2, 80, 7, (None, None), torch.float32, False),
]


def triton_vs_reference(
    batch: RaggedBatch,
    dtype: torch.dtype,
    split: bool,
    window: int | None = None,
    word_loads: bool = True,
    keys_major: bool | None = None,
    dequantize_reuse: int | None = None,
) -> None:
    def in_dtype(pages: torch.Tensor | kv_quant_ref.QuantPages) -> torch.Tensor | kv_quant_ref.QuantPages:
        return pages.to(dtype) if isinstance(pages, torch.Tensor) else pages

    q = batch.new(0).to(dtype)
    args = (q, in_dtype(batch.cache.k[0]), in_dtype(batch.cache.v[0]), batch.block_tables)
    lens = (batch.query_lens, batch.context_lens)
    # many splits of 16 keys, or one program per query block
    config = triton_attention.AttentionConfig(
        block_n=16,
        target_programs=10_000 if split else 1,
        word_loads=word_loads,
        keys_major=keys_major,
        dequantize_reuse=dequantize_reuse,
    )
    plan = triton_attention.plan_attention(*lens, q.shape[1], batch.cache.num_kv_heads, "cpu", config)
    assert (plan.num_splits > 1) == split
    got = triton_attention.paged_attention(*args, *lens, window=window, plan=plan)
    want = paged_attention(*args, *lens, window=window)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "page_size", "kv_bits", "dtype", "split"), TRITON_CASES
)
def test_triton_paged_attention_matches_the_reference_on_ragged_prefill_and_decode(
    num_heads, num_kv_heads, head_dim, page_size, kv_bits, dtype, split
) -> None:
    batch = RaggedBatch(SHAPES, num_heads, num_kv_heads, head_dim, page_size, kv_bits, seed=num_heads * page_size)
    batch.write_new()
    triton_vs_reference(batch, dtype, split)


@pytest.mark.parametrize(
    ("kv_bits", "word_loads", "keys_major"),
    [((None, None), True, None), ((None, None), True, False), ((4, 4), True, None), ((4, 4), True, False),
     ((4, 3), False, None), ((8, 2), True, None)],
)  # fmt: skip
def test_triton_decode_over_long_contexts_split_many_ways_matches_the_reference(kv_bits, word_loads, keys_major):
    shapes = [(300, 1), (7, 1), (129, 1), (64, 1)]  # ragged decode: some splits of short sequences see no key
    batch = RaggedBatch(shapes, 8, 2, 64, 16, kv_bits, seed=3)
    batch.write_new()
    triton_vs_reference(batch, torch.float32, split=True, word_loads=word_loads, keys_major=keys_major)


@pytest.mark.parametrize("k_bits", range(2, 9))
def test_triton_attention_reads_every_width_as_keys_and_as_values(k_bits: int) -> None:
    kv_bits = (k_bits, 10 - k_bits)  # 2..8 bits on each side, the straddling widths 3, 5, 6, 7 included
    batch = RaggedBatch([(21, 1), (9, 6), (0, 3)], 8, 2, 64, 4, kv_bits, seed=k_bits)
    batch.write_new()
    triton_vs_reference(batch, torch.float32, split=k_bits % 2 == 0)


@pytest.mark.parametrize(("kv_bits", "page_size", "split"), [((4, 4), 16, False), ((3, 8), 4, True), ((2, 5), 3, True)])
def test_triton_prefill_over_dequantized_copies_matches_the_reference(kv_bits, page_size: int, split: bool) -> None:
    batch = RaggedBatch(SHAPES + [(70, 33)], 8, 2, 64, page_size, kv_bits, seed=page_size)
    batch.write_new()
    args = (batch.cache.k[0], batch.cache.v[0], batch.block_tables, batch.query_lens, batch.context_lens)
    config = triton_attention.AttentionConfig(block_n=16, dequantize_reuse=1)
    plan = triton_attention.plan_attention(batch.query_lens, batch.context_lens, 8, 2, "cpu", config)
    copies = triton_attention._dequantized_copies(*args, plan, torch.float32, config)
    assert copies is not None  # the path under test is taken
    keys, values, tables = copies
    assert triton_attention._dequantized_copies(*args, plan, torch.float32, config)[2] is tables  # the next layer's
    for side, bits, copy in ((batch.cache.k[0], kv_bits[0], keys), (batch.cache.v[0], kv_bits[1], values)):
        for seq, table in enumerate(batch.tables):  # each copy holds the rotated values of the page it stands for
            for col, page in enumerate(table):
                want = kv_quant_ref.dequantize_ref(side.codes[page], side.scales[page], bits, rotated=True)
                assert torch.equal(copy[int(tables[seq, col])], want)
    triton_vs_reference(batch, torch.float32, split, dequantize_reuse=1)


def test_the_plan_takes_128_prefill_rows_unless_quantized_pages_are_read_directly() -> None:
    def rows(query_lens, context_lens, kv_bits, **config) -> int:
        cfg = triton_attention.AttentionConfig(**config)
        return triton_attention.plan_attention(query_lens, context_lens, 32, 8, "cpu", cfg, kv_bits).block_m

    long_chunk, short_chunk = ([2048], [32768]), ([100], [32768])  # 64 and 4 query blocks of 32 tokens
    assert rows([1, 1], [900, 40], (4, 4)) == rows([1], [9], (None, None)) == 16  # decode
    assert rows(*long_chunk, (None, None)) == rows(*short_chunk, (None, None)) == 128  # fp16 pages
    assert rows(*long_chunk, (4, 4)) == 128  # through dequantized copies
    assert rows(*short_chunk, (4, 4)) == 128 and rows(*short_chunk, (4, 4), dequantize_reuse=5) == 64
    assert rows(*long_chunk, (4, None)) == rows(*long_chunk, (4, 4), dequantize_reuse=None) == 64  # read directly
    assert rows(*long_chunk, (4, 4), block_m=32) == 32  # a config's own rows win
    assert rows([5, 5, 3], [900, 40, 70], (None, None)) == 64  # verifying drafts: 128 rows would be mostly padding
    # a chunk among many decodes: their contexts are read once each, the copies would not pay
    assert rows([512] + [1] * 15, [2048] * 16, (4, 4)) == 64


def test_dequantized_copies_are_made_only_for_long_queries_over_fully_quantized_pages() -> None:
    decode = RaggedBatch([(40, 1), (9, 1)], 8, 2, 64, 4, (4, 4), seed=1)
    prefill = RaggedBatch([(40, 60), (0, 50)], 8, 2, 64, 4, (4, 4), seed=2)
    mixed = RaggedBatch([(40, 60), (0, 50)], 8, 2, 64, 4, (4, None), seed=3)

    def copies(batch: RaggedBatch, reuse: int | None):
        config = triton_attention.AttentionConfig(dequantize_reuse=reuse)
        lens = (batch.query_lens, batch.context_lens)
        plan = triton_attention.plan_attention(*lens, 8, 2, "cpu", config, batch.cache.kv_bits)
        assert plan.block_m == (16 if batch is decode else 64)  # too short for copies at 128 rows
        pages = (batch.cache.k[0], batch.cache.v[0], batch.block_tables)
        return triton_attention._dequantized_copies(*pages, *lens, plan, torch.float32, config)

    assert copies(decode, 4) is None  # one query block per sequence: each tile is read once anyway
    assert copies(prefill, 4) is not None  # 60 and 50 new tokens of 4 heads: 4 query blocks each
    assert copies(prefill, 5) is None and copies(prefill, None) is None
    assert copies(mixed, 1) is None  # values unquantized: nothing to dequantize on that side


@pytest.mark.parametrize("word_loads", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_triton_tile_loader_dequantizes_exactly_like_the_reference(bits: int, word_loads: bool) -> None:
    # head_dim 96 leaves a padded group in the 128-wide tile
    kv_tile.check_tile_loader(bits, word_loads, "cpu")


@pytest.mark.parametrize(("split", "window"), [(False, 7), (True, 7), (True, 30)])
def test_triton_sliding_window_matches_the_reference(split: bool, window: int) -> None:
    batch = RaggedBatch(SHAPES + [(90, 1)], 8, 2, 32, 4, seed=11)
    batch.write_new()
    triton_vs_reference(batch, torch.float32, split, window=window)
    pages = (batch.cache.k[0], batch.cache.v[0], batch.block_tables)
    reference = paged_attention(batch.new(0), *pages, batch.query_lens, batch.context_lens, window=window)
    torch.testing.assert_close(reference, batch.expected(window=window), atol=1e-5, rtol=1e-5)


def test_triton_attention_refuses_pages_it_cannot_read() -> None:
    q = torch.zeros(2, 4, 32)
    pages = torch.zeros(4, 4, 2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="in torch.float32"):
        triton_attention.paged_attention(q, pages, pages, torch.zeros(1, 1, dtype=torch.int64), [2], [2])
    with pytest.raises(ValueError, match="sliding window must cover at least one position"):
        triton_attention.paged_attention(
            q, pages.float(), pages.float(), torch.zeros(1, 1, dtype=torch.int64), [2], [2], window=0
        )
