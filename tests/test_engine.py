"""The engine on the real default model (CPU, fp32): batching, chunking and preemption never change greedy output."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from inference_worker.engine import CPU_KV_CACHE_BYTES, Engine, EngineConfig, EngineLoop, default_kv_cache_tokens
from inference_worker.kv_cache import kv_bytes_per_token
from inference_worker.loader import load_model
from inference_worker.metrics import WorkerMetrics
from shared.settings import Settings
from shared.tokenizer import ModelTokenizer
from shared.wire import GenerationRequest, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old clockmaker who",
    "Q: What is 12 times 12?\nA:",
    "def fibonacci(n):",
    "Translate to German: good morning, how are you today?",
    "Hi",
]


@pytest.fixture(scope="module")
def loaded(default_model_dir: Path):
    model, config = load_model(default_model_dir, "cpu", torch.float32)
    return model, config, ModelTokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(loaded) -> list[list[int]]:
    tok = loaded[2].tokenizer
    return [tok.encode(p).ids for p in PROMPTS]


def make_engine(loaded, registry: CollectorRegistry | None = None, **overrides) -> Engine:
    model, config, tokenizer = loaded
    settings = dict(device="cpu", max_batch_size=8, max_batch_tokens=256, kv_page_size=8, kv_cache_tokens=2048)
    base = {"max_model_len": 2048, "worker_id": "test"}
    cfg = EngineConfig(**{**settings, **base, **overrides})
    metrics = WorkerMetrics(registry or CollectorRegistry(), "smollm2")
    return Engine(model, config, tokenizer, cfg, metrics)


def greedy(max_tokens: int = 8, **params) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **params)


def run(engine: Engine, requests: list[GenerationRequest], max_steps: int = 2000) -> dict[str, list[dict]]:
    """Add every request, step until idle; each request's events in order."""
    for req in requests:
        engine.add_request(req)
    events: dict[str, list[dict]] = {req.id: [] for req in requests}
    for _ in range(max_steps):
        if not engine.has_work():
            return events
        for request_id, event in engine.step():
            events.setdefault(request_id, []).append(event)
    raise AssertionError(f"requests still running after {max_steps} steps")


def tokens_of(events: list[dict], index: int = 0) -> list[int]:
    return [t for e in events if e["type"] == "delta" and e["index"] == index for t in e["token_ids"]]


def text_of(events: list[dict], index: int = 0) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta" and e["index"] == index)


def finishes(events: list[dict]) -> dict[int, dict]:
    return {e["index"]: e for e in events if e["type"] == "finish"}


def assert_well_formed(events: list[dict], n: int = 1) -> None:
    assert events[-1]["type"] == "done"
    assert [e["type"] for e in events].count("done") == 1
    assert sorted(finishes(events)) == list(range(n))


def alone(loaded, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = make_engine(loaded)
    return tokens_of(run(engine, [GenerationRequest("alone", "m", prompt, params)])["alone"])


def test_concurrent_greedy_requests_give_exactly_the_tokens_each_gives_alone(loaded, prompt_ids) -> None:
    lengths = [6, 9, 4, 7, 8, 5, 10, 6]
    reqs = [
        GenerationRequest(f"r{i}", "m", p, greedy(n)) for i, (p, n) in enumerate(zip(prompt_ids, lengths, strict=True))
    ]
    engine = make_engine(loaded)
    together = run(engine, reqs)
    for i, req in enumerate(reqs):
        assert_well_formed(together[req.id])
        assert len(tokens_of(together[req.id])) == lengths[i]
        assert tokens_of(together[req.id]) == alone(loaded, req.prompt_ids, req.params), f"request {i} differs"
    assert engine.scheduler.num_free_pages == engine.scheduler.num_pages


def test_greedy_output_through_the_paged_cache_equals_transformers_with_a_contiguous_cache(
    loaded, prompt_ids, default_model_dir
) -> None:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    reqs = [GenerationRequest(f"h{i}", "m", prompt_ids[i], greedy(8)) for i in (0, 3, 5)]
    engine = make_engine(loaded, kv_page_size=4)  # small pages, handed out to the three sequences interleaved
    paged = run(engine, reqs)
    for req in reqs:
        prompt = torch.tensor([req.prompt_ids])
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)  # fmt: skip
        assert tokens_of(paged[req.id]) == out[0, prompt.shape[1] :].tolist(), req.id


