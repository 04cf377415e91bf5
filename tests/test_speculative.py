"""Speculative decoding inside continuous batching: guesses verified in the batched step change nothing a client
sees (greedy tokens, stops, logprobs), keep the sampling distribution, and leave no trace of rejected guesses."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from prometheus_client import CollectorRegistry

from inference_worker.engine import Engine, EngineConfig
from inference_worker.loader import load_model
from inference_worker.metrics import WorkerMetrics
from inference_worker.scheduler import Scheduler, Sequence
from inference_worker.speculative import (
    AcceptancePrior,
    AdaptiveDraftLength,
    DraftRequest,
    NgramProposer,
    Proposer,
    SpeculationPlanner,
    expected_tokens,
)
from shared.tokenizer import ModelTokenizer
from shared.wire import GenerationRequest, SamplingParams
from tests.test_engine import finishes, greedy, loaded, make_engine, run, text_of, tokens_of  # noqa: F401
from tests.tiny_models import write_tiny_llama

COPY_PROMPT = (
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon.\n"
    "List: apple,"
)


class ScriptedProposer(Proposer):
    """A stand-in draft: guesses ``guess(seq_id, token_ids, k)``; the thing under test is the verification."""

    method = "draft"

    def __init__(self, guess: Callable[[str, list[int], int], list[int]]) -> None:
        self.guess = guess

    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        return [self.guess(r.seq_id, list(r.token_ids), r.num_tokens) for r in requests]


def spec_counter(registry: CollectorRegistry, name: str, method: str) -> float:
    value = registry.get_sample_value(f"trellis_spec_decode_{name}_total", {"model": "smollm2", "method": method})
    return value or 0.0


def spec_engine(
    loaded,  # noqa: F811 - the fixture's value
    registry: CollectorRegistry | None = None,
    proposer: Proposer | None = None,
    **overrides,
) -> Engine:
    """tests/test_engine.make_engine, with a scripted draft proposer when given."""
    engine = make_engine(loaded, registry, **overrides)
    if proposer is not None:
        engine.proposers["draft"] = proposer
    return engine


def copy_of(reqs: list[GenerationRequest]) -> list[GenerationRequest]:
    return [GenerationRequest(r.id, r.model, list(r.prompt_ids), r.params) for r in reqs]


# -- the proposer and the draft-length controller, alone ------------------------------------------------------------
def test_ngram_proposer_continues_the_longest_latest_match() -> None:
    ngram = NgramProposer(max_ngram=3)
    # suffix [7, 8, 9] occurs at 0 (followed by 1, 2) and at 5 (followed by 3, 4): the latest wins
    assert ngram.lookup([7, 8, 9, 1, 2, 7, 8, 9, 3, 4, 5, 7, 8, 9], 2) == [3, 4]
    # a 3-gram match beats a later 1-gram match
    assert ngram.lookup([1, 2, 3, 50, 9, 3, 60, 1, 2, 3], 3) == [50, 9, 3]
    assert ngram.lookup([5, 6, 5], 4) == [6, 5]  # only what exists after the match
    assert ngram.lookup([1, 2, 3, 4], 3) == [] and ngram.lookup([1], 3) == [] and ngram.lookup([1, 1], 0) == []


def test_adaptive_draft_length_grows_shrinks_and_pauses_when_guesses_do_not_pay() -> None:
    length = AdaptiveDraftLength(max_tokens=4)
    length.update(4, 0)
    length.update(4, 0)
    assert length.next_length() < 4
    for _ in range(3):
        length.update(length.num_tokens, 0)
    assert [length.next_length() for _ in range(AdaptiveDraftLength.COOLDOWN_STEPS)] == [0] * 16
    assert length.next_length() == 1  # probing again with one token
    for _ in range(6):
        length.update(length.num_tokens, length.num_tokens)
    assert length.next_length() == 4


def test_scheduler_feeds_guesses_only_into_free_pages_and_gives_back_the_rejected_ones() -> None:
    scheduler = Scheduler(num_pages=3, page_size=4, max_batch_size=2, max_batch_tokens=64)
    seq = Sequence("s", [1, 2, 3], max_tokens=9)
    scheduler.add(seq)
    scheduler.schedule()
    seq.output_ids.append(4)  # sampled after the prefill: 4 known tokens, 3 computed
    item = scheduler.schedule({"s": [5, 6, 7, 8, 9, 10, 11, 12, 13]}).scheduled[0]
    assert item.token_ids == [4, 5, 6, 7, 8, 9, 10, 11, 12] and item.draft_ids == [5, 6, 7, 8, 9, 10, 11, 12]
    assert item.positions == list(range(3, 12)) and len(seq.pages) == 3 and scheduler.num_free_pages == 0
    assert seq.num_computed == 4  # guesses count only once kept
    scheduler.accept_draft_token(seq)
    seq.output_ids += [5, 99]  # guess 5 kept, 6 rejected and replaced
    scheduler.discard_draft_pages(seq)
    assert seq.num_computed == 5 and len(seq.pages) == 2 and scheduler.num_free_pages == 1
    item = scheduler.schedule().scheduled[0]
    assert item.token_ids == [99] and item.positions == [5]  # the rejected guess's slot is simply overwritten


# -- greedy: identical output --------------------------------------------------------------------------------------
def test_greedy_with_ngram_speculation_equals_greedy_without_it(loaded) -> None:  # noqa: F811
    tok = loaded[2].tokenizer
    copy_ids = tok.encode(COPY_PROMPT).ids
    free = tokens_of(run(make_engine(loaded), [GenerationRequest("free", "m", copy_ids, greedy(32))])["free"])
    stop_token = next(t for i, t in enumerate(free) if i >= 12 and t not in free[:i])
    stop_text = tok.decode(free[16:18])
    reqs = [
        GenerationRequest("copy", "m", copy_ids, greedy(32)),
        GenerationRequest("stop-id", "m", copy_ids, greedy(32, stop_token_ids=[stop_token])),
        GenerationRequest("stop-str", "m", copy_ids, greedy(32, stop=[stop_text])),
        GenerationRequest("penalty", "m", copy_ids, greedy(19, repetition_penalty=1.2, logprobs=True, top_logprobs=2)),
        GenerationRequest("short", "m", tok.encode("The capital of France is").ids, greedy(3)),
        GenerationRequest("code", "m", tok.encode("def fibonacci(n):").ids, greedy(24, stop=["return"])),
        GenerationRequest("chat", "m", loaded[2].chat_prompt_ids([{"role": "user", "content": "Hi"}]),
                          SamplingParams(max_tokens=20, temperature=0.0)),
    ]  # fmt: skip
    plain = run(make_engine(loaded), reqs)
    registry = CollectorRegistry()
    engine = spec_engine(loaded, registry, speculative_method="ngram", speculative_tokens=5)
    spec = run(engine, copy_of(reqs))
    for req in reqs:
        assert tokens_of(spec[req.id]) == tokens_of(plain[req.id]), req.id
        assert text_of(spec[req.id]) == text_of(plain[req.id]), req.id
        assert finishes(spec[req.id]) == finishes(plain[req.id]), req.id
        assert spec[req.id][-1]["usage"] == plain[req.id][-1]["usage"], req.id
    assert finishes(plain["stop-id"])[0]["stop_reason"] == stop_token
    assert finishes(plain["stop-str"])[0]["stop_reason"] == stop_text
    for s, p in zip(_logprobs(spec["penalty"]), _logprobs(plain["penalty"]), strict=True):
        assert s["id"] == p["id"] and [t[1] for t in s["top"]] == [t[1] for t in p["top"]]
        assert s["logprob"] == pytest.approx(p["logprob"], abs=1e-3)
    assert spec_counter(registry, "num_accepted_tokens", "ngram") > 0  # guesses were really kept, not all rejected
    assert spec_counter(registry, "num_drafts", "ngram") > 0
    assert engine.scheduler.num_free_pages == engine.scheduler.num_pages


def _logprobs(events: list[dict]) -> list[dict]:
    return [lp for e in events if e["type"] == "delta" and e["logprobs"] for lp in e["logprobs"]]


# -- rollback ----------------------------------------------------------------------------------------------------
def test_rejected_guesses_leave_no_stale_cache_entries(loaded) -> None:  # noqa: F811
    """A draft that is right for 0..2 tokens, then wrong, so verifications end mid-chunk across page boundaries; the
    pages left behind (and published to the prefix cache) must hold only the real tokens."""
    tok = loaded[2].tokenizer
    prompt = tok.encode("Once upon a time, in a small village at the edge of a dark forest, there lived").ids
    expected = tokens_of(run(make_engine(loaded), [GenerationRequest("x", "m", prompt, greedy(30))])["x"])
    steps = Counter[str]()

    def right_then_wrong(seq_id: str, token_ids: list[int], k: int) -> list[int]:
        steps[seq_id] += 1
        done = len(token_ids) - len(prompt)
        right = expected[done : done + steps[seq_id] % 3]
        return (right + [(t + 1) % 1000 for t in expected[done + len(right) : done + k]])[:k]

    registry = CollectorRegistry()
    engine = spec_engine(loaded, registry, ScriptedProposer(right_then_wrong), kv_page_size=4)
    draft = {"method": "draft", "num_tokens": 4}
    spec = run(engine, [GenerationRequest("x", "m", prompt, greedy(30, speculative=draft))])
    assert tokens_of(spec["x"]) == expected
    proposed = spec_counter(registry, "num_draft_tokens", "draft")
    accepted = spec_counter(registry, "num_accepted_tokens", "draft")
    assert 0 < accepted < proposed - 10  # many rejections, some acceptances
    assert engine.scheduler.num_free_pages == engine.scheduler.num_pages
    # continuing from the cached pages (prefix hit) matches a fresh engine without speculation
    follow_up = prompt + expected[:21]
    hits_before = engine.metrics.prefix_cache_hits._value.get()
    again = run(engine, [GenerationRequest("y", "m", follow_up, greedy(12, speculative={"method": "off"}))])["y"]
    assert engine.metrics.prefix_cache_hits._value.get() - hits_before >= 16
    fresh = run(make_engine(loaded), [GenerationRequest("y", "m", follow_up, greedy(12))])["y"]
    assert tokens_of(again) == tokens_of(fresh) and tokens_of(fresh)[:9] == expected[21:]


# -- selection ---------------------------------------------------------------------------------------------------
def test_request_override_off_disables_it_and_a_bad_method_is_an_invalid_request(loaded) -> None:  # noqa: F811
    tok = loaded[2].tokenizer
    copy_ids = tok.encode(COPY_PROMPT).ids
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, speculative_method="ngram")
    events = run(engine, [GenerationRequest("off", "m", copy_ids, greedy(12, speculative={"method": "off"}))])
    assert len(tokens_of(events["off"])) == 12 and spec_counter(registry, "num_drafts", "ngram") == 0
    bad = {
        "bogus": {"method": "eagle"},
        "no-draft-model": {"method": "draft"},
        "too-long": {"method": "ngram", "num_tokens": 99},
        "typo": {"methd": "ngram"},
    }
    events = run(engine, [GenerationRequest(rid, "m", copy_ids, greedy(4, speculative=s)) for rid, s in bad.items()])
    for rid in bad:
        assert [e["type"] for e in events[rid]] == ["error"] and events[rid][0]["code"] == "invalid_request", rid
    assert "eagle" in events["bogus"][0]["message"]
    # a request that asks for it on a worker that defaults to off
    plain = make_engine(loaded, registry=CollectorRegistry())
    run(plain, [GenerationRequest("on", "m", copy_ids, greedy(12, speculative={"method": "ngram", "num_tokens": 3}))])
    assert plain.metrics._spec_drafts.labels(model="smollm2", method="ngram")._value.get() > 0
    with pytest.raises(ValueError, match="not one of"):
        make_engine(loaded, speculative_method="medusa")


def test_a_batch_larger_than_speculative_max_batch_does_not_speculate(loaded) -> None:  # noqa: F811
    repetitive = loaded[2].tokenizer.encode("one two one two one two one two").ids  # n-gram lookup always guesses
    drafts = []
    for max_batch in (1, 2):
        registry = CollectorRegistry()
        engine = make_engine(loaded, registry, speculative_method="ngram", speculative_max_batch=max_batch)
        run(engine, [GenerationRequest(f"b{i}", "m", repetitive, greedy(4)) for i in range(2)])
        drafts.append(spec_counter(registry, "num_drafts", "ngram"))
    assert drafts[0] == 0 and drafts[1] > 0


def test_guesses_are_cut_to_the_steps_token_budget(loaded) -> None:  # noqa: F811
    asked: list[tuple[int, int]] = []  # (sequences asking in the step, guesses asked for)

    def guess(seq_id: str, token_ids: list[int], k: int) -> list[int]:
        asked.append((seq_id, k))
        return [token_ids[-1]] * k

    prompt = loaded[2].tokenizer.encode("one two one two").ids
    engine = spec_engine(loaded, None, ScriptedProposer(guess), speculative_tokens=8, speculative_max_step_tokens=16)
    reqs = [GenerationRequest(f"s{i}", "m", prompt, greedy(12, speculative={"method": "draft", "num_tokens": 8}))
            for i in range(4)]  # fmt: skip
    run(engine, reqs)
    assert asked and max(k for _, k in asked) <= 16 // 4 - 1  # 4 sequences x (1 + 3 guesses) = 16 tokens
    asked.clear()
    run(spec_engine(loaded, None, ScriptedProposer(guess), speculative_tokens=8, speculative_max_step_tokens=16),
        [GenerationRequest("alone", "m", prompt, reqs[0].params)])  # fmt: skip
    assert max(k for _, k in asked) > 3  # alone, the budget leaves room for more


def test_expected_tokens_of_a_verification() -> None:
    assert expected_tokens(0.5, 0) == 1.0 and expected_tokens(1.0, 4) == 5.0 and expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)  # the target's token, then each run of hits
    assert expected_tokens(0.8, 4) == pytest.approx(sum(0.8**i for i in range(5)))


def test_the_draft_length_estimates_the_chance_of_each_guess() -> None:
    rng = random.Random(0)
    for alpha in (0.3, 0.8):
        dl = AdaptiveDraftLength(4)
        estimates = []
        for _ in range(400):
            k = max(1, dl.num_tokens)
            accepted = next((i for i in range(k) if rng.random() >= alpha), k)  # a run ends at its first miss
            dl.update(k, accepted)
            dl.paused_steps = 0  # keep verifying: the estimate is under test, not the pause
            estimates.append(dl.alpha)
        assert sum(estimates[100:]) / 300 == pytest.approx(alpha, abs=0.07)
    dl = AdaptiveDraftLength(4)
    for _ in range(20):
        dl.proposed(0)  # the proposer keeps having nothing: its guesses are worth little whatever alpha is
    assert dl.hit_rate < 0.01 and dl.expected_tokens(4) == pytest.approx(1.0, abs=0.05)
    assert dl.expected_tokens(4, guessed=True) == expected_tokens(dl.alpha, 4)  # guesses in hand: no doubt left


def test_new_sequences_start_from_their_methods_record() -> None:
    prior = AcceptancePrior()
    assert prior.alpha("draft") == 0.5  # nothing seen yet
    for _ in range(300):
        prior.update("draft", 4, 4)  # every guess kept
        prior.update("ngram", 4, 0)  # every first guess wrong
    assert prior.alpha("draft") > 0.95 and prior.alpha("ngram") < 0.05
    assert AdaptiveDraftLength(4, prior.alpha("draft")).alpha == prior.alpha("draft")


def explored(planner: SpeculationPlanner, bucket: int, seconds: Callable[[int], float], seqs, lengths) -> None:
    """Let ``planner`` try every shape at ``bucket`` once over, each step timed by ``seconds(q)``."""
    for _ in range(4 * (max(lengths) + 1)):
        cap = planner.choose(bucket, [s.expected_tokens for s in seqs], lengths, num_plain=0)
        planner.record(bucket, cap + 1, seconds(cap + 1))


def decisions(planner: SpeculationPlanner, bucket: int, seqs, lengths, steps: int) -> Counter:
    expected = [s.expected_tokens for s in seqs]
    return Counter(planner.choose(bucket, expected, lengths, num_plain=0) for _ in range(steps))


def sequences(alpha: float, n: int) -> list[AdaptiveDraftLength]:
    return [AdaptiveDraftLength(4, prior_alpha=alpha) for _ in range(n)]


def test_the_planner_guesses_most_where_verifying_is_nearly_free() -> None:
    planner = SpeculationPlanner()
    seqs = sequences(0.8, 2)
    explored(planner, 2, lambda q: 0.010 + 0.0005 * q, seqs, [4, 4])  # memory-bound: more rows cost little
    got = decisions(planner, 2, seqs, [4, 4], 2 * planner.PROBE_EVERY)
    assert got.most_common(1)[0][0] == 4 and got[4] >= 2 * planner.PROBE_EVERY - 2 * planner.PROBE_STEPS


def test_the_planner_switches_guessing_off_where_it_does_not_pay() -> None:
    planner = SpeculationPlanner()
    seqs = sequences(0.45, 8)
    explored(planner, 8, lambda q: 0.010 * q, seqs, [3] * 8)  # compute-bound: each guessed row costs a full token
    got = decisions(planner, 8, seqs, [3] * 8, 2 * planner.PROBE_EVERY)
    assert got[0] >= 2 * planner.PROBE_EVERY - 2 * planner.PROBE_STEPS  # off, but for the periodic probes
    # the same sequences at batch 1, where a step costs the same whatever it feeds: guess
    explored(planner, 1, lambda q: 0.010, seqs[:1], [3])
    assert decisions(planner, 1, seqs[:1], [3], 10).most_common(1)[0][0] == 3


def test_the_planner_picks_the_cap_between_the_extremes_when_that_is_best() -> None:
    planner = SpeculationPlanner()
    seqs = sequences(0.6, 4)
    # a step is cheap up to 2 guesses per sequence (the fused kernel's rows), then every row costs
    explored(planner, 4, lambda q: 0.010 if q <= 3 else 0.010 * (q - 1), seqs, [4] * 4)
    assert decisions(planner, 4, seqs, [4] * 4, 10).most_common(1)[0][0] == 2


def test_the_planner_prices_a_shape_at_the_least_time_of_it_or_any_larger_one() -> None:
    planner = SpeculationPlanner()
    assert planner.seconds(4, 3) == 0.0  # nothing timed at this batch size
    planner.record(4, 1, 0.010)
    planner.record(4, 5, 0.030)  # right after a plain step: a draft's catch-up, not timed
    assert planner.seconds(4, 5) == 0.010  # nothing at 5 or above: priced from below
    planner.record(4, 5, 0.030)
    assert planner.seconds(4, 3) == 0.030 and planner.seconds(4, 1) == 0.010
    planner.record(4, 2, 0.500)  # one slow outlier at q = 2 ...
    assert planner.seconds(4, 2) == 0.030  # ... does not make 2 dearer than 5
    planner.record(4, 5, 0.050)
    assert 0.030 < planner.seconds(4, 5) < 0.050  # a moving average


def test_with_a_draft_model_the_planner_holds_its_choice() -> None:
    planner = SpeculationPlanner()
    seqs = sequences(0.9, 2)
    expected = [s.expected_tokens for s in seqs]
    explored(planner, 2, lambda q: 0.010, seqs, [4, 4])  # guessing is free: the best is the most guesses
    assert planner.choose(2, expected, [4, 4], num_plain=0, sticky=True) == 4
    for s in seqs:
        s.kept_rate._kept = 0.0  # every guess now wrong: the best is none ...
    held = [planner.choose(2, expected, [4, 4], num_plain=0, sticky=True) for _ in range(planner.HOLD_STEPS - 1)]
    assert held == [4] * (planner.HOLD_STEPS - 1)  # ... but a draft model's choice holds a while
    after = [planner.choose(2, expected, [4, 4], num_plain=0, sticky=True) for _ in range(3)]
    assert 0 in after
    assert planner.choose(2, expected, [4, 4], num_plain=0) in (0, 1, 2, 3)  # n-gram only: decided every step


def test_an_engine_planning_by_cost_still_gives_greedy_output(loaded) -> None:  # noqa: F811
    prompt = loaded[2].tokenizer.encode("one two three one two three one two three one two").ids
    reqs = [GenerationRequest(f"g{i}", "m", prompt, greedy(16)) for i in range(3)]
    expected = run(make_engine(loaded), reqs)
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, speculative_method="ngram", speculative_by_cost=True)
    got = run(engine, copy_of(reqs))
    for req in reqs:
        assert tokens_of(got[req.id]) == tokens_of(expected[req.id])
    assert engine.planner is not None and spec_counter(registry, "num_drafts", "ngram") > 0  # it tried guessing


def test_an_engine_planning_by_cost_stops_asking_a_slow_draft(loaded) -> None:  # noqa: F811
    prompt = loaded[2].tokenizer.encode("The weather today is").ids
    truth = tokens_of(run(make_engine(loaded), [GenerationRequest("t", "m", prompt, greedy(64))])["t"])
    calls: list[int] = []

    def slow_half_right(seq_id: str, ids: list[int], k: int) -> list[int]:
        calls.append(k)
        time.sleep(0.2)  # far dearer than a decode step of this model, even on a busy machine
        at = len(ids) - len(prompt)
        return ([truth[at]] + [7] * (k - 1))[:k]  # the first guess right, the rest wrong: acceptance stays 1 in 2

    params = greedy(64, speculative={"method": "draft", "num_tokens": 2})
    for by_cost in (False, True):
        calls.clear()
        engine = spec_engine(loaded, CollectorRegistry(), ScriptedProposer(slow_half_right),
                             speculative_by_cost=by_cost, speculative_tokens=2)  # fmt: skip
        got = run(engine, [GenerationRequest("slow", "m", prompt, params)])
        assert tokens_of(got["slow"]) == truth
        if not by_cost:
            assert len(calls) >= 25  # the draft-length controller alone keeps asking (half its guesses are right)
    # the planner tries each shape a couple of times, then only probes
    assert 0 < len(calls) <= 14, calls


def test_speculative_field_survives_the_wire_and_old_requests_default_to_none() -> None:
    req = GenerationRequest("w", "m", [1], SamplingParams(speculative={"method": "ngram", "num_tokens": 2}))
    assert GenerationRequest.from_dict(req.to_dict()).params.speculative == {"method": "ngram", "num_tokens": 2}
    old = req.to_dict()
    del old["params"]["speculative"]
    assert GenerationRequest.from_dict(old).params.speculative is None


# -- sampling: the target distribution is kept ----------------------------------------------------------------------
TOP_K, TEMPERATURE = 8, 1.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("spec") / "tiny")
    model, config = load_model(model_dir, "cpu", torch.float32)
    return model, config, ModelTokenizer.from_dir(model_dir)


def tiny_engine(tiny, proposer: Proposer | None = None, **overrides) -> Engine:
    model, config, tokenizer = tiny
    sizes = dict(max_batch_size=1024, max_batch_tokens=16384, kv_page_size=16, kv_cache_tokens=1024 * 32)
    # every sequence guesses, whatever it costs
    spec = dict(speculative_max_batch=1024, speculative_max_step_tokens=16384, speculative_by_cost=False)
    cfg = EngineConfig(device="cpu", max_model_len=64, **spec, **sizes, **overrides)
    proposers = {"draft": proposer} if proposer else None
    return Engine(model, config, tokenizer, cfg, WorkerMetrics(CollectorRegistry(), "tiny"), proposers)


def target(tiny, context: list[int]) -> dict[int, float]:
    """The distribution a sampled token after ``context`` must follow: softmax(logits / T) over the top k."""
    params = SamplingParams(max_tokens=1, temperature=0.0, top_logprobs=TOP_K, ignore_eos=True)
    events = run(tiny_engine(tiny), [GenerationRequest("t", "m", context, params)])["t"]
    top = _logprobs(events)[0]["top"]
    weights = torch.tensor([lp for _, _, lp in top]) / TEMPERATURE
    return dict(zip([t for _, t, _ in top], torch.softmax(weights, 0).tolist(), strict=True))


def chi_squared(observed: Counter[int], expected: dict[int, float]) -> tuple[float, int]:
    """(statistic, degrees of freedom) of observed counts under the expected distribution, bins expecting < 5
    merged."""
    n = sum(observed.values())
    assert set(observed) <= set(expected), f"tokens outside the top-k were drawn: {set(observed) - set(expected)}"
    bins: list[tuple[float, float]] = []
    small_obs = small_exp = 0.0
    for token, p in expected.items():
        if n * p >= 5:
            bins.append((observed[token], n * p))
        else:
            small_obs, small_exp = small_obs + observed[token], small_exp + n * p
    if small_exp > 0:
        bins.append((small_obs, small_exp))
    return sum((o - e) ** 2 / e for o, e in bins), len(bins) - 1


def pooled_p_value(tiny, samples: list[list[int]], prompt: list[int], position: int, keep) -> tuple[float, int]:
    """(p-value, draws tested) of the tokens at ``position`` against the target after each sample's own context
    (contexts with >= 30 draws; ``keep(sample)`` selects the draws). Independent chi-squared statistics add up."""
    by_context: dict[tuple[int, ...], Counter[int]] = {}
    for s in samples:
        if keep(s):
            by_context.setdefault(tuple(s[:position]), Counter())[s[position]] += 1
    stat, df, tested = 0.0, 0, 0
    for context, observed in by_context.items():
        if observed.total() >= 30:
            s, d = chi_squared(observed, target(tiny, prompt + list(context)))
            stat, df, tested = stat + s, df + d, tested + observed.total()
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2))), tested


def test_speculative_sampling_keeps_the_target_distribution(tiny) -> None:
    prompt = tiny[2].encode("the cat sat on")
    first = target(tiny, prompt)
    second = target(tiny, prompt + [max(first, key=first.__getitem__)])
    guess = max(second, key=second.__getitem__)  # likely after the likeliest first token, unlikely after others
    engine = tiny_engine(tiny, ScriptedProposer(lambda _s, _t, k: [guess] * k))
    params = dict(max_tokens=4, temperature=TEMPERATURE, top_k=TOP_K, ignore_eos=True)
    speculative = {"method": "draft", "num_tokens": 2}
    reqs = [GenerationRequest(f"s{i}", "m", prompt, SamplingParams(seed=i, speculative=speculative, **params))
            for i in range(3000)]  # fmt: skip
    events = run(engine, reqs)
    samples = [tokens_of(events[r.id]) for r in reqs]
    accepted = engine.metrics._spec_accepted_tokens.labels(model="tiny", method="draft")._value.get()
    proposed = engine.metrics._spec_draft_tokens.labels(model="tiny", method="draft")._value.get()
    assert 0.1 * proposed < accepted < 0.9 * proposed  # both outcomes are common
    # token 2 is the first verified position; token 3 follows either a kept guess (the chunk's next position, a
    # guess again) or a rejected one (replaced by a residual draw; the next step's verification)
    checks = {
        "first verified": (1, lambda s: True),
        "after a kept guess": (2, lambda s: s[1] == guess),
        "after a rejected guess": (2, lambda s: s[1] != guess),
    }
    for name, (position, keep) in checks.items():
        p_value, tested = pooled_p_value(tiny, samples, prompt, position, keep)
        assert tested > 300 and p_value > 1e-3, (name, tested, p_value)
