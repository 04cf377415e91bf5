"""Logits to tokens for one decode step: every sequence's row processed with its own ``SamplingParams``, in one batch.

Order (as vLLM does it): logit_bias -> repetition / presence / frequency penalties -> greedy argmax, or temperature
-> min_p -> top_k -> top_p -> a random draw. Logprobs are the model's raw log-softmax (before any of that), again as
vLLM reports them by default.

The draw is an exponential race (``argmax(p / E)`` with ``E ~ Exp(1)`` per token), an exact categorical sample that
does not depend on token order. A seeded sequence draws its ``E`` from its own generator, so its tokens depend only on
its seed and its own logits, never on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.wire import SamplingParams

_SEED_MASK = (1 << 64) - 1  # torch seeds are unsigned 64-bit; OpenAI seeds may be any integer
_FIRST_CANDIDATES = 64  # top_k / top_p cut-offs usually lie within a row's first few dozen tokens
_WIDEN = 16  # a flat row needs most of the vocabulary: reach it in few steps, as each partial top-k costs


@dataclass
class SamplingState:
    """One sequence's sampling inputs; lives as long as the sequence. The engine appends each token to output_ids."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # which tokens the prompt holds, built on first use by the repetition penalty
    _prompt_mask: torch.Tensor | None = field(default=None, init=False, repr=False)
    # output_ids as a tensor, extended as the engine appends (penalties would otherwise rebuild it every step)
    _output_tensor: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        validate_params(self.params)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # None unless the request asked for logprobs
    top: list[tuple[int, float]] | None  # the top_logprobs alternatives, best first; [] when logprobs but no top


def validate_params(p: SamplingParams) -> None:
    """Reject sampling parameters this sampler cannot honour, naming the parameter."""
    if p.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {p.top_k}")
    if not 0.0 <= p.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {p.min_p}")
    if p.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    if p.top_logprobs < 0:
        raise ValueError(f"top_logprobs must be >= 0, got {p.top_logprobs}")


def make_generator(seed: int | None, index: int, device: torch.device | str) -> torch.Generator | None:
    """A generator for choice ``index`` of a seeded request (choice i uses seed + i); None when unseeded."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((seed + index) & _SEED_MASK)
    return generator


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[SampledToken]:
    """One token per row of ``logits`` [S, V], row i sampled with ``states[i]``."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be [S, V] with S = {len(states)} sequences, got shape {tuple(logits.shape)}")
    params = [s.params for s in states]
    logits = logits.float()  # no copy when already fp32: every edit below is out of place, the caller's rows stay
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(_wants_logprobs(p) for p in params) else None

    logits = processed_logits(logits, states)

    token_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _filtered_probs(logits[rows], [params[i] for i in sampled_rows])
        token_ids[rows] = _exponential_race(probs, [states[i].generator for i in sampled_rows])
    return _results(token_ids, raw_logprobs, params)


def processed_logits(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Logits after logit_bias and the penalties: what greedy takes the argmax of, before temperature."""
    logits = _apply_logit_bias(logits.float(), [s.params for s in states])
    return _apply_penalties(logits, states)


def _wants_logprobs(p: SamplingParams) -> bool:
    return p.logprobs or p.top_logprobs > 0


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            rows.append(row)
            cols.append(int(token))
            values.append(float(bias))
    if not rows:
        return logits
    vocab = logits.shape[1]
    bad = [c for c in cols if not 0 <= c < vocab]
    if bad:
        raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    return logits.index_put(index, torch.tensor(values, device=logits.device), accumulate=True)


def _apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Repetition (HF/vLLM: over prompt + output) then presence/frequency (OpenAI: over output only).

    Only the rows that ask for a penalty pay for it; a neutral value (1.0, 0.0) leaves a logit bit-for-bit unchanged.
    """
    rows = [i for i, s in enumerate(states) if _has_penalties(s.params)]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    penalized = [states[i] for i in rows]
    index = torch.tensor(rows, device=device)
    sub = logits[index]
    counts = _output_token_counts(penalized, vocab, device)

    repetition = _column([s.params.repetition_penalty for s in penalized], device)
    seen = (counts > 0) | torch.stack([_prompt_mask(s, vocab, device) for s in penalized])
    # dividing a positive logit and multiplying a negative one both make a seen token less likely
    sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)

    frequency = _column([s.params.frequency_penalty for s in penalized], device)
    presence = _column([s.params.presence_penalty for s in penalized], device)
    sub = sub - frequency * counts - presence * (counts > 0).float()
    return logits.index_copy(0, index, sub)


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row parameters as an [S, 1] tensor that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _output_token_counts(states: list[SamplingState], vocab: int, device: torch.device) -> torch.Tensor:
    """[S, V] how often each token occurs in each sequence's output: one accumulate over all outputs at once."""
    counts = torch.zeros((len(states), vocab), device=device)
    outputs = [_output_tensor(s) for s in states]
    lengths = [t.numel() for t in outputs]
    total = sum(lengths)
    if total:
        ids = torch.cat(outputs).to(device)
        row_of_id = torch.arange(len(states), device=device)
        row_of_id = row_of_id.repeat_interleave(torch.tensor(lengths, device=device), output_size=total)
        counts.index_put_((row_of_id, ids), torch.ones_like(ids, dtype=counts.dtype), accumulate=True)
    return counts


def _output_tensor(state: SamplingState) -> torch.Tensor:
    """The output ids as a CPU tensor, extended by only the tokens appended since the last step."""
    cached, count = state._output_tensor, len(state.output_ids)
    if cached is None or cached.numel() > count:  # first use, or the list was replaced by a shorter one
        cached = torch.tensor(state.output_ids, dtype=torch.long)
    elif cached.numel() < count:
        cached = torch.cat([cached, torch.tensor(state.output_ids[cached.numel() :], dtype=torch.long)])
    state._output_tensor = cached
    return cached