def test_chunked_prefill_gives_the_same_tokens_as_one_chunk(loaded, prompt_ids) -> None:
    prompts = [prompt_ids[3], prompt_ids[6], prompt_ids[1]]
    reqs = [GenerationRequest(f"c{i}", "m", p, greedy(6)) for i, p in enumerate(prompts)]
    whole = run(make_engine(loaded), reqs)
    chunked_engine = make_engine(loaded, max_batch_size=4, max_batch_tokens=5)
    chunked = run(chunked_engine, [GenerationRequest(r.id, r.model, r.prompt_ids, r.params) for r in reqs])
    for req in reqs:
        assert tokens_of(chunked[req.id]) == tokens_of(whole[req.id])
        assert_well_formed(chunked[req.id])


def test_preempted_request_finishes_with_the_same_greedy_output(loaded, prompt_ids) -> None:
    prompts = [prompt_ids[0], prompt_ids[2], prompt_ids[4]]
    reqs = [GenerationRequest(f"p{i}", "m", p, greedy(12)) for i, p in enumerate(prompts)]
    roomy = run(make_engine(loaded), reqs)
    # 5 pages of 8 tokens: all three are admitted, then outgrow the cache and preempt each other
    tight_engine = make_engine(loaded, kv_cache_tokens=40)
    tight = run(tight_engine, [GenerationRequest(r.id, r.model, r.prompt_ids, r.params) for r in reqs])
    assert tight_engine.scheduler.num_preemptions > 0
    for req in reqs:
        assert tokens_of(tight[req.id]) == tokens_of(roomy[req.id])
        assert_well_formed(tight[req.id])
    assert tight_engine.scheduler.num_free_pages == tight_engine.scheduler.num_pages


def test_abort_frees_the_pages_within_one_step_and_ends_the_stream(loaded, prompt_ids) -> None:
    engine = make_engine(loaded)
    engine.add_request(GenerationRequest("a", "m", prompt_ids[3], greedy(50)))
    engine.step()
    engine.step()
    assert engine.scheduler.num_free_pages < engine.scheduler.num_pages
    engine.abort("a")
    events = [e for rid, e in engine.step() if rid == "a"]
    assert engine.scheduler.num_free_pages == engine.scheduler.num_pages
    assert [e["type"] for e in events] == ["finish", "done"]
    assert events[0]["finish_reason"] == "abort" and events[0]["completion_tokens"] == 2
    assert not engine.has_work() and engine.free_slots() == engine.cfg.max_batch_size
    engine.abort("a")  # aborting a finished request is harmless
    assert engine.step() == []


def test_seeded_sampling_is_reproducible_and_n_choices_differ(loaded, prompt_ids) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, n=2, ignore_eos=True)
    first = run(make_engine(loaded), [GenerationRequest("s", "m", prompt_ids[1], params)])["s"]
    second = run(make_engine(loaded), [GenerationRequest("s", "m", prompt_ids[1], params)])["s"]
    assert_well_formed(first, n=2)
    assert tokens_of(first, 0) == tokens_of(second, 0) and tokens_of(first, 1) == tokens_of(second, 1)
    assert tokens_of(first, 0) != tokens_of(first, 1)
    usage = first[-1]["usage"]
    assert usage == {
        "prompt_tokens": len(prompt_ids[1]),
        "completion_tokens": 24,
        "total_tokens": len(prompt_ids[1]) + 24,
    }


def test_max_tokens_ends_with_length_and_counts_usage(loaded, prompt_ids) -> None:
    events = run(make_engine(loaded), [GenerationRequest("l", "m", prompt_ids[0], greedy(5))])["l"]
    assert_well_formed(events)
    fin = finishes(events)[0]
    assert fin["finish_reason"] == "length" and fin["completion_tokens"] == 5 and fin["stop_reason"] is None
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert events[-1]["worker_id"] == "test"
    timings = events[-1]["timings"]
    assert 0 <= timings["queue_s"] <= timings["ttft_s"] <= timings["total_s"]


