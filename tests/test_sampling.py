"""The sampler: greedy, the filtered distributions, penalties, logit_bias, seeds and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from inference_worker.sampling import SamplingState, make_generator, processed_logits, sample
from shared.wire import SamplingParams

# a small vocabulary with distinct, unevenly spread probabilities
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.2, -0.3, -1.0, -2.5])
DRAWS = 20_000
TV_BOUND = 0.02  # sampling noise for 20k draws over 8 tokens is ~0.008
# the worker samples on the GPU in production: the device-sensitive tests also run there (pytest -m gpu)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _state(prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> SamplingState:
    return SamplingState(SamplingParams(**params), list(prompt or []), list(output or []), None)


def _empirical(params: dict, device: str = "cpu") -> torch.Tensor:
    """Token frequencies over DRAWS independent rows holding the same logits."""
    torch.manual_seed(0)
    states = [_state(**params) for _ in range(DRAWS)]
    tokens = torch.tensor([t.token_id for t in sample(LOGITS.repeat(DRAWS, 1).to(device), states)])
    return torch.bincount(tokens, minlength=LOGITS.numel()).double() / DRAWS


def _renormalized(probs: list[float], keep: list[bool]) -> torch.Tensor:
    kept = torch.tensor([p if k else 0.0 for p, k in zip(probs, keep, strict=True)], dtype=torch.float64)
    return kept / kept.sum()


def _softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def _assert_matches(empirical: torch.Tensor, expected: torch.Tensor) -> None:
    tv = 0.5 * (empirical - expected).abs().sum().item()
    assert tv < TV_BOUND, f"total variation {tv:.4f}: empirical {empirical.tolist()} vs expected {expected.tolist()}"
    assert torch.all(empirical[expected == 0] == 0), "a filtered-out token was drawn"


def test_greedy_returns_argmax_of_each_row() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    tokens = sample(logits, [_state(temperature=0.0) for _ in range(6)])
    assert [t.token_id for t in tokens] == logits.argmax(dim=-1).tolist()


def test_greedy_is_argmax_of_penalized_and_biased_logits() -> None:
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.5]])
    # token 0 would win; a repetition penalty on it (seen in the prompt) makes 3.0 -> 1.5, and a bias lifts token 2
    state = _state(prompt=[0], temperature=0.0, repetition_penalty=2.0, logit_bias={2: 2.5})
    assert processed_logits(logits, [state])[0].tolist() == pytest.approx([1.5, 2.9, 3.5, 0.5])
    assert sample(logits, [state])[0].token_id == 2


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_draws_follow_the_tempered_softmax(device: str) -> None:
    expected = torch.tensor(_softmax(LOGITS.tolist(), 0.7), dtype=torch.float64)
    _assert_matches(_empirical({"temperature": 0.7}, device), expected)


def test_top_k_draws_follow_the_renormalized_top_k() -> None:
    probs = _softmax(LOGITS.tolist())
    expected = _renormalized(probs, [i < 3 for i in range(len(probs))])  # LOGITS is sorted descending
    _assert_matches(_empirical({"top_k": 3}), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_keeps_the_smallest_prefix_reaching_p(device: str) -> None:
    probs = _softmax(LOGITS.tolist())
    top_p = 0.8
    keep, mass = [], 0.0
    for p in probs:  # sorted descending: keep while the mass before this token is short of top_p
        keep.append(mass < top_p)
        mass += p
    assert 1 < sum(keep) < len(keep)  # the case is not trivial
    _assert_matches(_empirical({"top_p": top_p}, device), _renormalized(probs, keep))


def test_min_p_drops_tokens_below_fraction_of_the_top_probability() -> None:
    probs = _softmax(LOGITS.tolist(), 1.3)
    min_p = 0.3
    keep = [p >= min_p * max(probs) for p in probs]
    assert 1 < sum(keep) < len(keep)
    _assert_matches(_empirical({"min_p": min_p, "temperature": 1.3}), _renormalized(probs, keep))


def test_top_k_and_top_p_combine_with_top_p_over_the_top_k_mass() -> None:
    probs = _softmax(LOGITS.tolist())
    top3 = probs[:3]
    keep, mass = [], 0.0
    for p in top3:
        keep.append(mass < 0.7)
        mass += p / sum(top3)
    keep += [False] * (len(probs) - 3)
    _assert_matches(_empirical({"top_k": 3, "top_p": 0.7}), _renormalized(probs, keep))


def test_top_p_far_down_a_flat_distribution_keeps_exactly_the_reaching_prefix() -> None:
    """Hundreds of tokens survive top_p here, beyond the first candidates the cut-off search looks at."""
    vocab, top_p = 300, 0.9
    logits = torch.linspace(0.0, -3.0, vocab)
    probs = _softmax(logits.tolist())
    kept, mass = 0, 0.0
    while mass < top_p:
        mass += probs[kept]
        kept += 1
    assert kept > 100
    torch.manual_seed(8)
    drawn = {t.token_id for t in sample(logits.repeat(20_000, 1), [_state(top_p=top_p) for _ in range(20_000)])}
    assert max(drawn) == kept - 1 and len(drawn) > 0.95 * kept


def test_tokens_tied_at_the_cut_off_are_all_kept() -> None:
    # three tokens share the top probability; top_k=2 keeps all three rather than two picked by tie order
    logits = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5])
    torch.manual_seed(9)
    states = [_state(top_k=2) for _ in range(DRAWS)]
    tokens = torch.tensor([t.token_id for t in sample(logits.repeat(DRAWS, 1), states)])
    expected = torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64)
    _assert_matches(torch.bincount(tokens, minlength=5).double() / DRAWS, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits(device: str) -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, -0.5, 1.0]], device=device)
    state = _state(prompt=[0, 1], output=[3], repetition_penalty=1.25)
    expected = [2.0 / 1.25, -1.0 * 1.25, 3.0, -0.5 * 1.25, 1.0]
    assert processed_logits(logits, [state])[0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_presence_and_frequency_penalties_count_output_tokens_only(device: str) -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]], device=device)
    # token 0 only in the prompt, token 1 once in the output, token 2 three times
    state = _state(prompt=[0, 0], output=[2, 1, 2, 2], presence_penalty=0.5, frequency_penalty=0.25)
    got = processed_logits(logits, [state])[0].tolist()
    assert got == pytest.approx([1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 3 * 0.25, 1.0])


def test_penalties_follow_tokens_appended_between_steps() -> None:
    logits = torch.zeros(1, 4)
    output: list[int] = []
    state = SamplingState(SamplingParams(frequency_penalty=1.0), [], output, None)
    assert processed_logits(logits, [state])[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    output.append(2)  # the engine appends to the very list it gave the state
    assert processed_logits(logits, [state])[0].tolist() == [0.0, 0.0, -1.0, 0.0]
    output.extend([2, 0])
    assert processed_logits(logits, [state])[0].tolist() == [-1.0, 0.0, -2.0, 0.0]


def test_penalties_apply_only_to_the_rows_that_ask_for_them() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    states = [_state(output=[0, 0], frequency_penalty=1.0), _state(output=[0, 0])]
    got = processed_logits(logits, states).tolist()
    assert got == [[0.0, 1.0, 0.0], [2.0, 1.0, 0.0]]


def test_logit_bias_forces_and_forbids_tokens() -> None:
    torch.manual_seed(3)
    forced = sample(LOGITS.repeat(500, 1), [_state(logit_bias={6: 100.0}) for _ in range(500)])
    assert {t.token_id for t in forced} == {6}
    forbidden = sample(LOGITS.repeat(2000, 1), [_state(logit_bias={0: -100.0, 1: -100.0}) for _ in range(2000)])
    drawn = {t.token_id for t in forbidden}
    assert not drawn & {0, 1} and len(drawn) > 3


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_gives_same_tokens_whatever_else_is_in_the_batch(device: str) -> None:
    vocab, steps = 64, 20
    logits_for = torch.Generator().manual_seed(7)
    step_logits = [torch.randn(vocab, generator=logits_for) for _ in range(steps)]

    def run(batch_neighbours: int) -> list[int]:
        me = _state(temperature=0.9, top_p=0.95, seed=1234)
        me.generator = make_generator(1234, 0, device)
        others = [_state(temperature=1.0, top_k=5) for _ in range(batch_neighbours)]
        others += [_state(temperature=1.0, seed=99)] if batch_neighbours else []
        for o in others:
            o.generator = make_generator(o.params.seed, 0, device) if o.params.seed is not None else None
        for step in range(steps):
            rows = [step_logits[step]] + [torch.randn(vocab) for _ in others]
            token = sample(torch.stack(rows).to(device), [me, *others])[0].token_id
            me.output_ids.append(token)
        return me.output_ids

    alone = run(0)
    assert run(3) == alone
    assert run(7) == alone
    assert len(set(alone)) > 3  # it really sampled


def test_choices_of_one_seeded_request_draw_from_seed_plus_index() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))

    def draws(generator: torch.Generator) -> list[int]:
        st = _state()
        st.generator = generator
        return [sample(logits, [st])[0].token_id for _ in range(10)]

    assert draws(make_generator(5, 1, "cpu")) == draws(make_generator(6, 0, "cpu"))
    assert draws(make_generator(5, 0, "cpu")) != draws(make_generator(5, 1, "cpu"))
    assert make_generator(None, 0, "cpu") is None
    assert make_generator(-1, 0, "cpu") is not None  # any integer is a valid OpenAI seed


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_raw_log_softmax_of_the_model_logits(device: str) -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4)).to(device)
    states = [
        _state(logprobs=True, top_logprobs=5, temperature=0.5, repetition_penalty=1.3, prompt=[1, 2]),
        _state(logprobs=True, temperature=0.0),
        _state(temperature=1.0),
    ]
    expected = torch.log_softmax(logits, dim=-1)
    first, second, third = sample(logits, states)

    assert first.logprob == pytest.approx(expected[0, first.token_id].item(), abs=1e-6)
    top_ids = expected[0].argsort(descending=True)[:5].tolist()
    assert [t for t, _ in first.top] == top_ids
    assert [lp for _, lp in first.top] == pytest.approx(expected[0, top_ids].tolist(), abs=1e-6)
    assert second.logprob == pytest.approx(expected[1].max().item(), abs=1e-6) and second.top == []
    assert third.logprob is None and third.top is None


def test_sampling_leaves_the_callers_logits_untouched() -> None:
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))
    before = logits.clone()
    states = [_state(output=[1, 1], frequency_penalty=1.0, logit_bias={3: 5.0}), _state(repetition_penalty=2.0)]
    sample(logits, states)
    assert torch.equal(logits, before)


def test_half_precision_logits_are_sampled() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    tokens = sample(logits, [_state(temperature=0.0) for _ in range(4)])
    assert [t.token_id for t in tokens] == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_logprobs": -2}, "top_logprobs"),
    ],
)
def test_invalid_parameters_are_rejected_by_name(params: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        _state(**params)


def test_logit_bias_outside_the_vocabulary_is_rejected() -> None:
    with pytest.raises(ValueError, match="logit_bias token ids \\[99\\]"):
        sample(torch.zeros(1, 10), [_state(logit_bias={99: 1.0})])


def test_logits_rows_must_match_the_sequences() -> None:
    with pytest.raises(ValueError, match="2 sequences"):
        sample(torch.zeros(3, 10), [_state(), _state()])


def test_prompt_token_outside_the_vocabulary_is_rejected() -> None:
    with pytest.raises(ValueError, match="prompt token ids"):
        sample(torch.zeros(1, 10), [_state(prompt=[3, 12], repetition_penalty=1.2)])
