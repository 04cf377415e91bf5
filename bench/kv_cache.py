"""Check and time the paged, quantized KV cache on one CUDA GPU (Llama-3-8B attention shapes, bf16).

    python bench/kv_cache.py [--quick] [--sweep] [--no-e2e] [--only SECTION,...] [--model DIR] [--out DIR]
                             [--formats F,...] [--block-n N,...] [--block-m M,...] [--warps W,...] [--stages S,...]
                             [--targets T,...] [--word-loads 1,0] [--keys-major 1,0]

1. Ceiling: device-to-device copy bandwidth (bytes read + written), measured in this run.
2. Memory per token of an 8B-shaped model (32 layers, 8 kv heads of 128) at fp16, K8/V8, K4/V4 and more.
3. Correctness at real sizes, from memory poisoned with NaN: the fused append kernel against the torch reference
   (codes and scales), decode and chunked-prefill attention against the float32 torch reference, fp16 and quantized.
4. Decode attention over 32K tokens x 16 sequences: fp16 vs K8/V8 vs K4/V4 (and K4/V4 with per-value gathers): time,
   K/V bytes read per second against the copy bandwidth, speed-up over fp16. --formats picks other formats (e.g.
   K3/V3, K4/V8). --sweep also times every combination of --block-n, --warps, --stages, --targets (split targets;
   'none': the default), --keys-major (dot order) and, for quantized formats, --word-loads, and reports the best of
   each format.
5. The append step (quantize + store) for 16 decode tokens and a 2048-token prefill chunk.
6. Chunked prefill: a 2048-token chunk over 30K cached tokens, fp16 vs K4/V4 (by default through rotated copies of
   the pages, dequantized once: AttentionConfig.dequantize_reuse; and over the quantized pages directly), in TFLOP/s.
7. Long context: one 128K-token sequence, decode and its last 2048-token chunk, fp16 vs K4/V4.
   With --sweep, the 2K-over-30K chunk is also timed for every --block-m x --block-n x --warps x --stages: fp16,
   K4/V4 over the quantized pages, K4/V4 through copies (section prefill_sweep).
8. End to end (skip with --no-e2e or --quick): a synthetic 4-bit EXL3 model of Llama-3.1-8B's shape (llama3 rope
   scaling to 128K) prefills a 128K-token prompt in 8K chunks into a K4/V4 cache and decodes 16 tokens greedily.
9. With --model DIR (e.g. the default model's directory): KL divergence of next-token distributions from the
   unquantized cache at K in {2,3,4,6,8} x V in {2,4,8}, on the repository's own docs as text.
Results go to $OUT/kv_cache.json (or --out), rewritten after every section; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch
from triton.testing import do_bench

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference_worker.attention import paged_attention as reference_attention  # noqa: E402
from inference_worker.kv_cache import KVBits, PagedKVCache, kv_bytes_per_token, parse_kv_bits  # noqa: E402
from kernels import kv_quant, kv_quant_ref  # noqa: E402
from kernels.paged_attention import (  # noqa: E402
    AttentionConfig,
    AttentionPlan,
    attention_bytes,
    paged_attention,
    plan_attention,
)

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 32, 8, 128, 32  # Llama-3-8B
DTYPE = torch.bfloat16
PAGE_SIZE = 16
FORMATS = {"fp16": (None, None), "K8/V8": (8, 8), "K4/V4": (4, 4)}


def parse_formats(text: str) -> dict[str, KVBits]:
    """'fp16,K4/V4,K4/Vfp16' -> {name: (key bits, value bits)}: each fp16 or K<bits>/V<bits>."""
    formats = {}
    for name in text.split(","):
        k, _, v = name.partition("/")
        if name != "fp16" and not (k.startswith("K") and v.startswith("V")):
            raise ValueError(f"a format is fp16 or K<bits>/V<bits>, got {name!r}")
        formats[name] = (None, None) if name == "fp16" else parse_kv_bits(f"{k[1:]},{v[1:]}")
    return formats


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


@dataclass
class SweepGrid:
    """The decode configurations --sweep times: every combination (word loads only matter for quantized pages)."""

    block_n: list[int]
    warps: list[int]
    stages: list[int]
    targets: list[int | None]
    word_loads: list[bool]
    keys_major: list[bool]

    def configs(self, quantized: bool) -> list[AttentionConfig]:
        word_loads = self.word_loads if quantized else [True]
        return [
            AttentionConfig(block_n=n, num_warps=w, num_stages=st, target_programs=t, word_loads=wl, keys_major=km)
            for n, w, st, t, wl, km in product(
                self.block_n, self.warps, self.stages, self.targets, word_loads, self.keys_major
            )
        ]


def poison(numel: int) -> None:
    """Leave NaN in memory the next allocations will reuse, so an output element nobody wrote cannot pass."""
    torch.full((numel,), float("nan"), dtype=torch.float32, device="cuda")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm()) if torch.isfinite(got).all() else float("inf")


def median_ms(fn: Callable[[], object]) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def time_attention(
    q: torch.Tensor,
    cache: PagedKVCache,
    tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    plan: AttentionPlan | None = None,
    config: AttentionConfig | None = None,
) -> float:
    k, v = cache.k[0], cache.v[0]
    return median_ms(lambda: paged_attention(q, k, v, tables, query_lens, context_lens, plan=plan, config=config))


def time_write(cache: PagedKVCache, x: torch.Tensor, slots: torch.Tensor) -> float:
    return median_ms(lambda: cache.write(0, x, x, slots))


def filled_cache(
    kv_bits: KVBits, context_lens: list[int], gen: torch.Generator, page_size: int = PAGE_SIZE
) -> PagedKVCache:
    """One layer of cache with pages for the contexts, every slot written through the real append path."""
    num_pages = sum(-(-c // page_size) for c in context_lens)
    cache = PagedKVCache(1, num_pages, page_size, KV_HEADS, HEAD_DIM, DTYPE, "cuda", kv_bits)
    chunk = 1 << 16
    for start in range(0, cache.num_slots, chunk):
        slots = torch.arange(start, min(start + chunk, cache.num_slots), device="cuda")
        k = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
        v = torch.randn(len(slots), KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
        k[:, :, 3] *= 8.0  # an outlier channel, as real keys have
        cache.write(0, k, v, slots)
    return cache


def shuffled_tables(cache: PagedKVCache, context_lens: list[int], gen: torch.Generator) -> torch.Tensor:
    """Block tables over a shuffled pool: no sequence's pages are neighbours in memory."""
    pool = torch.randperm(cache.num_pages, generator=gen, device="cuda")
    need = [-(-c // cache.page_size) for c in context_lens]
    tables = torch.zeros(len(need), max(need), dtype=torch.int64, device="cuda")
    start = 0
    for row, n in enumerate(need):
        tables[row, :n] = pool[start : start + n]
        start += n
    return tables


def as_reference(pages: torch.Tensor | kv_quant_ref.QuantPages) -> torch.Tensor | kv_quant_ref.QuantPages:
    return pages.float() if isinstance(pages, torch.Tensor) else pages


# -- sections ---------------------------------------------------------------------------------------------------------
def ceiling(res: dict) -> None:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    res["copy_GBps"] = 2 * n / ms / 1e6
    print(f"copy {res['copy_GBps']:.0f} GB/s", flush=True)


def memory(res: dict) -> None:
    out = res.setdefault("bytes_per_token_8b", {})
    fp16 = kv_bytes_per_token(LAYERS, KV_HEADS, HEAD_DIM, torch.float16)
    for bits in [(None, None), (8, 8), (6, 6), (4, 8), (8, 4), (4, 4), (3, 3), (2, 2)]:
        n = kv_bytes_per_token(LAYERS, KV_HEADS, HEAD_DIM, torch.float16, bits)
        name = "fp16" if bits == (None, None) else f"K{bits[0]}/V{bits[1]}"
        out[name] = {"bytes": n, "of_fp16": n / fp16, "GiB_per_128K_tokens": n * 131072 / 2**30}


def correctness(res: dict, gen: torch.Generator) -> None:
    out = res.setdefault("correctness", {})
    x = torch.randn(4096, KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    for bits in range(2, 9):
        pages = kv_quant_ref.empty_quant_pages(4096 // PAGE_SIZE, PAGE_SIZE, KV_HEADS, HEAD_DIM, bits, "cuda")
        slots = torch.randperm(4096, generator=gen, device="cuda")
        kv_quant.quantize_append(pages, x, slots)
        codes, scales = kv_quant_ref.quantize_ref(x, bits)
        got_codes = kv_quant_ref.unpack_codes(pages.codes.view(4096, KV_HEADS, -1)[slots], bits)
        want_codes = kv_quant_ref.unpack_codes(codes, bits)
        out[f"append_codes_equal_b{bits}"] = float((got_codes == want_codes).float().mean())
        out[f"append_codes_max_diff_b{bits}"] = int((got_codes - want_codes).abs().max())
        out[f"append_scales_equal_b{bits}"] = bool(torch.equal(pages.scales.view(4096, KV_HEADS, -1)[slots], scales))

    cases = {  # (cached, new) per sequence: ragged decodes; a chunk continuing a cached prefix beside decodes
        "decode": [(4095, 1), (1000, 1), (3000, 1), (17, 1)],
        "prefill": [(3584, 512), (0, 700), (2047, 1), (100, 1)],
    }
    for fmt, bits in [*FORMATS.items(), ("K4/V8", (4, 8)), ("K2/V4", (2, 4)), ("K3/V5", (3, 5)), ("K6/V7", (6, 7))]:
        for case, shapes in cases.items():
            ctx = [c + n for c, n in shapes]
            cache = filled_cache(bits, ctx, gen)
            tables = shuffled_tables(cache, ctx, gen)
            q = torch.randn(sum(n for _, n in shapes), HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
            lens = ([n for _, n in shapes], ctx)
            poison(q.numel() * 4)
            got = paged_attention(q, cache.k[0], cache.v[0], tables, *lens)
            want = reference_attention(q.float(), as_reference(cache.k[0]), as_reference(cache.v[0]), tables, *lens)
            out[f"attention_relerr_{case}_{fmt}"] = err = rel_err(got, want)
            if err > 1e-2:
                print(f"FAIL attention {case} {fmt}: relative error {err:.2e}", flush=True)
            del cache
    torch.cuda.empty_cache()


def sweep_key(fmt: str, cfg: AttentionConfig) -> str:
    mode = "" if cfg.word_loads or fmt == "fp16" else "/gather"
    major = "/keys-major" if cfg.keys_major else "/queries-major"
    return f"{fmt} sweep {cfg.block_n}/{cfg.num_warps}w/{cfg.num_stages}s/{cfg.target_programs}{mode}{major}"


def decode(
    res: dict, gen: torch.Generator, seqs: int, ctx: int, formats: dict[str, KVBits], sweep: SweepGrid | None
) -> None:
    out = res.setdefault("decode", {})
    lens = ([1] * seqs, [ctx] * seqs)
    variants = [(fmt, fmt, bits, AttentionConfig(), PAGE_SIZE) for fmt, bits in formats.items()]
    variants += [  # per-value word gathers instead of split words (the same for 3, 5, 6 and 7 bits)
        (f"{fmt} gather", fmt, bits, AttentionConfig(word_loads=False), PAGE_SIZE)
        for fmt, bits in formats.items()
        if any(b is not None and 32 % b == 0 for b in bits)
    ]
    paged_256 = [fmt for fmt in ("fp16", "K4/V4") if fmt in formats]
    variants += [(f"{fmt} page 256", fmt, formats[fmt], AttentionConfig(), 256) for fmt in paged_256]
    if sweep is not None:
        for fmt, bits in formats.items():
            quantized = bits != (None, None)
            variants += [(sweep_key(fmt, cfg), fmt, bits, cfg, PAGE_SIZE) for cfg in sweep.configs(quantized)]
    first_use: dict = {}  # run the variants of each cache together: it is filled once
    for _, _, bits, _, page_size in variants:
        first_use.setdefault((bits, page_size), len(first_use))
    variants.sort(key=lambda v: first_use[v[2], v[4]])
    caches: dict = {}
    for key, fmt, bits, cfg, page_size in variants:
        if (bits, page_size) not in caches:
            caches.clear()
            torch.cuda.empty_cache()
            caches[bits, page_size] = filled_cache(bits, lens[1], gen, page_size)
        cache = caches[bits, page_size]
        tables = shuffled_tables(cache, lens[1], gen)
        q = torch.randn(seqs, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
        plan = plan_attention(*lens, HEADS, KV_HEADS, "cuda", cfg)
        try:
            ms = time_attention(q, cache, tables, *lens, plan=plan, config=cfg)
        except Exception as exc:  # a sweep config that does not compile (shared memory) is just skipped
            print(f"  {key} {cfg}: {type(exc).__name__}: {str(exc).strip()[:300]}", flush=True)
            continue
        nbytes = attention_bytes(cache.k[0], cache.v[0], lens[1])
        row = {"ms": ms, "GBps": nbytes / ms / 1e6, "MB_read": nbytes / 1e6, "splits": plan.num_splits,
               "config": repr(cfg)}  # fmt: skip
        row["of_copy"] = row["GBps"] / res["copy_GBps"]
        out[key] = row
        best = out.setdefault("best", {})
        if page_size == PAGE_SIZE and (fmt not in best or ms < best[fmt]["ms"]):
            best[fmt] = row
        print(f"decode {key}: {ms * 1000:.0f} us, {row['GBps']:.0f} GB/s ({row['of_copy']:.0%} of copy)", flush=True)
    caches.clear()
    torch.cuda.empty_cache()
    if "fp16" not in out:
        return
    fp16 = out["fp16"]["ms"]
    for key, row in out.items():
        if key != "best":
            row["speedup_vs_fp16"] = fp16 / row["ms"]
    for row in out["best"].values():
        row["speedup_vs_fp16"] = out["best"]["fp16"]["ms"] / row["ms"]


def append(res: dict, gen: torch.Generator) -> None:
    out = res.setdefault("append", {})
    for fmt, bits in FORMATS.items():
        cache = PagedKVCache(1, 4096, PAGE_SIZE, KV_HEADS, HEAD_DIM, DTYPE, "cuda", bits)
        for tokens in (16, 2048):
            k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
            slots = torch.randperm(cache.num_slots, generator=gen, device="cuda")[:tokens]
            ms = time_write(cache, k, slots)
            out[f"{fmt}_{tokens}_tokens_us"] = ms * 1000
        del cache


def prefill_case(
    bits: KVBits, cached: int, chunk: int, gen: torch.Generator
) -> tuple[PagedKVCache, torch.Tensor, torch.Tensor, int]:
    """One sequence's chunk of ``chunk`` queries over ``cached`` earlier tokens: (cache, block tables, q, flops)."""
    ctx = cached + chunk
    cache = filled_cache(bits, [ctx], gen)
    tables = shuffled_tables(cache, [ctx], gen)
    q = torch.randn(chunk, HEADS, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    return cache, tables, q, 4 * HEADS * HEAD_DIM * (chunk * cached + chunk * (chunk + 1) // 2)


def prefill(res: dict, gen: torch.Generator, cached: int, chunk: int, name: str) -> None:
    out = res.setdefault(name, {})
    ctx = cached + chunk
    for fmt, bits in (("fp16", (None, None)), ("K4/V4", (4, 4))):
        cache, tables, q, flops = prefill_case(bits, cached, chunk, gen)
        # plans built once, as the worker builds one per step for all layers: the timings are the kernels' alone
        plan = plan_attention([chunk], [ctx], HEADS, KV_HEADS, "cuda", kv_bits=bits)
        ms = time_attention(q, cache, tables, [chunk], [ctx], plan=plan)
        decode_plan = plan_attention([1], [ctx], HEADS, KV_HEADS, "cuda", kv_bits=bits)
        decode_ms = time_attention(q[:1].contiguous(), cache, tables, [1], [ctx], plan=decode_plan)
        out[fmt] = {"chunk_ms": ms, "TFLOPs": flops / ms / 1e9, "decode_us": decode_ms * 1000}
        print(f"{name} {fmt}: chunk {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s), decode {decode_ms * 1000:.0f} us")
        if bits != (None, None):  # the default takes rotated copies of the pages here; this is without them
            direct = AttentionConfig(dequantize_reuse=None)
            plan = plan_attention([chunk], [ctx], HEADS, KV_HEADS, "cuda", direct, bits)
            ms = time_attention(q, cache, tables, [chunk], [ctx], plan=plan, config=direct)
            out[f"{fmt} direct"] = {"chunk_ms": ms, "TFLOPs": flops / ms / 1e9}
            print(f"{name} {fmt} direct: chunk {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
        del cache
        torch.cuda.empty_cache()


def prefill_sweep(
    res: dict, gen: torch.Generator, grid: SweepGrid, block_m: list[int], cached: int = 30720, chunk: int = 2048
) -> None:
    """The 2K-over-30K chunk for every block_m x block_n x warps x stages: fp16, K4/V4 over the quantized pages and
    K4/V4 through dequantized copies (their dequantizing included), the best of each reported."""
    out = res.setdefault("prefill_sweep", {})
    ctx = cached + chunk
    shapes = list(product(block_m, grid.block_n, grid.warps, grid.stages))
    for fmt, bits, reuse in (("fp16", (None, None), None), ("K4/V4", (4, 4), None), ("K4/V4 copies", (4, 4), 1)):
        cache, tables, q, flops = prefill_case(bits, cached, chunk, gen)
        for bm, bn, w, st in shapes:
            cfg = AttentionConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st, dequantize_reuse=reuse)
            key = f"{fmt} {bm}/{bn}/{w}w/{st}s"
            try:
                ms = time_attention(q, cache, tables, [chunk], [ctx], config=cfg)
            except Exception as exc:  # a config that does not compile (shared memory) is just skipped
                print(f"  {key}: {type(exc).__name__}: {str(exc).strip()[:300]}", flush=True)
                continue
            out[key] = {"ms": ms, "TFLOPs": flops / ms / 1e9}
            best = out.setdefault("best", {})
            if fmt not in best or ms < best[fmt]["ms"]:
                best[fmt] = {"config": key, "ms": ms, "TFLOPs": flops / ms / 1e9}
            print(f"prefill sweep {key}: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)
        del cache
        torch.cuda.empty_cache()


def end_to_end_128k(res: dict, prompt_tokens: int = 131072 - 16, max_new: int = 16, preset: str = "llama3-8b") -> None:
    """Prefill + greedy decode of one 128K sequence through the real model code, scheduler and K4/V4 cache."""
    from inference_worker.batch import build_batch
    from inference_worker.loader import load_model
    from inference_worker.scheduler import Scheduler, Sequence
    from shared.exl3_synth import synth_model

    out = res.setdefault("e2e_128k", {})
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        t = time.perf_counter()
        model_dir = synth_model(preset, 4, Path(tmp) / f"{preset}-4bit")
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())  # Llama-3.1: rope scaled from 8K to 128K
        config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
        config["max_position_embeddings"] = 131072
        config_path.write_text(json.dumps(config))
        model, cfg = load_model(model_dir, "cuda", DTYPE)
        out["synth_and_load_s"] = time.perf_counter() - t
    weights = torch.cuda.memory_allocated()
    total = prompt_tokens + max_new
    sched = Scheduler(-(-total // PAGE_SIZE), PAGE_SIZE, max_batch_size=1, max_batch_tokens=8192)
    cache = PagedKVCache(
        cfg.num_hidden_layers, sched.num_pages, PAGE_SIZE, cfg.num_key_value_heads, cfg.head_dim, DTYPE, "cuda",
        (4, 4),
    )  # fmt: skip
    out["kv_cache_GiB"] = (torch.cuda.memory_allocated() - weights) / 2**30
    gen = torch.Generator().manual_seed(0)
    seq = Sequence("long", torch.randint(0, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist(), max_new)
    sched.add(seq)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    first_token_at = None
    with torch.inference_mode():
        while sched.has_work():
            plan = sched.schedule()
            logits = model(build_batch(plan.scheduled, torch.device("cuda")), cache)
            if plan.scheduled[0].samples:
                seq.output_ids.append(int(logits[-1].argmax()))
                if first_token_at is None:
                    torch.cuda.synchronize()
                    first_token_at = time.perf_counter()
                if len(seq.output_ids) >= max_new:
                    sched.finish(seq)
    torch.cuda.synchronize()
    end = time.perf_counter()
    out.update(
        prompt_tokens=prompt_tokens,
        prefill_s=first_token_at - t,
        prefill_tokens_per_s=prompt_tokens / (first_token_at - t),
        decode_ms_per_token=(end - first_token_at) * 1000 / (max_new - 1),
        peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
        tokens_valid=len(seq.output_ids) == max_new and all(0 <= t < cfg.vocab_size for t in seq.output_ids),
    )
    print(f"e2e 128K: {out}", flush=True)
    del model, cache
    torch.cuda.empty_cache()


def quality(res: dict, model_dir: Path, window: int = 1024, windows: int = 4) -> None:
    """KL(unquantized || quantized) of next-token distributions, averaged over every position of a few windows."""
    from inference_worker.batch import ForwardBatch
    from inference_worker.loader import load_model
    from shared.tokenizer import ModelTokenizer

    model, cfg = load_model(model_dir, "cuda", torch.float32)
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"] if p.exists())
    ids = ModelTokenizer.from_dir(model_dir).encode(text)
    windows = min(windows, len(ids) // window)
    if windows < 1:
        raise ValueError(f"only {len(ids)} tokens of text for windows of {window}")
    pages = -(-window // PAGE_SIZE)
    batch = ForwardBatch(
        input_ids=torch.zeros(window, dtype=torch.int64, device="cuda"),
        positions=torch.arange(window, device="cuda"),
        query_lens=[window],
        context_lens=[window],
        block_tables=torch.arange(pages, device="cuda")[None],
        slot_mapping=torch.arange(window, device="cuda"),
        logits_indices=torch.arange(window, device="cuda"),
    )

    def logprobs(bits: KVBits, w: int) -> torch.Tensor:
        batch.input_ids = torch.tensor(ids[w * window : (w + 1) * window], device="cuda")
        cache = PagedKVCache(
            cfg.num_hidden_layers, pages, PAGE_SIZE, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cuda", bits
        )
        with torch.inference_mode():
            return model(batch, cache).log_softmax(-1)

    exact = [logprobs((None, None), w) for w in range(windows)]
    out = res.setdefault("kl_vs_unquantized", {"model": str(model_dir), "tokens": windows * window})
    for k in (2, 3, 4, 6, 8):
        for v in (2, 4, 8):
            kls = [(e.exp() * (e - logprobs((k, v), w))).sum(-1).mean() for w, e in enumerate(exact)]
            out[f"K{k}/V{v}"] = float(torch.stack(kls).mean())
    print("KL:", {k: f"{v:.4f}" for k, v in out.items() if k.startswith("K")}, flush=True)


# -- driver -----------------------------------------------------------------------------------------------------------
def table(res: dict) -> str:
    lines = [f"copy bandwidth {res.get('copy_GBps', 0):.0f} GB/s"]
    lines.append("memory per token (8B): " + ", ".join(
        f"{k} {v['bytes'] / 1024:.0f} KiB ({v['of_fp16']:.0%})" for k, v in res.get("bytes_per_token_8b", {}).items()
    ))  # fmt: skip
    decode_rows = res.get("decode", {})
    if decode_rows:
        rows = {k: v for k, v in decode_rows.items() if k != "best" and "sweep" not in k}
        if any("sweep" in k for k in decode_rows):
            rows.update({f"best {k}": v for k, v in decode_rows["best"].items()})
        lines.append(f"decode attention, {res['decode_shape']}, page {PAGE_SIZE} unless named:")
        lines.append(f"  {'format':18} {'us':>8} {'GB/s':>7} {'of copy':>8} {'vs fp16':>8}")
        for fmt, row in rows.items():
            speedup = row.get("speedup_vs_fp16", float("nan"))
            lines.append(f"  {fmt:18} {row['ms'] * 1000:8.0f} {row['GBps']:7.0f} {row['of_copy']:8.0%} {speedup:7.2f}x")
    for name in ("prefill_32k", "long_128k"):
        for fmt, row in res.get(name, {}).items():
            decode = f", decode {row['decode_us']:.0f} us" if "decode_us" in row else ""
            lines.append(f"{name} {fmt}: chunk {row['chunk_ms']:.2f} ms {row['TFLOPs']:.0f} TFLOP/s{decode}")
    for row in res.get("prefill_sweep", {}).get("best", {}).values():
        lines.append(f"prefill sweep, best {row['config']}: {row['ms']:.2f} ms {row['TFLOPs']:.0f} TFLOP/s")
    e2e = res.get("e2e_128k", {})
    if "prefill_s" in e2e:
        lines.append(
            f"e2e 128K (8B-shaped, EXL3 4-bit, K4/V4): prefill {e2e['prefill_s']:.1f} s, decode "
            f"{e2e['decode_ms_per_token']:.1f} ms/token, KV {e2e['kv_cache_GiB']:.1f} GiB, "
            f"peak {e2e['peak_GiB']:.1f} GiB"
        )
    corr = res.get("correctness", {})
    errs = {k: v for k, v in corr.items() if k.startswith("attention_relerr")}
    if errs:
        lines.append(f"correctness: max attention rel err {max(errs.values()):.1e}, append codes equal >= "
                     f"{min(v for k, v in corr.items() if k.startswith('append_codes_equal')):.5f}")  # fmt: skip
    kl = res.get("kl_vs_unquantized", {})
    if kl:
        lines.append("KL vs unquantized cache (rows K, columns V=2/4/8):")
        for k in (2, 3, 4, 6, 8):
            lines.append(f"  K{k}: " + "  ".join(f"{kl[f'K{k}/V{v}']:.4f}" for v in (2, 4, 8)))
    for section, err in res.get("errors", {}).items():
        lines.append(f"ERROR in {section}: {err.splitlines()[-1]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller decode shape, no end-to-end run")
    parser.add_argument("--sweep", action="store_true", help="also sweep kernel configurations for decode")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end 128K run")
    parser.add_argument("--only", help="comma-separated sections to run (names as in the JSON's section_seconds)")
    parser.add_argument("--model", type=Path, help="a model directory for the KL table (e.g. the default model)")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    knobs = parser.add_argument_group("decode formats and the --sweep grid (comma-separated lists)")
    knobs.add_argument("--formats", type=parse_formats, default=FORMATS, help="decode formats: fp16 or K<b>/V<b>")
    knobs.add_argument("--block-n", type=int_list, default=[32, 64, 128], help="keys per tile")
    knobs.add_argument("--block-m", type=int_list, default=[64, 128], help="prefill sweep: query rows per program")
    knobs.add_argument("--warps", type=int_list, default=[4, 8])
    knobs.add_argument("--stages", type=int_list, default=[2, 3])
    knobs.add_argument("--targets", default="none,1024", help="split targets in programs; none: 4 per SM")
    knobs.add_argument("--keys-major", default="1,0", help="1: K q^T and V^T p^T dots, 0: q K^T and p V")
    knobs.add_argument("--word-loads", default="1", help="quantized pages: 1 whole-word loads, 0 per-value gathers")
    args = parser.parse_args()
    grid = SweepGrid(
        block_n=args.block_n,
        warps=args.warps,
        stages=args.stages,
        targets=[None if t == "none" else int(t) for t in args.targets.split(",")],
        word_loads=[w == "1" for w in args.word_loads.split(",")],
        keys_major=[k == "1" for k in args.keys_major.split(",")],
    )
    if not torch.cuda.is_available():
        print("bench/kv_cache.py needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    seqs, ctx = (4, 8192) if args.quick else (16, 32768)
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "decode_shape": f"{seqs} seqs x {ctx} tokens, 32/8 heads x 128",
    }

    def save() -> None:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "kv_cache.json").write_text(json.dumps(res, indent=2, default=str))

    sections = [
        ("ceiling", lambda: ceiling(res)),
        ("memory", lambda: memory(res)),
        ("correctness", lambda: correctness(res, gen)),
        ("decode", lambda: decode(res, gen, seqs, ctx, args.formats, grid if args.sweep else None)),
        ("append", lambda: append(res, gen)),
        ("prefill_32k", lambda: prefill(res, gen, 30720, 2048, "prefill_32k")),
        ("long_128k", lambda: prefill(res, gen, 131072 - 2048, 2048, "long_128k")),
    ]
    if args.sweep:
        sections.append(("prefill_sweep", lambda: prefill_sweep(res, gen, grid, args.block_m)))
    if not (args.quick or args.no_e2e):
        sections.append(("e2e_128k", lambda: end_to_end_128k(res)))
    if args.model is not None:
        sections.append(("quality", lambda: quality(res, args.model)))
    if args.only:
        wanted = set(args.only.split(","))
        sections = [s for s in sections if s[0] in wanted or s[0] == "ceiling"]  # every figure needs the ceiling
    for name, run in sections:
        t = time.perf_counter()
        try:
            run()
        except Exception:  # one broken section must not hide the others' numbers
            res.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"section {name} failed:\n{traceback.format_exc()}", flush=True)
        res.setdefault("section_seconds", {})[name] = time.perf_counter() - t
        save()
        torch.cuda.empty_cache()
    print("\n" + table(res))
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