def test_stop_string_ends_with_stop_and_holds_back_its_text(loaded, prompt_ids) -> None:
    prompt = prompt_ids[3]
    free = run(make_engine(loaded), [GenerationRequest("f", "m", prompt, greedy(16))])["f"]
    full_text = text_of(free)
    words = full_text.split()
    assert len(words) >= 4, full_text
    stop = " " + words[2]
    cut = full_text.index(stop)
    events = run(make_engine(loaded), [GenerationRequest("s", "m", prompt, greedy(16, stop=[stop]))])["s"]
    assert_well_formed(events)
    fin = finishes(events)[0]
    assert fin["finish_reason"] == "stop" and fin["stop_reason"] == stop
    assert text_of(events) == full_text[:cut]
    generated = tokens_of(events)
    assert generated == tokens_of(free)[: len(generated)]
    assert fin["completion_tokens"] == len(generated) < 16
    assert events[-1]["usage"]["completion_tokens"] == len(generated)


def test_stop_token_id_ends_with_stop_without_emitting_it(loaded, prompt_ids) -> None:
    prompt = prompt_ids[5]
    free = tokens_of(run(make_engine(loaded), [GenerationRequest("f", "m", prompt, greedy(8))])["f"])
    stop_id = free[3]
    first = free.index(stop_id)
    params = greedy(8, stop_token_ids=[stop_id])
    events = run(make_engine(loaded), [GenerationRequest("t", "m", prompt, params)])["t"]
    fin = finishes(events)[0]
    assert fin["finish_reason"] == "stop" and fin["stop_reason"] == stop_id
    assert tokens_of(events) == free[:first]
    assert fin["completion_tokens"] == first + 1  # the stop token was generated, so it counts


def test_logprobs_carry_the_sampled_token_and_top_alternatives(loaded, prompt_ids) -> None:
    params = greedy(6, logprobs=True, top_logprobs=3)
    events = run(make_engine(loaded), [GenerationRequest("lp", "m", prompt_ids[0], params)])["lp"]
    entries = [lp for e in events if e["type"] == "delta" for lp in e["logprobs"]]
    assert [e["id"] for e in entries] == tokens_of(events) and len(entries) == 6
    for entry in entries:
        assert len(entry["top"]) == 3
        assert entry["top"][0][1] == entry["id"]  # greedy: the sampled token is the most likely one
        assert entry["logprob"] == pytest.approx(entry["top"][0][2]) and entry["logprob"] <= 0.0
        assert entry["top"][0][2] >= entry["top"][1][2] >= entry["top"][2][2]
    # the tokens' bytes spell exactly the streamed text
    assert b"".join(bytes(e["bytes"]) for e in entries) == text_of(events).encode("utf-8")


def test_requests_that_cannot_run_get_a_clear_error(loaded, prompt_ids) -> None:
    engine = make_engine(loaded, kv_cache_tokens=64, max_model_len=48)
    reqs = [
        GenerationRequest("long", "m", list(range(48)), greedy(1)),
        GenerationRequest("empty", "m", [], greedy(1)),
        GenerationRequest("vocab", "m", [1, 10**9], greedy(1)),
    ]
    events = run(engine, reqs)
    assert events["long"][0]["code"] == "context_length_exceeded"
    assert "48 tokens" in events["long"][0]["message"]
    assert events["empty"][0]["code"] == "invalid_request" and "empty" in events["empty"][0]["message"]
    assert events["vocab"][0]["code"] == "invalid_request" and "1000000000" in events["vocab"][0]["message"]
    assert all(len(e) == 1 and e[0]["type"] == "error" for e in events.values())
    assert engine.free_slots() == engine.cfg.max_batch_size


def test_context_limit_ends_generation_with_length(loaded, prompt_ids) -> None:
    prompt = prompt_ids[0]
    engine = make_engine(loaded, max_model_len=len(prompt) + 3)
    events = run(engine, [GenerationRequest("c", "m", prompt, greedy(100))])["c"]
    fin = finishes(events)[0]
    assert fin["finish_reason"] == "length" and fin["completion_tokens"] == 3


def test_free_slots_counts_queued_requests_and_metrics_follow_the_work(loaded, prompt_ids) -> None:
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, max_batch_size=4, max_batch_tokens=64)
    reqs = [GenerationRequest(f"m{i}", "m", prompt_ids[i], greedy(3)) for i in range(3)]
    for req in reqs[:2]:
        engine.add_request(req)
    assert engine.free_slots() == 2
    run(engine, reqs[2:])
    assert engine.free_slots() == 4
    labels = {"model": "smollm2"}
    assert registry.get_sample_value("trellis_generation_tokens_total", labels) == 9
    prompt_total = sum(len(r.prompt_ids) for r in reqs)
    assert registry.get_sample_value("trellis_prompt_tokens_total", labels) == prompt_total
    success = registry.get_sample_value("trellis_request_success_total", {**labels, "finish_reason": "length"})
    assert success == 3
    assert registry.get_sample_value("trellis_time_to_first_token_seconds_count", labels) == 3
    assert registry.get_sample_value("trellis_num_requests_running", labels) == 0


