"""Paged attention (torch reference) against plain dense causal SDPA, on random ragged batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inference_worker.attention import attend_paged, paged_attention
from inference_worker.batch import ForwardBatch
from inference_worker.kv_cache import PagedKVCache, kv_bytes_per_token

HEAD_DIM = 16


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full-sequence causal attention for one sequence: q [L, H, D], k/v [L, KVH, D] -> [L, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return out.transpose(0, 1)


def random_page_tables(context_lens: list[int], page_size: int, num_pages: int, gen: torch.Generator):
    """Each sequence gets its pages from a shuffled pool (so neighbours in a table are not neighbours in memory)."""
    pool = torch.randperm(num_pages, generator=gen).tolist()
    tables = []
    for ctx in context_lens:
        need = -(-ctx // page_size)
        tables.append([pool.pop() for _ in range(need)])
    width = max(len(t) for t in tables) + 1  # an extra padded column, as the scheduler may send
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    return tables, block_tables


def slots_for(table: list[int], positions: range, page_size: int) -> list[int]:
    return [table[p // page_size] * page_size + p % page_size for p in positions]


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_paged_attention_equals_dense_causal_sdpa_on_ragged_batches(
    page_size: int, num_heads: int, num_kv_heads: int
) -> None:
    gen = torch.Generator().manual_seed(page_size * 100 + num_heads * 10 + num_kv_heads)
    # (cached tokens, new tokens): decodes, a whole-prompt prefill, chunks continuing a cached prefix
    shapes = [(0, 1), (12, 1), (0, 23), (17, 5), (31, 1), (5, 40)]
    context_lens = [c + n for c, n in shapes]
    query_lens = [n for _, n in shapes]
    num_pages = sum(-(-c // page_size) for c in context_lens) + 3
    cache = PagedKVCache(1, num_pages, page_size, num_kv_heads, HEAD_DIM, torch.float32, "cpu")
    tables, block_tables = random_page_tables(context_lens, page_size, num_pages, gen)

    seqs = []
    for ctx in context_lens:
        seqs.append(
            tuple(torch.randn(ctx, h, HEAD_DIM, generator=gen) for h in (num_heads, num_kv_heads, num_kv_heads))
        )
    # the cached part goes in first, as earlier steps would have written it
    for (cached, _), table, (_, k, v) in zip(shapes, tables, seqs, strict=True):
        if cached:
            slots = torch.tensor(slots_for(table, range(cached), page_size))
            cache.write(0, k[:cached], v[:cached], slots)

    new = [(q[c:], k[c:], v[c:]) for (c, _), (q, k, v) in zip(shapes, seqs, strict=True)]
    slot_mapping = torch.tensor(
        [s for (c, n), t in zip(shapes, tables, strict=True) for s in slots_for(t, range(c, c + n), page_size)]
    )
    positions = torch.cat([torch.arange(c, c + n) for c, n in shapes])
    batch = ForwardBatch(
        input_ids=torch.zeros(len(positions), dtype=torch.int64),
        positions=positions,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        logits_indices=torch.arange(len(shapes)),
    )
    out = attend_paged(
        torch.cat([q for q, _, _ in new]),
        torch.cat([k for _, k, _ in new]),
        torch.cat([v for _, _, v in new]),
        cache,
        0,
        batch,
    )

    expected = torch.cat([dense_causal_attention(q, k, v)[c:] for (c, _), (q, k, v) in zip(shapes, seqs, strict=True)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cache_write_puts_each_token_at_its_slot() -> None:
    cache = PagedKVCache(2, 4, 3, 2, HEAD_DIM, torch.float32, "cpu")
    k, v = torch.randn(5, 2, HEAD_DIM), torch.randn(5, 2, HEAD_DIM)
    slots = torch.tensor([11, 0, 4, 5, 7])
    cache.write(1, k, v, slots)
    for i, slot in enumerate(slots.tolist()):
        page, offset = divmod(slot, 3)
        assert torch.equal(cache.k[1][page, offset], k[i]) and torch.equal(cache.v[1][page, offset], v[i])
    assert not cache.k[0].any()  # other layers untouched
    assert cache.bytes_per_token() == kv_bytes_per_token(2, 2, HEAD_DIM, torch.float32) == 2 * 2 * 2 * HEAD_DIM * 4


def test_paged_attention_works_in_bfloat16_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(7)
    k_pages, v_pages = torch.randn(8, 4, 2, HEAD_DIM, generator=gen), torch.randn(8, 4, 2, HEAD_DIM, generator=gen)
    q = torch.randn(7, 4, HEAD_DIM, generator=gen)
    tables = torch.tensor([[5, 2, 7], [1, 0, 0]])
    args = (tables, [4, 3], [10, 3])
    ref = paged_attention(q, k_pages, v_pages, *args)
    low = paged_attention(q.bfloat16(), k_pages.bfloat16(), v_pages.bfloat16(), *args)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_paged_attention_names_inconsistent_batches() -> None:
    k_pages = v_pages = torch.zeros(4, 2, 1, HEAD_DIM)
    q = torch.zeros(3, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="sum to 2 but q has 3 tokens"):
        paged_attention(q, k_pages, v_pages, torch.zeros(1, 2, dtype=torch.int64), [2], [4])
    with pytest.raises(ValueError, match="query_len <= context_len"):
        paged_attention(q, k_pages, v_pages, torch.zeros(1, 2, dtype=torch.int64), [3], [2])
    with pytest.raises(ValueError, match="needs more"):
        paged_attention(q, k_pages, v_pages, torch.zeros(1, 1, dtype=torch.int64), [3], [4])
    with pytest.raises(ValueError, match="3 query heads cannot share 2 kv heads"):
        paged_attention(
            torch.zeros(3, 3, HEAD_DIM), torch.zeros(4, 2, 2, HEAD_DIM), k_pages, torch.zeros(1, 2), [3], [3]
        )
