"""Decode graphs (inference_worker/cuda_graphs.py): bucketing, padding rows that touch only the scratch page, and an
engine whose decode steps go through the graphs' fixed buffers giving exactly the plain engine's tokens.

On the CPU the graphs run in "static" mode (the same buffers, the forward run directly instead of replayed); the GPU
suite (tests/gpu) checks captured replay against the eager forward.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from inference_worker.batch import Chunk, ForwardBatch, build_batch, padded_chunk
from inference_worker.cuda_graphs import (
    DecodeGraphs,
    batch_bucket,
    context_bucket,
    graphs_supported,
    prompt_graph_budget,
    prompt_query_bucket,
)
from inference_worker.engine import Engine
from inference_worker.kv_cache import PagedKVCache
from inference_worker.layers import DenseLinear
from inference_worker.loader import load_model
from inference_worker.models.decoder import MLP
from inference_worker.moe import SparseMoe
from shared.wire import GenerationRequest
from tests.test_engine import PROMPTS, greedy, loaded, make_engine, run, tokens_of  # noqa: F401 - fixture
from tests.tiny_models import write_tiny_llama

PAGE = 4


def test_batch_bucket_pads_up_to_the_next_bucket_but_never_past_the_largest_batch() -> None:
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 9, 13, 17, 25, 32)] == [1, 2, 4, 8, 12, 16, 24, 32, 32]
    assert batch_bucket(5, 6) == 6  # 8 would pass the largest batch: the largest batch is its own bucket
    with pytest.raises(ValueError, match="1 to 6"):
        batch_bucket(7, 6)


def test_context_bucket_grows_fourfold_and_stops_at_the_served_length() -> None:
    assert [context_bucket(n, 100_000) for n in (1, 1024, 1025, 4096, 5000, 70_000)] == [
        1024, 1024, 4096, 4096, 16384, 100_000
    ]  # fmt: skip
    assert context_bucket(10, 512) == 512
    with pytest.raises(ValueError, match="1 to 512"):
        context_bucket(513, 512)


def test_prompt_chunks_pad_to_a_power_of_two_of_at_least_eight_tokens() -> None:
    assert [prompt_query_bucket(n) for n in (1, 7, 8, 9, 16, 17, 100, 128, 129)] == [8, 8, 8, 16, 16, 32, 128, 128, 256]
    with pytest.raises(ValueError, match="at least one token"):
        prompt_query_bucket(0)


def test_decoder_models_are_captured_and_anything_else_runs_eagerly(tiny) -> None:
    assert graphs_supported(tiny[0])
    assert not graphs_supported(SimpleNamespace(config=SimpleNamespace(moe=None)))


def test_mixture_of_experts_models_get_no_prompt_graphs(tiny) -> None:
    assert prompt_graph_budget(tiny[0], 256) == 256
    assert prompt_graph_budget(SimpleNamespace(config=SimpleNamespace(moe=object())), 256) == 0


def test_the_host_free_moe_path_that_graphs_capture_mixes_the_same_experts() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden, inner, num_experts = 16, 24, 6

    def linear(n: int, k: int) -> DenseLinear:
        return DenseLinear(torch.randn(n, k, generator=gen) / k**0.5)

    experts = [MLP(linear(inner, hidden), linear(inner, hidden), linear(hidden, inner)) for _ in range(num_experts)]
    moe = SparseMoe(torch.randn(num_experts, hidden, generator=gen), experts, top_k=2, norm_topk_prob=True)
    x = torch.randn(5, hidden, generator=gen)
    weights, chosen = moe.route(x)
    torch.testing.assert_close(moe.run_every_expert(x, weights, chosen), moe.run_experts(x, weights, chosen))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, config = load_model(write_tiny_llama(tmp_path_factory.mktemp("tiny")), "cpu", torch.float32)
    return model, config


def _cache(config, num_pages: int) -> PagedKVCache:
    return PagedKVCache(
        config.num_hidden_layers, num_pages, PAGE, config.num_key_value_heads, config.head_dim, torch.float32, "cpu"
    )


def _chunk(tokens: list[int], start: int, pages: list[int]) -> Chunk:
    positions = list(range(start, start + len(tokens)))
    slots = [pages[p // PAGE] * PAGE + p % PAGE for p in positions]
    return Chunk(tokens, positions, slots, pages)


def test_a_padded_decode_step_equals_the_plain_forward_and_writes_only_its_slots_and_the_scratch_page(tiny) -> None:
    model, config = tiny
    prompts = [[5, 9, 3, 7, 1, 2], [8, 8, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    pages = [[0, 1, 2], [3, 4], [5, 6, 7]]  # page 8 is the scratch page
    cache = _cache(config, 9)
    with torch.inference_mode():
        model.forward(build_batch([_chunk(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)], "cpu"), cache)
    reference = _cache(config, 9)
    for layer in range(config.num_hidden_layers):
        reference.k[layer].copy_(cache.k[layer])
        reference.v[layer].copy_(cache.v[layer])

    graphs = DecodeGraphs(model, cache, max_batch=8, max_context=64, scratch_page=8, num_heads=2, capture=False)
    for step in range(3):  # 3 sequences run in a batch of 4: one padding row
        chunks = [
            _chunk([20 + step + i], len(p) + step, pg) for i, (p, pg) in enumerate(zip(prompts, pages, strict=True))
        ]
        decode = build_batch(chunks, "cpu")
        assert graphs.eligible(decode)
        with torch.inference_mode():
            expected = model.forward(decode, reference)
        got = graphs.forward(decode)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert graphs.num_graphs == 1 and graphs.replays == 3
    for layer in range(config.num_hidden_layers):  # every page but the scratch page matches (up to batch-size rounding)
        torch.testing.assert_close(cache.k[layer][:8], reference.k[layer][:8], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.v[layer][:8], reference.v[layer][:8], rtol=1e-4, atol=1e-5)
        assert cache.k[layer][8, 0].abs().sum() > 0  # the padding row wrote there


def test_a_smaller_step_after_a_larger_one_turns_the_freed_rows_back_into_padding(tiny) -> None:
    model, config = tiny
    cache = _cache(config, 6)
    graphs = DecodeGraphs(model, cache, max_batch=4, max_context=32, scratch_page=5, num_heads=2, capture=False)
    graphs.forward(build_batch([_chunk([1 + i], 0, [i]) for i in range(4)], "cpu"))
    for layer in range(config.num_hidden_layers):
        cache.k[layer][3].zero_()
        cache.v[layer][3].zero_()
    graphs.forward(build_batch([_chunk([1 + i], 1, [i]) for i in range(3)], "cpu"))  # the same bucket, one row less
    assert graphs.num_graphs == 1
    for layer in range(config.num_hidden_layers):  # the fourth row's old slot was not written again
        assert not cache.k[layer][3].any() and not cache.v[layer][3].any()
        assert cache.k[layer][2, 1].any()


def test_a_verification_step_of_several_tokens_per_sequence_equals_the_plain_forward(tiny) -> None:
    model, config = tiny
    prompts = [[5, 9, 3, 7, 1], [8, 8, 4, 2, 2, 2, 2, 9, 1]]
    pages = [[0, 1, 2], [3, 4, 5]]
    cache, reference = _cache(config, 7), _cache(config, 7)
    prefill = build_batch([_chunk(p, 0, pg) for p, pg in zip(prompts, pages, strict=True)], "cpu")
    with torch.inference_mode():
        model.forward(prefill, cache)
        model.forward(prefill, reference)
    graphs = DecodeGraphs(model, cache, 4, 64, scratch_page=6, num_heads=2, max_query=4, capture=False)
    chunks = [_chunk([p[-1], 30, 31], len(p), pg) for p, pg in zip(prompts, pages, strict=True)]  # last token + 2
    chunks = [Chunk(c.token_ids, c.positions, c.slot_mapping, c.block_table, num_logits=3) for c in chunks]
    verify = build_batch(chunks, "cpu")
    assert graphs.eligible(verify)
    with torch.inference_mode():
        expected = model.forward(verify, reference)
    torch.testing.assert_close(graphs.forward(verify), expected, rtol=1e-5, atol=1e-5)
    assert list(graphs._graphs) == [(2, 3, 64, False)]
    for layer in range(config.num_hidden_layers):
        torch.testing.assert_close(cache.k[layer][:6], reference.k[layer][:6], rtol=1e-4, atol=1e-5)
    only_last = build_batch([Chunk(c.token_ids, c.positions, c.slot_mapping, c.block_table) for c in chunks], "cpu")
    assert not graphs.eligible(only_last)  # verification needs every row's logits
    five = _chunk([1, 2, 3, 4, 5], 10, [0, 1, 2, 3])
    five = Chunk(five.token_ids, five.positions, five.slot_mapping, five.block_table, num_logits=5)
    assert not graphs.eligible(build_batch([five, five], "cpu"))  # more tokens per sequence than max_query


def _last_rows(chunks: list[Chunk], q: int) -> list[int]:
    return [q * i + len(c.token_ids) - 1 for i, c in enumerate(chunks)]


def test_a_padded_prompt_step_equals_the_plain_forward_and_writes_only_its_slots_and_the_scratch_page(tiny) -> None:
    model, config = tiny
    # two new prompts and a decoding sequence in one step; the batch of 3 runs in a bucket of 4, every chunk padded
    # to 16 tokens: four pages of 4, so the padding sequence's context spans the scratch page four times over
    cached = [10, 11, 12, 13, 14, 15]
    chunks = [
        _chunk([5, 9, 3, 7, 1], 0, [0, 1]),
        _chunk([16], len(cached), [2, 3]),
        _chunk([8, 8, 4, 2, 2, 2, 2, 9, 1], 0, [4, 5, 6]),
    ]
    cache, reference = _cache(config, 8), _cache(config, 8)  # page 7 is the scratch page
    with torch.inference_mode():
        for c in (cache, reference):
            model.forward(build_batch([_chunk(cached, 0, [2, 3])], "cpu"), c)
    graphs = DecodeGraphs(model, cache, max_batch=4, max_context=64, scratch_page=7, num_heads=2, prompt_tokens=64,
                          capture=False)  # fmt: skip
    assert graphs.prompt_fits(3, 9) and not graphs.prompt_fits(3, 17)  # 4 x 32 tokens: past prompt_tokens
    padded = [padded_chunk(c, 16, graphs.scratch_slot) for c in chunks]
    step = build_batch(padded, "cpu", logits_rows=_last_rows(chunks, 16))
    assert graphs.eligible(step)
    with torch.inference_mode():
        expected = model.forward(build_batch(chunks, "cpu"), reference)
    torch.testing.assert_close(graphs.forward(step), expected, rtol=1e-5, atol=1e-5)
    assert list(graphs._graphs) == [(4, 16, 64, True)] and graphs.prompt_replays == 1
    for layer in range(config.num_hidden_layers):  # every page but the scratch page holds what the plain step wrote
        torch.testing.assert_close(cache.k[layer][:7], reference.k[layer][:7], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.v[layer][:7], reference.v[layer][:7], rtol=1e-4, atol=1e-5)
        assert cache.k[layer][7].abs().sum() > 0

    # the same graph takes a smaller step next: the decoding sequence alone would be a decode graph's, so two chunks
    follow = [_chunk([3], 5, [0, 1]), _chunk([4, 4, 4], 9, [4, 5, 6])]
    step = build_batch([padded_chunk(c, 16, graphs.scratch_slot) for c in follow], "cpu",
                       logits_rows=_last_rows(follow, 16))  # fmt: skip
    with torch.inference_mode():
        expected = model.forward(build_batch(follow, "cpu"), reference)
    torch.testing.assert_close(graphs.forward(step), expected, rtol=1e-5, atol=1e-5)
    assert graphs.num_graphs == 2  # bucket 2 this time


def test_prompt_steps_beyond_the_prompt_budget_or_off_a_bucket_are_not_eligible(tiny) -> None:
    model, config = tiny
    chunks = [_chunk([1, 2, 3], 0, [0])]

    def step(graphs: DecodeGraphs, q: int) -> ForwardBatch:
        return build_batch([padded_chunk(c, q, graphs.scratch_slot) for c in chunks], "cpu",
                           logits_rows=_last_rows(chunks, q))  # fmt: skip

    off = DecodeGraphs(model, _cache(config, 9), max_batch=2, max_context=64, scratch_page=8, num_heads=2,
                       capture=False)  # fmt: skip
    assert not off.prompt_fits(1, 3) and not off.eligible(step(off, 8))  # prompt_tokens=0: decode graphs only
    small = DecodeGraphs(model, _cache(config, 9), max_batch=2, max_context=64, scratch_page=8, num_heads=2,
                         prompt_tokens=8, capture=False)  # fmt: skip
    assert small.eligible(step(small, 8))
    assert not small.eligible(step(small, 12))  # not a bucket
    assert not small.eligible(step(small, 16))  # a bucket past prompt_tokens
    with pytest.raises(ValueError, match="prompt_tokens"):
        DecodeGraphs(model, _cache(config, 9), 2, 64, scratch_page=8, num_heads=2, prompt_tokens=-1, capture=False)


def test_warm_up_builds_every_short_chat_shape_ahead_of_the_steps_that_use_them(tiny) -> None:
    model, config = tiny
    graphs = DecodeGraphs(model, _cache(config, 9), max_batch=4, max_context=64, scratch_page=8, num_heads=2,
                          prompt_tokens=64, capture=False)  # fmt: skip
    assert graphs.warm_up() == 12 and graphs.warm_up() == 0
    decode_shapes = {(b, 1, 64, False) for b in (1, 2, 4)}
    prompt_shapes = {(b, q, 64, True) for q, batches in ((8, (1, 2, 4)), (16, (1, 2, 4)), (32, (1, 2)), (64, (1,)))
                     for b in batches}  # fmt: skip
    assert set(graphs._graphs) == decode_shapes | prompt_shapes
    chunks = [_chunk([1, 2, 3], 0, [0]), _chunk([4] * 20, 0, [1, 2, 3, 4, 5])]
    step = build_batch([padded_chunk(c, 32, graphs.scratch_slot) for c in chunks], "cpu",
                       logits_rows=_last_rows(chunks, 32))  # fmt: skip
    graphs.forward(step)
    assert graphs.num_graphs == 12  # served by a warmed-up graph
    small = DecodeGraphs(model, _cache(config, 9), max_batch=3, max_context=16, scratch_page=8, num_heads=2,
                         prompt_tokens=64, capture=False)  # fmt: skip
    small.warm_up()  # buckets 1, 2 and the largest batch, 3; prompts up to the 16-token context
    assert {k for k in small._graphs if not k[3]} == {(1, 1, 16, False), (2, 1, 16, False), (3, 1, 16, False)}
    assert max(k[1] for k in small._graphs) == 16


def test_steps_that_are_not_plain_decodes_are_not_eligible(tiny) -> None:
    model, config = tiny
    graphs = DecodeGraphs(model, _cache(config, 4), max_batch=2, max_context=16, scratch_page=3, num_heads=2,
                          capture=False)  # fmt: skip
    assert not graphs.eligible(build_batch([_chunk([1, 2], 0, [0])], "cpu"))  # a prefill chunk
    assert not graphs.eligible(build_batch([_chunk([1], 0, [0])] * 3, "cpu"))  # more sequences than the largest
    assert not graphs.eligible(build_batch([_chunk([1], 20, [0, 1, 2, 0, 1, 2])], "cpu"))  # past max_context
    with pytest.raises(ValueError, match="uniform decode"):
        graphs.forward(build_batch([_chunk([1, 2], 0, [0])], "cpu"))
    with pytest.raises(ValueError, match="scratch page 4"):
        DecodeGraphs(model, _cache(config, 4), 2, 16, scratch_page=4, num_heads=2, capture=False)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, _cache(config, 4), 2, 16, scratch_page=3, num_heads=2, capture=True)


def test_engine_decoding_through_the_graph_buffers_gives_the_plain_engines_tokens(loaded) -> None:  # noqa: F811
    tok = loaded[2].tokenizer
    lengths = [3, 12, 5, 9, 1, 7]  # the batch shrinks step by step through the buckets 8, 4, 2, 1
    reqs = [
        GenerationRequest(f"r{i}", "m", tok.encode(p).ids, greedy(n))
        for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=False))
    ]
    plain = run(make_engine(loaded, decode_graphs="off"), reqs)
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, decode_graphs="static")
    assert engine.cache.num_pages == engine.scheduler.num_pages + 1  # the scratch page is the scheduler's to never use
    late = GenerationRequest("late", "m", tok.encode(PROMPTS[6]).ids, greedy(6))  # joins mid-way: a mixed step
    for req in reqs:
        engine.add_request(req)
    events: dict[str, list[dict]] = {}
    for step in range(500):
        if step == 4:
            engine.add_request(late)
        if not engine.has_work():
            break
        for request_id, event in engine.step():
            events.setdefault(request_id, []).append(event)
    for req in reqs:
        assert tokens_of(events[req.id]) == tokens_of(plain[req.id]), req.id
    alone = run(make_engine(loaded, decode_graphs="off"), [late])
    assert tokens_of(events["late"]) == tokens_of(alone["late"])
    stats = engine.stats()
    assert stats["decode_graphs"] >= 3 and stats["decode_graph_steps"] >= 10
    labels = {"model": "smollm2"}
    assert registry.get_sample_value("trellis_decode_graph_steps_total", labels) == stats["decode_graph_steps"]
    assert registry.get_sample_value("trellis_decode_graphs", labels) == stats["decode_graphs"]
    assert engine.scheduler.num_free_pages == engine.scheduler.num_pages


def test_speculative_verification_through_the_graph_buffers_keeps_greedy_output(loaded) -> None:  # noqa: F811
    tok = loaded[2].tokenizer
    texts = ["one two three four one two three four one two", "a b c d e f a b c d e f a b", PROMPTS[3]]
    spec = {"method": "ngram", "num_tokens": 4}
    reqs = [GenerationRequest(f"s{i}", "m", tok.encode(t).ids, greedy(10 + 3 * i)) for i, t in enumerate(texts)]
    spec_reqs = [
        GenerationRequest(r.id, "m", r.prompt_ids, greedy(r.params.max_tokens, speculative=spec)) for r in reqs
    ]
    plain = run(make_engine(loaded, decode_graphs="off"), reqs)
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, decode_graphs="static")
    graphed = run(engine, spec_reqs)
    for req in reqs:
        assert tokens_of(graphed[req.id]) == tokens_of(plain[req.id]), req.id
    verify_shapes = [key for key in engine.decode_graphs._graphs if key[1] > 1 and not key[3]]
    assert verify_shapes, "no verification step went through the graph buffers"
    accepted = registry.get_sample_value(
        "trellis_spec_decode_num_accepted_tokens_total", {"model": "smollm2", "method": "ngram"}
    )
    assert accepted and accepted > 0


def test_engine_running_prompt_steps_through_the_graph_buffers_gives_the_plain_engines_tokens(loaded) -> None:  # noqa: F811
    tok = loaded[2].tokenizer
    lengths = [3, 12, 5, 9, 6, 7]
    reqs = [
        GenerationRequest(f"r{i}", "m", tok.encode(p).ids, greedy(n))
        for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=False))
    ]
    # the second late prompt repeats an earlier one: its chunk starts past the pages the prefix cache hands back
    late = [GenerationRequest(f"late{i}", "m", tok.encode(PROMPTS[p]).ids, greedy(5)) for i, p in enumerate((6, 4))]
    plain = run(make_engine(loaded, decode_graphs="off"), [*reqs, *late])
    registry = CollectorRegistry()
    # at most 128 tokens: the first step's six prompts (the longest 24 tokens: 8 x 32) run eagerly; the late ones,
    # each joining the running batch (a mixed step: 6 or 7 sequences in a bucket of 8, x 16 or 8 tokens), through
    # the prompt buffers
    engine = make_engine(loaded, registry, decode_graphs="static", prompt_graph_tokens=128)
    events: dict[str, list[dict]] = {}
    for req in reqs:
        engine.add_request(req)
    for step in range(500):
        if step in (2, 5):
            engine.add_request(late[step // 5])
        if not engine.has_work():
            break
        for request_id, event in engine.step():
            events.setdefault(request_id, []).append(event)
    for req in [*reqs, *late]:
        assert tokens_of(events[req.id]) == tokens_of(plain[req.id]), req.id
    graphs = engine.decode_graphs
    assert graphs is not None and graphs.prompt_replays == 2
    assert not any(key[3] for key in graphs._graphs if key[1] > 16)  # the first step's 32-token bucket ran eagerly
    labels = {"model": "smollm2"}
    assert registry.get_sample_value("trellis_decode_graph_steps_total", labels) == graphs.replays
    assert engine.scheduler.num_free_pages == engine.scheduler.num_pages


def test_unknown_decode_graphs_mode_is_refused(loaded) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="decode_graphs"):
        make_engine(loaded, decode_graphs="sometimes")
    engine = make_engine(loaded)
    assert engine.decode_graphs is None and engine.warm_up_graphs() == 0  # "auto" on the CPU: nothing to capture


def test_settings_switch_graphs_off(default_model_dir: Path) -> None:
    from shared.settings import Settings

    engine = Engine.from_settings(
        default_model_dir, Settings(device="cpu", kv_cache_tokens=256, max_model_len=256, cuda_graphs=False)
    )
    assert engine.cfg.decode_graphs == "off" and engine.decode_graphs is None
