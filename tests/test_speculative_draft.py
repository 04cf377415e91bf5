"""The draft-model proposer: a smaller model with the same vocabulary guesses; output never changes, its own KV cache
follows the sequences (rollback after rejections, pages back when they end), and a mismatched draft is refused."""

# ruff: noqa: F811 - the fixtures imported from tests/test_engine.py are redefined as test parameters

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors import safe_open
from safetensors.torch import save_file

from inference_worker.draft_model import DraftModelProposer, common_prefix_length
from inference_worker.engine import Engine
from inference_worker.loader import load_model
from inference_worker.speculative import DraftRequest
from shared.settings import Settings
from shared.wire import GenerationRequest, SamplingParams
from tests.test_engine import PROMPTS, greedy, loaded, make_engine, prompt_ids, run, tokens_of  # noqa: F401
from tests.test_speculative import spec_counter, spec_engine
from tests.tiny_models import write_tiny_llama

DRAFT = {"method": "draft", "num_tokens": 4}
PAGE = 8


def write_truncated_copy(source: Path, out: Path, num_layers: int) -> Path:
    """``source`` with only its first ``num_layers`` decoder layers: same vocabulary, much worse guesses."""
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": num_layers}))
    kept = {f"model.layers.{i}." for i in range(num_layers)}
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        tensors = {
            name: f.get_tensor(name)
            for name in f.keys()
            if not name.startswith("model.layers.") or any(name.startswith(p) for p in kept)
        }
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    return out


