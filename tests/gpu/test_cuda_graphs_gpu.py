"""Captured decode graphs on CUDA against the eager forward (run with ``pytest -m gpu tests/gpu``).

The CPU suite checks the graphs' bookkeeping through their fixed buffers (tests/test_cuda_graphs.py); these tests
capture and replay for real, on a synthetic EXL3 model (Triton matmuls, paged attention, quantized KV too) and on
the default dense model through the engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_worker.batch import Chunk, build_batch, padded_chunk
from inference_worker.cuda_graphs import DecodeGraphs, prompt_query_bucket
from inference_worker.engine import Engine, EngineConfig
from inference_worker.kv_cache import PagedKVCache
from inference_worker.loader import load_model
from shared.exl3_synth import synth_model
from shared.tokenizer import ModelTokenizer
from shared.wire import GenerationRequest, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PAGE = 16


@pytest.fixture(scope="module")
def exl3_model(tmp_path_factory: pytest.TempPathFactory):
    path = synth_model("smollm2-135m", 4, tmp_path_factory.mktemp("synth"))
    return load_model(path, "cuda", torch.bfloat16)


def _chunk(tokens: list[int], start: int, pages: list[int]) -> Chunk:
    positions = list(range(start, start + len(tokens)))
    return Chunk(tokens, positions, [pages[p // PAGE] * PAGE + p % PAGE for p in positions], pages)


@pytest.mark.parametrize("kv_bits", [(None, None), (4, 4)])
def test_replayed_decode_steps_match_the_eager_forward(exl3_model, kv_bits) -> None:
    model, config = exl3_model
    num_seqs, pages_each, scratch = 5, 4, 20

    def cache() -> PagedKVCache:
        return PagedKVCache(
            config.num_hidden_layers, 21, PAGE, config.num_key_value_heads, config.head_dim, torch.bfloat16, "cuda",
            kv_bits=kv_bits,
        )  # fmt: skip

    graphed, eager = cache(), cache()
    pages = [list(range(i * pages_each, (i + 1) * pages_each)) for i in range(num_seqs)]
    prompts = [[100 + 7 * i + j for j in range(3 + 5 * i)] for i in range(num_seqs)]
    prefill = build_batch([_chunk(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)], torch.device("cuda"))
    with torch.inference_mode():
        model.forward(prefill, graphed)
        model.forward(prefill, eager)
    graphs = DecodeGraphs(model, graphed, max_batch=8, max_context=4096, scratch_page=scratch,
                          num_heads=config.num_attention_heads)  # fmt: skip
    tokens = [[p[-1]] for p in prompts]
    for step in range(12):
        live = num_seqs if step < 6 else 3  # bucket 8, then bucket 4 with one padding row
        chunks = [_chunk(tokens[i][-1:], len(prompts[i]) + step, pages[i]) for i in range(live)]
        batch = build_batch(chunks, torch.device("cuda"))
        got = graphs.forward(batch).clone()
        with torch.inference_mode():
            want = model.forward(batch, eager)
        assert torch.isfinite(got).all()
        err = float((got - want).norm() / want.norm())
        assert err < 2e-2, f"step {step}: relative error {err:.3g}"
        for i, t in enumerate(want.argmax(-1).tolist()):
            tokens[i].append(t)
    assert graphs.num_graphs == 2 and graphs.replays == 12


@pytest.mark.parametrize("kv_bits", [(None, None), (4, 4)])
def test_replayed_prompt_steps_match_the_eager_forward(exl3_model, kv_bits) -> None:
    model, config = exl3_model
    scratch = 30

    def cache() -> PagedKVCache:
        return PagedKVCache(
            config.num_hidden_layers, 31, PAGE, config.num_key_value_heads, config.head_dim, torch.bfloat16, "cuda",
            kv_bits=kv_bits,
        )  # fmt: skip

    def graphs_over(c: PagedKVCache, capture: bool) -> DecodeGraphs:
        return DecodeGraphs(model, c, max_batch=8, max_context=4096, scratch_page=scratch,
                            num_heads=config.num_attention_heads, prompt_tokens=256, capture=capture)  # fmt: skip

    graphed, direct, eager = cache(), cache(), cache()
    graphs, unreplayed = graphs_over(graphed, True), graphs_over(direct, False)
    cuda = torch.device("cuda")
    # round 1: three new prompts (bucket 4 x 64 tokens: a padding sequence spans four scratch pages); round 2: the
    # first two decode while a fourth prompt joins, its chunk past a cached first page (bucket 4 x 32)
    prompts = [[100 + 7 * i + j for j in range(9 + 20 * i)] for i in range(3)]
    pages = [list(range(6 * i, 6 * i + 6)) for i in range(4)]
    rounds = [
        [_chunk(p, 0, pg) for p, pg in zip(prompts, pages, strict=False)],
        [_chunk([5], 9, pages[0]), _chunk([6], 29, pages[1]), _chunk(list(range(300, 320)), 16, pages[3])],
    ]
    with torch.inference_mode():  # the fourth sequence's first page, as a prefix cache would hand it over
        for c in (graphed, direct, eager):
            model.forward(build_batch([_chunk(list(range(200, 216)), 0, pages[3])], cuda), c)
    # against the unpadded eager forward: bf16 rounding differs with the padded shapes, and a quantized cache turns
    # some of it into whole code steps; against the same buffers run without capture: only the replay differs
    tolerance = 2e-2 if kv_bits == (None, None) else 5e-2
    for chunks in rounds:
        q = prompt_query_bucket(max(len(c.token_ids) for c in chunks))
        last = [q * i + len(c.token_ids) - 1 for i, c in enumerate(chunks)]
        step = build_batch([padded_chunk(c, q, graphs.scratch_slot) for c in chunks], cuda, logits_rows=last)
        got = graphs.forward(step).clone()
        same_buffers = unreplayed.forward(step).clone()
        with torch.inference_mode():
            want = model.forward(build_batch(chunks, cuda), eager)
        assert torch.isfinite(got).all()
        replay_err = float((got - same_buffers).norm() / same_buffers.norm())
        assert replay_err < 2e-3, f"{q} tokens per sequence: replay vs the same buffers run directly {replay_err:.3g}"
        err = float((got - want).norm() / want.norm())
        assert err < tolerance, f"prompt step of {q} tokens per sequence: relative error {err:.3g}"
    assert graphs.prompt_replays == 2 and graphs.num_graphs == 2
    # what the graphed steps wrote: a decode step of all four over each cache attends over it
    decode = build_batch([_chunk([7], len(p) + (i < 2), pages[i]) for i, p in enumerate(prompts)]
                         + [_chunk([8], 36, pages[3])], cuda)  # fmt: skip
    with torch.inference_mode():
        got, want = model.forward(decode, graphed), model.forward(decode, eager)
    err = float((got - want).norm() / want.norm())
    assert err < tolerance, f"decode over the graphed prompts' K/V: relative error {err:.3g}"


def test_engine_with_decode_graphs_keeps_its_greedy_output(default_model_dir: Path) -> None:
    model, config = load_model(default_model_dir, "cuda", torch.bfloat16)
    tokenizer = ModelTokenizer.from_dir(default_model_dir)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three prime numbers:"]

    def generate(mode: str) -> tuple[dict[str, list[int]], Engine]:
        cfg = EngineConfig(device="cuda", max_batch_size=8, kv_cache_tokens=4096, max_model_len=2048,
                           decode_graphs=mode, prompt_graph_tokens=256)  # fmt: skip
        engine = Engine(model, config, tokenizer, cfg)
        for i, p in enumerate(prompts):
            params = SamplingParams(max_tokens=8 + 4 * i, temperature=0.0, ignore_eos=True)
            engine.add_request(GenerationRequest(f"r{i}", "m", tokenizer.tokenizer.encode(p).ids, params))
        out: dict[str, list[int]] = {}
        while engine.has_work():
            for rid, event in engine.step():
                if event["type"] == "delta":
                    out.setdefault(rid, []).extend(event["token_ids"])
        return out, engine

    eager, _ = generate("off")
    graphed, engine = generate("auto")
    assert engine.decode_graphs is not None and engine.stats()["decode_graph_steps"] > 10
    assert engine.decode_graphs.prompt_replays == 1  # the four prompts: 4 x 8 tokens
    for rid, toks in eager.items():  # bf16 batch padding may move a near-tie: the first tokens must agree
        assert graphed[rid][:6] == toks[:6], rid