def test_engine_loop_delivers_events_from_its_thread_and_stops_cleanly(loaded, prompt_ids) -> None:
    engine = make_engine(loaded)
    received: list[tuple[str, dict]] = []
    done = threading.Event()

    def on_events(batch: list[tuple[str, dict]]) -> None:
        received.extend(batch)
        if sum(e["type"] == "done" for _, e in received) == 2:
            done.set()

    loop = EngineLoop(engine, on_events)
    loop.start()
    try:
        for i in range(2):
            engine.add_request(GenerationRequest(f"t{i}", "m", prompt_ids[i], greedy(4)))
        assert done.wait(60), "the loop did not finish two small requests"
    finally:
        loop.stop()
    assert loop._thread is None
    for i in range(2):
        assert tokens_of([e for rid, e in received if rid == f"t{i}"]) == alone(loaded, prompt_ids[i], greedy(4))


def test_from_settings_loads_the_model_and_keeps_the_cpu_cache_within_its_budget(default_model_dir) -> None:
    registry = CollectorRegistry()
    settings = Settings(device="auto", dtype="auto", kv_cache_tokens=0, max_model_len=0, worker_id="w1")
    engine = Engine.from_settings(default_model_dir, settings, model_id="smol", registry=registry)
    assert engine.device.type == "cpu" and engine.cache.dtype == torch.float32
    cache_bytes = engine.scheduler.capacity_tokens * engine.cache.bytes_per_token()
    assert 0.9 * CPU_KV_CACHE_BYTES < cache_bytes <= CPU_KV_CACHE_BYTES  # the full 8192 x 16 would not fit
    assert engine.max_model_len == min(8192, engine.scheduler.capacity_tokens)
    prompt = engine.tokenizer.encode("Hello")
    events = run(engine, [GenerationRequest("x", "smol", prompt, greedy(2))])["x"]
    assert events[-1]["worker_id"] == "w1"
    assert registry.get_sample_value("trellis_generation_tokens_total", {"model": "smol"}) == 2


def test_default_cpu_cache_holds_a_full_batch_of_full_contexts_when_that_is_small() -> None:
    per_token = kv_bytes_per_token(30, 3, 64, torch.float32)
    assert default_kv_cache_tokens(torch.device("cpu"), 2048, 4, per_token) == 8192
    assert default_kv_cache_tokens(torch.device("cpu"), 8192, 64, per_token) == CPU_KV_CACHE_BYTES // per_token


def test_eos_ends_with_stop_unless_ignored(loaded) -> None:
    tokenizer = loaded[2]
    prompt = tokenizer.chat_prompt_ids([{"role": "user", "content": "Is the sky blue? Answer yes or no."}])
    eos = tokenizer.eos_token_ids[0]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    events = run(make_engine(loaded), [GenerationRequest("e", "m", prompt, params)])["e"]
    fin = finishes(events)[0]
    assert fin["finish_reason"] == "stop" and fin["stop_reason"] is None
    answer = tokens_of(events)
    assert eos not in answer and fin["completion_tokens"] == len(answer) + 1  # the eos counts, but is not sent
    params = SamplingParams(max_tokens=len(answer) + 3, temperature=0.0, ignore_eos=True)
    ignored = run(make_engine(loaded), [GenerationRequest("i", "m", prompt, params)])["i"]
    assert finishes(ignored)[0]["finish_reason"] == "length"
    assert tokens_of(ignored)[: len(answer) + 1] == [*answer, eos]


def test_a_request_past_its_queue_deadline_never_runs_and_ends_with_queue_timeout(loaded, prompt_ids) -> None:
    engine = make_engine(loaded)
    late = GenerationRequest("late", "m", prompt_ids[0], greedy(4), deadline=time.time() - 1)
    on_time = GenerationRequest("on-time", "m", prompt_ids[1], greedy(4), deadline=time.time() + 60)
    events = run(engine, [late, on_time])
    assert [e["type"] for e in events["late"]] == ["error"] and events["late"][0]["code"] == "queue_timeout"
    assert len(tokens_of(events["on-time"])) == 4 and events["on-time"][-1]["type"] == "done"