@pytest.fixture(scope="module")
def two_layers(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model_dir = write_truncated_copy(default_model_dir, tmp_path_factory.mktemp("draft") / "two-layers", 2)
    return load_model(model_dir, "cpu", torch.float32)


def proposer_of(model_and_config, cache_tokens: int = 4096, **kwargs) -> DraftModelProposer:
    model, config = model_and_config[:2]
    return DraftModelProposer(model, config, cache_tokens, PAGE, "cpu", torch.float32, **kwargs)


@pytest.fixture(scope="module")
def mixed_requests(loaded, prompt_ids) -> list[GenerationRequest]:
    """Prompts of 1..24 tokens, several lengths, and stops (a string, a token id) that fire mid-output."""
    free = tokens_of(run(make_engine(loaded), [GenerationRequest("f", "m", prompt_ids[3], greedy(16))])["f"])
    stop_token = next(t for i, t in enumerate(free) if i >= 8 and t not in free[:i])
    stop_text = loaded[2].tokenizer.decode(free[10:12])
    lengths = [5, 12, 9, 16, 7, 14, 3, 10]
    reqs = [
        GenerationRequest(f"r{i}", "m", p, greedy(n)) for i, (p, n) in enumerate(zip(prompt_ids, lengths, strict=True))
    ]
    reqs.append(GenerationRequest("stop-id", "m", prompt_ids[3], greedy(16, stop_token_ids=[stop_token])))
    reqs.append(GenerationRequest("stop-str", "m", prompt_ids[3], greedy(16, stop=[stop_text])))
    return reqs


@pytest.fixture(scope="module")
def expected(loaded, mixed_requests) -> dict[str, list[int]]:
    events = run(make_engine(loaded), mixed_requests)
    return {rid: tokens_of(e) for rid, e in events.items()}


def with_draft(reqs: list[GenerationRequest]) -> list[GenerationRequest]:
    return [GenerationRequest(r.id, r.model, list(r.prompt_ids), greedy_with_draft(r)) for r in reqs]


def greedy_with_draft(req: GenerationRequest) -> SamplingParams:
    p = req.params
    return greedy(p.max_tokens, stop=p.stop, stop_token_ids=p.stop_token_ids, speculative=DRAFT)


# -- greedy output is unchanged, whatever the draft ----------------------------------------------------------------
@pytest.mark.parametrize("draft", ["itself", "two-layers"])
def test_greedy_with_a_draft_model_equals_greedy_without_speculation(
    draft, loaded, two_layers, mixed_requests, expected
) -> None:
    proposer = proposer_of(loaded if draft == "itself" else two_layers)
    registry = CollectorRegistry()
    events = run(spec_engine(loaded, registry, proposer), with_draft(mixed_requests))
    for req in mixed_requests:
        assert tokens_of(events[req.id]) == expected[req.id], req.id
    assert len(expected["stop-id"]) < 16 and len(expected["stop-str"]) < 16  # both stops fired
    proposed = spec_counter(registry, "num_draft_tokens", "draft")
    accepted = spec_counter(registry, "num_accepted_tokens", "draft")
    if draft == "itself":  # the target's own guesses: only a stop or max_tokens inside a chunk drops any
        assert accepted > 0.9 * proposed > 0
    else:
        assert accepted < 0.6 * proposed
    assert proposer.pool.num_free == proposer.pool.num_pages and proposer.num_seqs == 0  # every sequence forgotten


def test_draft_and_target_through_the_graph_buffers_keep_greedy_output(
    loaded, two_layers, mixed_requests, expected
) -> None:
    proposer = proposer_of(two_layers, graphs="static", max_seqs=16, max_model_len=2048)
    assert proposer.cache.num_pages == proposer.pool.num_pages + 1  # the scratch page is not the pool's
    events = run(spec_engine(loaded, None, proposer, decode_graphs="static"), with_draft(mixed_requests))
    for req in mixed_requests:
        assert tokens_of(events[req.id]) == expected[req.id], req.id
    assert proposer.graphs is not None and proposer.graphs.replays > 0  # guesses (and short catch-ups) went through
    assert proposer.pool.num_free == proposer.pool.num_pages


# -- the draft cache follows the sequence ---------------------------------------------------------------------------
def test_rollback_keeps_the_common_prefix_and_proposes_like_a_fresh_draft(two_layers, prompt_ids) -> None:
    prompt = prompt_ids[3]  # 24 tokens: 3 pages of 8
    n = len(prompt)
    proposer = proposer_of(two_layers)
    first = proposer.propose([DraftRequest("s", prompt, 8)])[0]
    assert len(first) == 8 and proposer.cached_tokens("s") == prompt + first[:7]  # the last guess is never fed
    assert proposer.num_pages_held("s") == 4  # 31 tokens
    free_before = proposer.pool.num_free

    def other_than(token: int) -> int:
        return (token + 1) % 1000

    # the target kept guess 1, then chose another token than guess 2
    kept_one = prompt + [first[0], other_than(first[1])]
    fed = record_fed_positions(proposer)
    second = proposer.propose([DraftRequest("s", kept_one, 1)])[0]
    assert fed == [[n + 1]]  # only the target's token: the kept prefix stayed cached
    assert proposer.cached_tokens("s") == kept_one and proposer.num_pages_held("s") == 4  # 26 tokens
    assert proposer.pool.num_free == free_before

    # the target rejected guess 1: its own token replaces it
    rejected = prompt + [other_than(first[0])]
    fed.clear()
    third = proposer.propose([DraftRequest("s", rejected, 1)])[0]
    assert fed == [[n]] and proposer.cached_tokens("s") == rejected and proposer.num_pages_held("s") == 4
    shorter = prompt[:-9]  # 15 tokens: less than the draft holds, so pages past them go back
    proposer.propose([DraftRequest("s", shorter, 1)])
    assert proposer.num_pages_held("s") == 2 and proposer.pool.num_free == free_before + 2

    def fresh_guesses(token_ids: list[int], k: int) -> list[int]:
        return proposer_of(two_layers).propose([DraftRequest("fresh", token_ids, k)])[0]

    assert first == fresh_guesses(prompt, 8)
    assert second == fresh_guesses(kept_one, 1) and third == fresh_guesses(rejected, 1)
    # and after all that, the incremental draft still guesses what a fresh one does
    assert proposer.propose([DraftRequest("s", rejected + third, 5)])[0] == fresh_guesses(rejected + third, 5)


def record_fed_positions(proposer: DraftModelProposer) -> list[list[int]]:
    """Positions fed by each forward of ``proposer``'s model from now on."""
    fed: list[list[int]] = []
    forward = proposer.model.forward

    def spy(batch, cache):
        fed.append(batch.positions.tolist())
        return forward(batch, cache)

    proposer.model = type("Spy", (), {"forward": staticmethod(spy)})()
    return fed


def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([1, 2, 3], [1, 5, 3]) == 1
    assert common_prefix_length([], [1]) == 0 and common_prefix_length([7], [8]) == 0


def test_a_full_draft_cache_proposes_less_or_nothing_and_never_fails(two_layers, prompt_ids) -> None:
    proposer = proposer_of(two_layers, cache_tokens=4 * PAGE, max_batch_tokens=10)  # chunked catch-up too
    short, long = prompt_ids[0], prompt_ids[3]  # 5 and 24 tokens
    guesses = proposer.propose([DraftRequest("a", long, 4), DraftRequest("b", short, 4), DraftRequest("c", short, 4)])
    # a: 24 + 3 tokens take all 4 pages; b and c find no room
    assert [len(g) for g in guesses] == [4, 0, 0] and proposer.pool.num_free == 0
    proposer.forget("a")
    guesses = proposer.propose([DraftRequest("b", short, 4), DraftRequest("c", long, 8)])
    # b: 5 + 3 tokens, one page; c: 24 real tokens fit in the other 3 pages, so only 1 guess
    assert [len(g) for g in guesses] == [4, 1]
    for seq_id in ("b", "c"):
        proposer.forget(seq_id)
    assert proposer.pool.num_free == proposer.pool.num_pages and proposer.num_seqs == 0


def test_finished_aborted_and_preempted_sequences_give_their_draft_pages_back(loaded, two_layers, prompt_ids) -> None:
    proposer = proposer_of(two_layers, cache_tokens=16 * PAGE)
    forgotten: list[str] = []
    forget = proposer.forget
    proposer.forget = lambda seq_id: (forgotten.append(seq_id), forget(seq_id))  # type: ignore[method-assign]
    engine = spec_engine(loaded, None, proposer, kv_cache_tokens=40)  # 5 target pages: they preempt each other
    reqs = [GenerationRequest(f"p{i}", "m", prompt_ids[i], greedy(12, speculative=DRAFT)) for i in (0, 2, 4)]
    reqs.append(GenerationRequest("gone", "m", prompt_ids[7], greedy(30, speculative=DRAFT)))
    for req in reqs:
        engine.add_request(req)
    for _ in range(4):
        engine.step()
    engine.abort("gone")
    run(engine, [])
    assert engine.scheduler.num_preemptions > 0
    assert len(forgotten) == len(reqs) + engine.scheduler.num_preemptions  # each end and each preemption
    assert proposer.pool.num_free == proposer.pool.num_pages and proposer.num_seqs == 0


# -- construction from the settings ---------------------------------------------------------------------------------
def worker_settings(models_dir: Path, draft: str) -> Settings:
    return Settings(models_dir=models_dir, device="cpu", max_model_len=256, max_batch_size=4,
                    speculative_draft_model=draft)  # fmt: skip


def test_from_settings_loads_the_draft_model_and_serves_method_draft(default_model_dir: Path) -> None:
    settings = worker_settings(default_model_dir.parent, default_model_dir.name)
    registry = CollectorRegistry()
    engine = Engine.from_settings(default_model_dir, settings, model_id="smollm2", registry=registry)
    proposer = engine.proposers["draft"]
    assert isinstance(proposer, DraftModelProposer)
    assert proposer.pool.num_pages * proposer.page_size == 4 * 256  # derived: each speculating sequence, full length
    prompt = engine.tokenizer.tokenizer.encode(PROMPTS[0]).ids
    events = run(engine, [GenerationRequest("d", "m", prompt, greedy(6, speculative=DRAFT))])
    assert len(tokens_of(events["d"])) == 6 and spec_counter(registry, "num_drafts", "draft") > 0


def test_a_draft_model_with_another_vocabulary_is_refused_at_start(default_model_dir: Path, tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "tiny-256")
    with pytest.raises(ValueError, match=r"'tiny-256' has a vocabulary of 256 tokens .* 'smollm2' has 49152"):
        Engine.from_settings(default_model_dir, worker_settings(tmp_path, "tiny-256"), model_id="smollm2")
