"""The scheduler's bookkeeping, in plain Python: page accounting, token budget, FIFO, chunking, preemption, and
prefix reuse under random load."""

from __future__ import annotations

import itertools
import random

import pytest

from inference_worker.prefix_cache import page_hash
from inference_worker.scheduler import CapacityError, Scheduler, SeqStatus, Sequence, StepPlan

_distinct = itertools.count(1)


def make_seq(seq_id: str, prompt_len: int, max_tokens: int = 4, first_token: int | None = None) -> Sequence:
    """A sequence whose prompt shares no prefix with any other made here, unless first_token says so."""
    if first_token is None:
        first_token = next(_distinct) * 1000
    return Sequence(seq_id, list(range(first_token, first_token + prompt_len)), max_tokens)


class CacheModel:
    """Stands in for the KV cache: each slot remembers the tokens its K/V were computed from (the token at that
    position and every one before it), so a sequence reading a shared page sees whether it holds *its* prefix."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.slots: dict[int, tuple[int, ...]] = {}

    def run(self, plan: StepPlan) -> None:
        ps = self.sched.page_size
        for item in plan.scheduled:
            seq = item.seq
            # everything before this chunk must already be in the cache, at the slots the block table names
            for pos in range(item.positions[0]):
                slot = item.block_table[pos // ps] * ps + pos % ps
                assert self.slots.get(slot) == tuple(seq.tokens(0, pos + 1)), (seq.seq_id, pos)
            for pos, slot in zip(item.positions, item.slot_mapping, strict=True):
                page = slot // ps
                assert page in item.block_table
                assert self.sched.pool.refcount(page) == 1, f"{seq.seq_id} writes into shared page {page}"
                self.slots[slot] = tuple(seq.tokens(0, pos + 1))


def chained_hash(tokens: tuple[int, ...], page_size: int) -> bytes:
    h = None
    for i in range(0, len(tokens), page_size):
        h = page_hash(h, tokens[i : i + page_size])
    return h


def check_accounting(sched: Scheduler, cache: CacheModel | None = None) -> None:
    pool, ps = sched.pool, sched.page_size
    holders = [0] * sched.num_pages
    for seq in list(sched.running) + list(sched.waiting):
        assert len(seq.pages) == len(set(seq.pages)), f"{seq.seq_id} holds a page twice"
        for page in seq.pages:
            holders[page] += 1
        if seq.status is SeqStatus.WAITING:
            assert seq.pages == [] and seq.num_computed == 0
        else:
            assert len(seq.pages) == -(-seq.num_computed // ps)
    for page in range(sched.num_pages):
        assert pool.refcount(page) == holders[page], (
            f"page {page}: refcount {pool.refcount(page)}, {holders[page]} holders"
        )
    assert pool.num_free == holders.count(0), "a page leaked (or is counted free while held)"
    assert len(sched.running) <= sched.max_batch_size
    if cache is not None:  # a page found by its hash really holds that prefix
        for page in range(sched.num_pages):
            name = pool.hash_of(page)
            if name is not None:
                content = cache.slots.get(page * ps + ps - 1)
                assert content is not None and chained_hash(content, ps) == name, f"page {page} holds another prefix"


def advance(sched: Scheduler, plan: StepPlan, rng: random.Random | None = None) -> list[Sequence]:
    """Play the engine: append a sampled token where the plan samples; finish sequences that reached max_tokens."""
    done = []
    for item in plan.scheduled:
        if item.samples:
            item.seq.output_ids.append(rng.randrange(3) if rng else 7)
            if len(item.seq.output_ids) >= item.seq.max_tokens:
                sched.finish(item.seq)
                done.append(item.seq)
    return done


def test_random_admit_step_finish_abort_with_shared_prefixes_keeps_pages_exact_and_loses_nothing() -> None:
    rng = random.Random(1234)
    sched = Scheduler(num_pages=12, page_size=4, max_batch_size=4, max_batch_tokens=10)
    cache = CacheModel(sched)
    system_prompts = [[], [1, 2, 3, 4, 5], list(range(20, 29)), list(range(40, 53))]
    added: dict[str, Sequence] = {}
    finished: set[str] = set()
    aborted: set[str] = set()
    next_id = 0
    hits = queries = 0
    for _step in range(1500):
        for _ in range(rng.choice([0, 0, 1, 2])):
            done = [added[s] for s in finished]
            if done and rng.random() < 0.3:  # a next chat turn: an earlier prompt + answer, then more
                earlier = rng.choice(done)
                prompt = earlier.prompt_ids + earlier.output_ids + [rng.randrange(3) for _ in range(rng.randint(1, 4))]
            else:
                prompt = rng.choice(system_prompts) + [rng.randrange(3) for _ in range(rng.randint(1, 8))]
            seq = Sequence(f"s{next_id}", prompt, rng.randint(1, 12))
            next_id += 1
            if seq.max_total_tokens > sched.capacity_tokens:
                with pytest.raises(CapacityError):
                    sched.add(seq)
                continue
            sched.add(seq)
            added[seq.seq_id] = seq
        if rng.random() < 0.05 and sched.num_live:
            victim = rng.choice(list(sched.running) + list(sched.waiting))
            sched.finish(victim)
            aborted.add(victim.seq_id)
        plan = sched.schedule()
        assert plan.num_tokens <= sched.max_batch_tokens
        assert len(plan.scheduled) <= sched.max_batch_size
        assert len({id(i.seq) for i in plan.scheduled}) == len(plan.scheduled), "a sequence scheduled twice"
        assert all(i.seq.status is SeqStatus.RUNNING for i in plan.scheduled)
        if sched.has_work():
            assert not plan.is_empty, "live sequences but nothing scheduled: stalled"
        hits, queries = hits + plan.prefix_hit_tokens, queries + plan.prefix_query_tokens
        cache.run(plan)
        for seq in advance(sched, plan, rng):
            assert seq.seq_id not in finished
            finished.add(seq.seq_id)
        check_accounting(sched, cache)
    while sched.has_work():  # drain: everything still live finishes
        plan = sched.schedule()
        assert not plan.is_empty
        cache.run(plan)
        finished.update(s.seq_id for s in advance(sched, plan, rng))
        check_accounting(sched, cache)
    assert sched.num_preemptions > 0, "the stress test should exercise preemption"
    assert sched.pool.num_evictions > 0, "the stress test should evict cached pages"
    assert 0 < hits < queries, "the stress test should reuse some prefixes"
    assert finished | aborted == set(added)
    assert not finished & aborted
    for seq_id in finished:
        assert len(added[seq_id].output_ids) == added[seq_id].max_tokens, "a token was lost or duplicated"
    assert sched.num_free_pages == sched.num_pages
    assert all(sched.pool.refcount(p) == 0 for p in range(sched.num_pages))


def test_decodes_go_first_and_prefills_are_chunked_into_the_remaining_budget() -> None:
    sched = Scheduler(num_pages=64, page_size=4, max_batch_size=4, max_batch_tokens=8)
    short = make_seq("short", 3, max_tokens=10)
    sched.add(short)
    plan = sched.schedule()
    assert [(i.seq.seq_id, i.query_len, i.samples) for i in plan.scheduled] == [("short", 3, True)]
    advance(sched, plan)

    long = make_seq("long", 20, max_tokens=2, first_token=500)
    sched.add(long)
    chunk_lens = []
    while not long.output_ids:
        plan = sched.schedule()
        assert plan.scheduled[0].seq is short and plan.scheduled[0].query_len == 1  # the decode never waits
        item = plan.scheduled[1]
        assert item.seq is long and item.samples == (item.positions[-1] == 19)
        assert item.token_ids == long.prompt_ids[item.positions[0] : item.positions[-1] + 1]
        chunk_lens.append(item.query_len)
        advance(sched, plan)
    assert chunk_lens == [7, 7, 6]


def test_waiting_requests_are_admitted_in_arrival_order_without_overtaking() -> None:
    # 4 pages of 4 tokens: "big" needs 3 pages for its first chunk, so it must wait and block "small" behind it
    sched = Scheduler(num_pages=4, page_size=4, max_batch_size=4, max_batch_tokens=16)
    first = make_seq("first", 6, max_tokens=2)
    sched.add(first)
    advance(sched, sched.schedule())
    big, small = make_seq("big", 12, max_tokens=2), make_seq("small", 2, max_tokens=2)
    sched.add(big)
    sched.add(small)
    plan = sched.schedule()
    assert [i.seq.seq_id for i in plan.scheduled] == ["first"]
    assert list(sched.waiting) == [big, small]
    advance(sched, plan)  # "first" reaches max_tokens and frees its pages
    plan = sched.schedule()
    assert [i.seq.seq_id for i in plan.scheduled] == ["big", "small"]


def test_batch_size_limits_admission() -> None:
    sched = Scheduler(num_pages=64, page_size=4, max_batch_size=2, max_batch_tokens=64)
    seqs = [make_seq(f"s{i}", 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [i.seq for i in plan.scheduled] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_preemption_evicts_the_newest_and_recomputes_it_from_prompt_plus_output() -> None:
    sched = Scheduler(num_pages=5, page_size=2, max_batch_size=4, max_batch_tokens=16, prefix_caching=False)
    cache = CacheModel(sched)
    old, new = make_seq("old", 4, max_tokens=5), make_seq("new", 4, max_tokens=5, first_token=50)
    sched.add(old)
    sched.add(new)
    plan = sched.schedule()  # both prefilled: 2 pages each, one page left
    cache.run(plan)
    advance(sched, plan)
    assert sched.num_free_pages == 1
    plan = sched.schedule()  # both now feed position 4 and need a 3rd page: "new", admitted last, is preempted
    assert [s.seq_id for s in plan.preempted] == ["new"]
    assert [i.seq.seq_id for i in plan.scheduled] == ["old"]
    assert new.status is SeqStatus.WAITING and new.pages == [] and new.output_ids == [7]
    assert list(sched.waiting) == [new]
    cache.run(plan)
    advance(sched, plan)
    # once "old" finishes, "new" comes back and prefills prompt + its generated token in one chunk
    while old.status is not SeqStatus.FINISHED:
        plan = sched.schedule()
        cache.run(plan)
        advance(sched, plan)
    plan = sched.schedule()
    item = plan.scheduled[0]
    assert item.seq is new and item.samples
    assert item.positions == [0, 1, 2, 3, 4] and item.token_ids == [50, 51, 52, 53, 7]
    cache.run(plan)
    assert new.num_preemptions == 1 and sched.num_preemptions == 1


def test_a_request_that_can_never_fit_is_rejected_with_the_reason() -> None:
    sched = Scheduler(num_pages=4, page_size=4, max_batch_size=2, max_batch_tokens=8)
    with pytest.raises(CapacityError, match="prompt \\+ max_tokens = 17 tokens cannot fit in the KV cache of 16"):
        sched.add(make_seq("huge", 10, max_tokens=7))
    sched.add(make_seq("exact", 10, max_tokens=6))
    assert sched.num_live == 1


def test_finish_releases_pages_at_once_and_rejects_unknown_sequences() -> None:
    sched = Scheduler(num_pages=8, page_size=4, max_batch_size=2, max_batch_tokens=16)
    seq = make_seq("a", 10)
    sched.add(seq)
    sched.schedule()
    assert sched.num_free_pages == 5
    sched.finish(seq)
    assert sched.num_free_pages == sched.num_pages == 8 and not sched.has_work()
    with pytest.raises(ValueError, match="not scheduled"):
        sched.finish(seq)


def test_invalid_limits_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens \\(2\\) must be >= max_batch_size \\(4\\)"):
        Scheduler(num_pages=8, page_size=4, max_batch_size=4, max_batch_tokens=2)
    with pytest.raises(ValueError, match="at least one page"):
        Scheduler(num_pages=0, page_size=4, max_batch_size=1, max_batch_tokens=2)
