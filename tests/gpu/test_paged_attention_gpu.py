"""Paged attention and the fused KV append compiled on CUDA, at Llama-3-8B attention sizes (32 query / 8 kv heads of
128, bf16), against the torch reference (run with ``pytest -m gpu tests/gpu``). The CPU tests run the same kernels
through Triton's interpreter on small shapes; these hold the compiled code (register layouts, fused multiply-adds,
Hopper's warp-group MMAs) to the same reference, for every bit width and every kernel variant the bench times."""

from __future__ import annotations

import pytest
import torch

from bench.kv_cache import HEAD_DIM, HEADS, KV_HEADS, PAGE_SIZE, filled_cache, shuffled_tables
from inference_worker.attention import paged_attention as reference_attention
from inference_worker.kv_cache import KVBits
from kernels import kv_quant, kv_quant_ref
from kernels.paged_attention import AttentionConfig, dequantize_pages, paged_attention
from tests.kv_tile import check_tile_loader

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (cached, new) per sequence: ragged decodes over long contexts; a chunk continuing a prefix beside decodes
CASES = {
    "decode": [(4095, 1), (1000, 1), (3000, 1), (17, 1)],
    "prefill": [(3584, 512), (0, 700), (2047, 1), (100, 1)],
}
VARIANTS = [  # (format, key/value bits, kernel configuration)
    ("fp16", (None, None), AttentionConfig()),
    ("fp16", (None, None), AttentionConfig(keys_major=True)),
    ("K4/V4", (4, 4), AttentionConfig()),
    ("K4/V4", (4, 4), AttentionConfig(keys_major=False)),
    ("K4/V4", (4, 4), AttentionConfig(word_loads=False)),
    ("K4/V4", (4, 4), AttentionConfig(block_n=128, num_warps=8)),
    # the defaults take long prefills through dequantized page copies; these read the quantized pages directly
    ("K4/V4", (4, 4), AttentionConfig(dequantize_reuse=None)),
    ("K3/V5", (3, 5), AttentionConfig(dequantize_reuse=None)),
    ("K8/V8", (8, 8), AttentionConfig()),
    ("K2/V4", (2, 4), AttentionConfig()),
    ("K3/V5", (3, 5), AttentionConfig()),
    ("K6/V7", (6, 7), AttentionConfig()),
]


@pytest.mark.parametrize("word_loads", [True, False])
@pytest.mark.parametrize("bits", range(2, 9))
def test_compiled_tile_loader_dequantizes_exactly_like_the_reference(bits: int, word_loads: bool) -> None:
    check_tile_loader(bits, word_loads, "cuda", head_dim=128, num_slots=64)
    check_tile_loader(bits, word_loads, "cuda", head_dim=96, num_slots=12)


@pytest.mark.parametrize("bits", range(2, 9))
def test_fused_append_stores_the_reference_codes_and_scales(bits: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(bits)
    x = torch.randn(4096, KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    pages = kv_quant_ref.empty_quant_pages(4096 // PAGE_SIZE, PAGE_SIZE, KV_HEADS, HEAD_DIM, bits, "cuda")
    slots = torch.randperm(4096, generator=gen, device="cuda")
    kv_quant.quantize_append(pages, x, slots)
    codes, scales = kv_quant_ref.quantize_ref(x, bits)
    got = kv_quant_ref.unpack_codes(pages.codes.view(4096, KV_HEADS, -1)[slots], bits)
    assert torch.equal(got, kv_quant_ref.unpack_codes(codes, bits))
    assert torch.equal(pages.scales.view(4096, KV_HEADS, -1)[slots], scales)


@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantized_page_copies_hold_the_reference_values(bits: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(bits)
    pages = kv_quant_ref.empty_quant_pages(64, PAGE_SIZE, KV_HEADS, HEAD_DIM, bits, "cuda")
    x = torch.randn(64 * PAGE_SIZE, KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    kv_quant.quantize_append(pages, x, torch.arange(64 * PAGE_SIZE, device="cuda"))
    page_ids = torch.randperm(64, generator=gen, device="cuda")[:40]
    copies = dequantize_pages(pages, page_ids, torch.bfloat16)
    want = kv_quant_ref.dequantize_ref(pages.codes[page_ids], pages.scales[page_ids], bits, rotated=True)
    assert torch.equal(copies, want.to(torch.bfloat16))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("fmt", "kv_bits", "config"), VARIANTS, ids=[f"{f}-{c}" for f, _, c in VARIANTS])
def test_attention_matches_the_float32_reference(case: str, fmt: str, kv_bits: KVBits, config: AttentionConfig):
    gen = torch.Generator(device="cuda").manual_seed(len(fmt) + len(case))
    shapes = CASES[case]
    context_lens, query_lens = [c + n for c, n in shapes], [n for _, n in shapes]
    cache = filled_cache(kv_bits, context_lens, gen, PAGE_SIZE)  # written through the real append path
    tables = shuffled_tables(cache, context_lens, gen)
    q = torch.randn(sum(query_lens), HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=torch.bfloat16)
    torch.full((q.numel() * 4,), float("nan"), device="cuda")  # memory the output may reuse: unwritten shows
    k, v = cache.k[0], cache.v[0]
    got = paged_attention(q, k, v, tables, query_lens, context_lens, config=config)
    as_reference = [p.float() if isinstance(p, torch.Tensor) else p for p in (k, v)]
    want = reference_attention(q.float(), *as_reference, tables, query_lens, context_lens)
    assert torch.isfinite(got).all()
    err = float((got.double() - want.double()).norm() / want.double().norm())
    assert err < 1e-2, f"{fmt} {case} {config}: relative error {err:.2e}"
