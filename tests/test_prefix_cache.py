"""Prefix reuse: the page pool's refcounts and LRU, the scheduler's use of it, and the engine on the real model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from inference_worker.engine import Engine, EngineConfig
from inference_worker.loader import load_model
from inference_worker.metrics import WorkerMetrics
from inference_worker.prefix_cache import PagePool, page_hash
from inference_worker.scheduler import Scheduler, Sequence, StepPlan
from shared.tokenizer import ModelTokenizer
from shared.wire import GenerationRequest, SamplingParams


# -- the pool ---------------------------------------------------------------------------------------------------------
def test_page_names_chain_over_the_whole_prefix() -> None:
    first = page_hash(None, [1, 2, 3, 4])
    assert page_hash(None, [1, 2, 3, 4]) == first
    assert page_hash(first, [5, 6, 7, 8]) != page_hash(page_hash(None, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert page_hash(None, [1, 2, 3, 5]) != first
    assert page_hash(None, [2**40, 1]) != page_hash(None, [0, 1])  # ids are not truncated


def test_pool_refuses_double_free_over_allocation_and_sharing_an_empty_page() -> None:
    pool = PagePool(3)
    pages = pool.allocate(2)
    assert pool.num_free == 1 and pool.num_in_use == 2
    with pytest.raises(RuntimeError, match="only 1 are free"):
        pool.allocate(2)
    pool.release(pages)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.release(pages[:1])
    with pytest.raises(RuntimeError, match="empty"):
        pool.share(pages[0])
    with pytest.raises(ValueError, match="at least one page"):
        PagePool(0)
    assert pool.num_free == 3


def test_released_full_pages_stay_findable_until_evicted_least_recently_released_first() -> None:
    pool = PagePool(4)
    a, b, c, d = pool.allocate(4)
    names = [page_hash(None, [i]) for i in range(3)]
    for page, name in zip((a, b, c), names, strict=True):
        pool.register(page, name)
    pool.release([c, b, a])  # a sequence releases its tail first
    pool.release([d])  # never registered: plain empty
    assert pool.num_free == 4 and pool.num_cached == 3
    assert pool.lookup(names) == [a, b, c]

    # allocation takes the empty page first, then evicts c (released first), then b
    assert pool.allocate(1) == [d] and pool.lookup(names) == [a, b, c]
    assert pool.allocate(2) == [c, b] and pool.num_evictions == 2
    assert pool.lookup(names) == [a]  # the chain stops at the first page that is gone
    pool.share(a)  # a reader keeps it from eviction
    assert pool.refcount(a) == 1 and pool.num_free == 0


def test_a_shared_page_is_freed_only_by_its_last_holder() -> None:
    pool = PagePool(2)
    (page,) = pool.allocate(1)
    pool.register(page, b"x")
    pool.share(page)
    pool.share(page)
    assert pool.refcount(page) == 3
    pool.release([page])
    pool.release([page])
    assert pool.num_free == 1 and pool.lookup([b"x"]) == [page]
    pool.release([page])
    assert pool.num_free == 2 and pool.num_cached == 1


def test_the_first_page_holding_a_prefix_stays_the_one_found() -> None:
    pool = PagePool(3)
    first, second = pool.allocate(2)
    pool.register(first, b"same")
    pool.register(second, b"same")  # computed at the same time by another sequence
    assert pool.lookup([b"same"]) == [first] and pool.hash_of(second) is None
    pool.release([second])
    assert pool.num_cached == 0  # the duplicate was private: it goes back empty


def test_without_caching_and_after_clearing_nothing_is_found() -> None:
    plain = PagePool(2, caching=False)
    (page,) = plain.allocate(1)
    plain.register(page, b"k")
    plain.release([page])
    assert plain.lookup([b"k"]) == [] and plain.num_cached == 0

    pool = PagePool(2)
    pages = pool.allocate(2)
    pool.register(pages[0], b"k0")
    pool.register(pages[1], b"k1")
    pool.release([pages[1]])
    pool.clear_index()
    assert pool.lookup([b"k0"]) == [] and pool.num_cached == 0 and pool.num_free == 1
    pool.release([pages[0]])
    assert pool.num_free == 2


# -- the scheduler ----------------------------------------------------------------------------------------------------
def run_to_end(sched: Scheduler, token: int = 7) -> list[StepPlan]:
    """Step until idle, appending ``token`` wherever a plan samples; the plans."""
    plans = []
    while sched.has_work():
        plan = sched.schedule()
        assert not plan.is_empty, "stalled"
        plans.append(plan)
        for item in plan.scheduled:
            if item.samples:
                item.seq.output_ids.append(token)
                if len(item.seq.output_ids) >= item.seq.max_tokens:
                    sched.finish(item.seq)
    return plans


def test_a_prompt_sharing_full_pages_reuses_them_and_computes_only_the_rest() -> None:
    sched = Scheduler(num_pages=16, page_size=4, max_batch_size=4, max_batch_tokens=64)
    system = list(range(100, 110))  # 2 full pages + 2 tokens
    first = Sequence("first", system + [1, 2, 3], max_tokens=2)
    sched.add(first)
    run_to_end(sched)
    first_pages = sched.pool.lookup(first.page_hashes[:2])
    assert len(first_pages) == 2

    second = Sequence("second", system + [4, 5], max_tokens=2)
    sched.add(second)
    plan = sched.schedule()
    (item,) = plan.scheduled
    assert item.block_table[:2] == first_pages  # the very same pages, not copies
    assert item.positions == list(range(8, 12)) and item.token_ids == system[8:] + [4, 5]
    assert (plan.prefix_query_tokens, plan.prefix_hit_tokens) == (12, 8)
    assert second.num_cached_tokens == 8
    assert [sched.pool.refcount(p) for p in first_pages] == [1, 1]


def test_a_prompt_entirely_in_the_cache_still_computes_its_last_page() -> None:
    sched = Scheduler(num_pages=8, page_size=4, max_batch_size=2, max_batch_tokens=32)
    prompt = list(range(50, 58))  # exactly two pages
    first = Sequence("a", prompt + [1], max_tokens=1)
    sched.add(first)
    run_to_end(sched)
    cached = sched.pool.lookup(first.page_hashes[:2])
    assert len(cached) == 2
    sched.add(Sequence("b", prompt, max_tokens=1))
    plan = sched.schedule()
    (item,) = plan.scheduled
    # the last token's logits are needed and a shared page is never written: page 2 is recomputed in a page of b's
    assert item.positions == [4, 5, 6, 7] and item.samples
    assert plan.prefix_hit_tokens == 4
    assert item.block_table[0] == cached[0] and item.block_table[1] != cached[1]
    assert sched.pool.refcount(item.block_table[1]) == 1


def test_pages_are_found_only_after_the_forward_that_writes_them() -> None:
    sched = Scheduler(num_pages=16, page_size=4, max_batch_size=4, max_batch_tokens=64)
    prompt = list(range(10, 22))
    a, b = Sequence("a", prompt + [1], max_tokens=3), Sequence("b", prompt + [2], max_tokens=3)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()  # admitted together: a's pages are being written in this very step
    assert plan.prefix_hit_tokens == 0 and [i.positions[0] for i in plan.scheduled] == [0, 0]
    for item in plan.scheduled:
        item.seq.output_ids.append(7)
    c = Sequence("c", prompt + [3], max_tokens=1)
    sched.add(c)
    plan = sched.schedule()  # the previous forward is done: now they are found
    assert plan.prefix_hit_tokens == 12 and plan.scheduled[-1].seq is c and plan.scheduled[-1].positions == [12]


def test_a_preempted_sequence_finds_its_own_pages_again() -> None:
    sched = Scheduler(num_pages=6, page_size=2, max_batch_size=2, max_batch_tokens=16)
    old = Sequence("old", list(range(10, 14)), max_tokens=3)
    new = Sequence("new", list(range(20, 26)), max_tokens=3)
    sched.add(old)
    sched.add(new)
    plan = sched.schedule()  # 2 + 3 pages
    for item in plan.scheduled:
        item.seq.output_ids.append(7)
    plan = sched.schedule()  # both need one more page, only one is free: "new" makes room for "old"
    assert plan.preempted == [new] and sched.pool.num_cached == 3  # its three full pages stay cached
    for item in plan.scheduled:
        item.seq.output_ids.append(7)
    plan = sched.schedule()
    assert [i.seq for i in plan.scheduled] == [old] and plan.preempted == []
    assert plan.prefix_hit_tokens == 0 and new in sched.waiting  # not admitted while a page is short
    old.output_ids.append(7)
    sched.finish(old)
    run_to_end(sched)
    assert new.output_ids == [7, 7, 7] and new.num_cached_tokens == 6  # came back on its cached prompt pages


# -- the engine on the real model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(default_model_dir: Path):
    model, config = load_model(default_model_dir, "cpu", torch.float32)
    return model, config, ModelTokenizer.from_dir(default_model_dir)


def make_engine(loaded, registry: CollectorRegistry | None = None, **overrides) -> Engine:
    model, config, tokenizer = loaded
    cfg = dict(device="cpu", max_batch_size=4, max_batch_tokens=512, kv_page_size=16, kv_cache_tokens=2048)
    metrics = WorkerMetrics(registry or CollectorRegistry(), "smollm2")
    return Engine(model, config, tokenizer, EngineConfig(**{**cfg, **overrides}), metrics)


def generate(engine: Engine, request_id: str, prompt: list[int], max_tokens: int = 6) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(GenerationRequest(request_id, "m", prompt, params))
    tokens = []
    while engine.has_work():
        for rid, event in engine.step():
            if rid == request_id and event["type"] == "delta":
                tokens += event["token_ids"]
    return tokens


SYSTEM = (
    "You are a careful assistant for a lighthouse keeper on a remote island. Answer briefly, mention the weather "
    "when it matters, and never invent facts about ships, tides or the supply boat schedule that you do not know."
)


@pytest.mark.parametrize("kv_bits", [(None, None), (4, 4)])
def test_a_second_request_sharing_a_long_prefix_reuses_its_pages_and_answers_the_same(loaded, kv_bits) -> None:
    tok = loaded[2]
    first = tok.encode(SYSTEM + " Question: when does the supply boat come?")
    second = tok.encode(SYSTEM + " Question: is a storm coming tonight?")
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert common >= 40

    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, kv_bits=kv_bits)
    generate(engine, "first", first)
    before = engine.scheduler.num_scheduled_tokens
    answer = generate(engine, "second", second)
    reused = common // 16 * 16
    labels = {"model": "smollm2"}
    assert registry.get_sample_value("trellis_prefix_cache_hits_total", labels) == reused
    assert registry.get_sample_value("trellis_prefix_cache_queries_total", labels) == len(first) + len(second)
    # the reused tokens were not computed again: only the rest of the prompt, then one token per decode step
    assert engine.scheduler.num_scheduled_tokens - before == len(second) - reused + 5
    assert answer == generate(make_engine(loaded, prefix_caching=False, kv_bits=kv_bits), "alone", second)


def test_the_next_chat_turn_reuses_the_whole_earlier_turn(loaded) -> None:
    tok = loaded[2]
    turn1 = tok.chat_prompt_ids([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}])
    engine = make_engine(loaded)
    answer = generate(engine, "t1", turn1, max_tokens=20)
    turn2 = turn1 + answer + tok.encode("\nAnd the tide?")
    before = engine.scheduler.num_scheduled_tokens
    again = generate(engine, "t2", turn2)
    computed_by_turn1 = len(turn1) + len(answer) - 1  # the last answer token was never fed back
    assert engine.scheduler.running == [] and engine.scheduler.num_free_pages == engine.scheduler.num_pages
    assert engine.scheduler.num_scheduled_tokens - before == len(turn2) - computed_by_turn1 // 16 * 16 + 5
    assert again == generate(make_engine(loaded, prefix_caching=False), "alone", turn2)