def _prompt_mask(state: SamplingState, vocab: int, device: torch.device) -> torch.Tensor:
    """[V] bool: which tokens occur in the prompt; built once per sequence, the prompt never changes."""
    mask = state._prompt_mask
    if mask is None or mask.device != device or mask.numel() != vocab:
        ids = torch.tensor(state.prompt_ids, dtype=torch.long)
        low, high = (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0)
        if not 0 <= low <= high < vocab:
            raise ValueError(f"prompt token ids must lie in the vocabulary [0, {vocab}), got ids from {low} to {high}")
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[ids] = True
        mask = state._prompt_mask = mask.to(device)
    return mask


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then min_p, top_k and top_p; rows renormalize over the tokens they keep."""
    device = logits.device
    temperature = _column([p.temperature for p in params], device)
    probs = torch.softmax(logits / temperature, dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = _column([p.min_p for p in params], device)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    probs = _apply_top_k_top_p(probs, params)
    return probs / probs.sum(dim=-1, keepdim=True)


def _apply_top_k_top_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero the tokens below each row's cut-off: top_k first, then top_p over the mass top_k left.

    top_p keeps the smallest most-likely prefix whose mass reaches p (a token stays while the mass before it is short
    of p). The cut is applied as a probability, not a position, so tokens tied with the last kept one stay as well and
    the kept set never depends on how ties happen to be ordered. It is found among each row's largest probabilities,
    a partial top-k that is far cheaper than sorting the whole vocabulary, widened until every row's cut lies inside.
    """
    vocab, device = probs.shape[1], probs.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if min(top_k) == vocab and all(p.top_p >= 1.0 for p in params):
        return probs
    k = torch.tensor(top_k, device=device).unsqueeze(1)
    top_p = _column([p.top_p for p in params], device)
    whole_row_mass = probs.sum(dim=-1, keepdim=True)
    width = min(vocab, max([_FIRST_CANDIDATES, *(x for x in top_k if x < vocab)]))
    while True:
        largest = probs.topk(width, dim=-1).values  # [S, width], descending
        rank = torch.arange(width, device=device).unsqueeze(0)
        largest = largest.masked_fill(rank >= k, 0.0)
        mass = torch.where(k < vocab, largest.sum(dim=-1, keepdim=True), whole_row_mass)
        mass_before = (largest.cumsum(dim=-1) - largest) / mass
        kept = ((mass_before < top_p) | (top_p >= 1.0)) & (rank < k)
        n_kept = kept.sum(dim=-1, keepdim=True)
        settled = (n_kept < width) | (k <= width) | (top_p >= 1.0)
        if width == vocab or bool(settled.all()):
            break
        width = min(vocab, width * _WIDEN)
    cut = largest.gather(1, (n_kept - 1).clamp(min=0))
    cut = cut.masked_fill((k >= vocab) & (top_p >= 1.0), 0.0)  # rows that filter nothing
    return probs.masked_fill(probs < cut, 0.0)


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Row-wise categorical draws: argmax(p / E) with E = -log(U) ~ Exp(1); seeded rows use their own generator."""
    uniform = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        uniform[unseeded] = torch.rand((len(unseeded), probs.shape[1]), device=probs.device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row].uniform_(generator=generator)
    # -log(U) rather than exponential_(): several times faster on CPU. U < 1, so E > 0 and a zero-probability token
    # scores 0 (or 0/inf when U = 0), never NaN, and can never beat a token that has probability.
    return (probs / uniform.log_().neg_()).argmax(dim=-1)


def _results(
    token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, params: list[SamplingParams]
) -> list[SampledToken]:
    ids = token_ids.tolist()
    if raw_logprobs is None:
        return [SampledToken(t, None, None) for t in ids]
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    widest = min(max(p.top_logprobs for p in params), raw_logprobs.shape[1])
    top_values, top_ids = raw_logprobs.topk(widest, dim=-1)  # widest may be 0: empty rows
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out = []
    for row, p in enumerate(params):
        if _wants_logprobs(p):
            top = list(zip(top_ids[row][: p.top_logprobs], top_values[row][: p.top_logprobs], strict=True))
            out.append(SampledToken(ids[row], chosen[row], top))
        else:
            out.append(SampledToken(ids[row], None, None))
    return out


def verify_token(logits: torch.Tensor, state: SamplingState, draft: int | None) -> SampledToken:
    """The token one position of a speculative chunk yields, given the proposer's guess ``draft`` for it.

    ``logits`` [1, V] are the target model's at that position, ``state`` already holds every token before it, so
    logit_bias, penalties, temperature and the cut-offs apply exactly as in ``sample``. Greedy: the argmax (the guess
    is kept when it is the argmax). Sampled, with the guess a point mass q: keep it with probability p(guess), else
    draw from the residual max(0, p - q), i.e. p without the guess, renormalized; the token is distributed as p
    either way. No guess (the bonus position): a plain draw. Returns the token with its logprobs as ``sample`` does.
    """
    p = state.params
    if draft is None or p.greedy:
        return sample(logits, [state])[0]
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if _wants_logprobs(p) else None
    probs = _filtered_probs(processed_logits(logits, [state]), [p])
    accept = float(torch.rand((), generator=state.generator, device=probs.device)) < float(probs[0, draft])
    if accept:
        token = torch.tensor([draft], device=probs.device)
    else:
        residual = probs.clone()
        residual[0, draft] = 0.0
        token = _exponential_race(residual / residual.sum(dim=-1, keepdim=True), [state.generator])
    return _results(token, raw_logprobs, [p])[0]
