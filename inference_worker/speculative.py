"""Speculative decoding: cheap guesses of a sequence's next tokens, verified by the target model in the batched step.

A *proposer* guesses up to k tokens per decoding sequence. The engine feeds ``[last token, guess 1..k]`` as one chunk
of the step's ragged forward (the chunked-prefill path), gets logits at every position, and keeps the guesses the
target model agrees with (inference_worker/sampling.py ``verify_token``), plus one token of its own. Greedy output is
unchanged; sampled output keeps the target distribution.

Proposers here:
- ``NgramProposer`` (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's suffix;
  free, and very good on copy-heavy work (quoting, code edits, extraction).

``AdaptiveDraftLength`` keeps each sequence's k in line with how often its guesses are accepted, and switches
speculation off for a sequence while it does not pay; ``SpeculationPlanner`` caps the whole batch's guesses (down to
none) by what steps with and without them measurably cost at the current batch size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.wire import check_speculative


@dataclass
class DraftRequest:
    seq_id: str
    token_ids: Sequence[int]  # prompt + output so far
    num_tokens: int  # the most tokens to propose


class Proposer(ABC):
    """Guesses the next tokens of many sequences at once (one call per engine step)."""

    method: str
    cheap: bool = False  # guessing costs next to nothing: the engine guesses before deciding how many to verify

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        """Per request, at most ``num_tokens`` guessed next tokens (possibly none)."""

    def forget(self, seq_id: str) -> None:  # noqa: B027 - optional hook: stateless proposers keep nothing
        """The sequence finished or was preempted: drop whatever was kept for it."""


class NgramProposer(Proposer):
    """Prompt lookup: find the sequence's last n tokens earlier in its prompt + output (n from ``max_ngram`` down to
    ``min_ngram``, latest occurrence first) and propose what followed them there."""

    method = "ngram"
    cheap = True

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        return [self.lookup(r.token_ids, r.num_tokens) for r in requests]

    def lookup(self, token_ids: Sequence[int], k: int) -> list[int]:
        if k < 1 or len(token_ids) < 2:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            # windows that start early enough to have at least one token after them, the suffix itself excluded
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if starts.size:
                follow = int(starts[-1]) + n
                return tokens[follow : follow + k].tolist()
        return []


@dataclass
class SpecRequest:
    """One request's speculative settings, resolved against the worker's defaults."""

    method: str
    num_tokens: int

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.num_tokens > 0


def resolve_request(
    override: Mapping[str, Any] | None, default_method: str, default_tokens: int, available: Sequence[str]
) -> SpecRequest:
    """A request's ``speculative`` field ({"method", "num_tokens"}, both optional) over the worker's defaults, both
    checked by ``wire.check_speculative``. ValueError names what is wrong; ``available`` are the methods this worker
    can run."""
    override = check_speculative(override) or {}
    merged = check_speculative({"method": default_method, "num_tokens": default_tokens, **override})
    assert merged is not None
    method, num_tokens = merged["method"], merged["num_tokens"]
    if method != "off" and method not in available:
        raise ValueError(f"speculative method {method!r} is not available on this worker (it has {list(available)})")
    return SpecRequest(method, num_tokens)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification of ``k`` guesses yields when each guess is right with probability ``alpha`` (given
    the ones before it were): the run of kept guesses plus the target's own token."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class KeptRate:
    """The chance that a guess is right given the ones before it were, from verifications that stop at the first
    miss: moving sums of kept guesses over kept guesses plus the misses that ended runs."""

    def __init__(self, alpha: float, smoothing: float) -> None:
        self.smoothing = smoothing
        self._kept, self._trials = alpha, 1.0

    @property
    def alpha(self) -> float:
        return self._kept / self._trials

    def update(self, proposed: int, accepted: int) -> None:
        trials = accepted + (accepted < proposed)  # each kept guess, and the miss that ended the run (if any)
        self._kept = self.smoothing * accepted + (1 - self.smoothing) * self._kept
        self._trials = self.smoothing * trials + (1 - self.smoothing) * self._trials


class AdaptiveDraftLength:
    """One sequence's draft length, following an exponential moving average of its acceptance rate.

    High acceptance grows k towards the request's maximum, low acceptance shrinks it; when even one guessed token is
    rarely right, speculation pauses for ``cooldown`` steps (the verify rows cost compute for nothing), then probes
    again with one token.

    It also keeps what the batch-level ``SpeculationPlanner`` needs to price this sequence's guesses: ``alpha``, the
    chance that a guess is right given the ones before it were (moving sums of kept guesses over kept guesses plus
    rejections: the estimate for a run that stops at the first miss), and ``hit_rate``, how often the proposer had
    anything to offer (n-gram lookup often has nothing).
    """

    SMOOTHING = 0.3  # weight of the newest verification
    GROW_ABOVE = 0.7
    SHRINK_BELOW = 0.4
    PAUSE_BELOW = 0.15
    COOLDOWN_STEPS = 16

    def __init__(self, max_tokens: int, prior_alpha: float = 0.5) -> None:
        self.max_tokens = max_tokens
        self.num_tokens = max_tokens
        self.acceptance = 0.5  # neutral start: neither grow nor shrink on no evidence
        self.paused_steps = 0
        # alpha starts where this method's sequences have been (AcceptancePrior): a pessimistic start would have the
        # planner verify no guesses, and a sequence that never guesses never shows what it could do
        self.kept_rate = KeptRate(prior_alpha, self.SMOOTHING)
        self.hit_rate = 1.0

    @property
    def alpha(self) -> float:
        return self.kept_rate.alpha

    def next_length(self) -> int:
        """How many tokens to ask the proposer for this step (0: not speculating now)."""
        if self.paused_steps > 0:
            self.paused_steps -= 1
            return 0
        return self.num_tokens

    def expected_tokens(self, k: int, guessed: bool = False) -> float:
        """What asking for ``k`` guesses is expected to yield this step, the target's own token included;
        ``guessed``: the ``k`` guesses are already in hand (a cheap proposer was asked first)."""
        hit = 1.0 if guessed else self.hit_rate
        return 1.0 + hit * (expected_tokens(self.alpha, k) - 1.0)

    def proposed(self, num_tokens: int) -> None:
        """The proposer, asked for guesses, offered ``num_tokens``."""
        self.hit_rate = self.SMOOTHING * (num_tokens > 0) + (1 - self.SMOOTHING) * self.hit_rate

    def update(self, proposed: int, accepted: int) -> None:
        """After verifying ``proposed`` guessed tokens, of which the first ``accepted`` were kept."""
        if proposed < 1:
            return
        self.kept_rate.update(proposed, accepted)
        rate = accepted / proposed
        self.acceptance = self.SMOOTHING * rate + (1 - self.SMOOTHING) * self.acceptance
        if self.acceptance < self.PAUSE_BELOW:
            self.paused_steps = self.COOLDOWN_STEPS
            self.num_tokens, self.acceptance = 1, 0.5  # the probe after the pause starts small, without history
        elif self.acceptance < self.SHRINK_BELOW:
            self.num_tokens = max(1, self.num_tokens - 1)
        elif self.acceptance > self.GROW_ABOVE:
            self.num_tokens = min(self.max_tokens, self.num_tokens + 1)


class AcceptancePrior:
    """Per proposer method, how often its guesses have been right across all sequences (a slow moving average of
    the same kept / (kept + misses) estimate as ``AdaptiveDraftLength.alpha``): where a new sequence starts."""

    SMOOTHING = 0.02

    def __init__(self) -> None:
        self._rates: dict[str, KeptRate] = {}

    def alpha(self, method: str) -> float:
        return self._rates[method].alpha if method in self._rates else 0.5

    def update(self, method: str, proposed: int, accepted: int) -> None:
        if proposed >= 1:
            self._rates.setdefault(method, KeptRate(0.5, self.SMOOTHING)).update(proposed, accepted)


class SpeculationPlanner:
    """How many guesses the batch may verify this step, chosen by measured cost.

    Whether guessing pays depends on the model, the device, the batch size and each sequence's acceptance, so the
    planner measures rather than assumes. It keeps, per batch size (bucketed by the caller) and per tokens fed per
    sequence ``q`` (1 without guesses, k + 1 with k), a moving average of a decode step's seconds, proposing and
    verifying included. For each cap k on the guesses it prices the step as the tokens the sequences are expected
    to keep (``AdaptiveDraftLength.expected_tokens``) over the seconds of a step at ``q = k + 1``, and picks the cap
    with the most tokens per second: 0 switches speculation off for the batch.

    Shapes never timed are tried first (each until it has ``MIN_SAMPLES`` timings, or was chosen ``MIN_SAMPLES``
    times: short proposals may never fill it); a shape is priced at the least time measured for it or any larger
    one. With a draft model among the guessers a choice holds for ``HOLD_STEPS`` decisions.
    Every ``PROBE_EVERY`` decisions at a batch size it takes the runner-up for ``PROBE_STEPS`` steps, so a choice
    whose timing went stale gets measured again. The first guessing step after a plain one is not timed: a draft
    model catches up there on every token it missed, a cost steady guessing does not pay again.
    """

    SMOOTHING = 0.25
    MIN_SAMPLES = 2
    PROBE_EVERY = 48
    PROBE_STEPS = 2  # a probe of guessing needs two steps: the first is not timed
    HOLD_STEPS = 16  # with a draft model guessing, a choice holds this many decisions (see choose)

    def __init__(self) -> None:
        self._seconds: dict[tuple[int, int], float] = {}  # (bucket, q) -> moving average of a step's seconds
        self._samples: dict[tuple[int, int], int] = {}
        self._chosen: dict[tuple[int, int], int] = {}  # times a cap of q - 1 was chosen
        self._decisions: dict[int, int] = {}
        self._last_q: dict[int, int] = {}
        self._held: dict[int, tuple[int, int]] = {}  # bucket -> (cap, decisions it still holds for)
        self.trace: list[tuple] | None = None  # a benchmark sets a list: (why, bucket, cap, {cap: tokens/s}) per choice

    def choose(
        self,
        bucket: int,
        expected: Sequence[Callable[[int], float]],
        lengths: Sequence[int],
        num_plain: int,
        sticky: bool = False,
    ) -> int:
        """The cap on guesses per sequence for a step of ``bucket`` rows in which some sequences would guess up to
        ``lengths`` tokens each, expecting ``expected[i](k)`` tokens from a verification of k guesses, and
        ``num_plain`` sequences decode one token whatever is chosen. ``sticky``: a proposer with state of its own
        (a draft model) guesses here; a choice then holds for ``HOLD_STEPS`` decisions, because a draft model left
        idle must catch up on every token it skipped when guessing resumes, a cost no single step shows."""
        most = max(lengths, default=0)
        if most < 1:
            return 0
        n = self._decisions[bucket] = self._decisions.get(bucket, 0) + 1
        held = self._held.get(bucket)
        if sticky and held is not None and held[1] > 0:
            self._held[bucket] = (held[0], held[1] - 1)
            return min(held[0], most)
        for cap in range(most, -1, -1):  # untimed shapes first, the most guesses first
            key = (bucket, cap + 1)
            if self._samples.get(key, 0) < self.MIN_SAMPLES and self._chosen.get(key, 0) < self.MIN_SAMPLES:
                self._chosen[key] = self._chosen.get(key, 0) + 1
                if self.trace is not None:
                    self.trace.append(("explore", bucket, cap, {}))
                return cap
        rates = {}
        for cap in range(most + 1):
            tokens = num_plain + sum(e(min(cap, k)) for e, k in zip(expected, lengths, strict=True))
            rates[cap] = tokens / max(self.seconds(bucket, cap + 1), 1e-9)
        ranked = sorted(rates, key=rates.__getitem__, reverse=True)
        probe = len(ranked) > 1 and n % self.PROBE_EVERY < self.PROBE_STEPS
        chosen = ranked[int(probe)]
        if sticky and not probe:
            self._held[bucket] = (chosen, self.HOLD_STEPS - 1)
        if self.trace is not None:
            self.trace.append(("probe" if probe else "best", bucket, chosen, rates))
        return chosen

    def seconds(self, bucket: int, q: int) -> float:
        """The seconds of a decode step of ``bucket`` rows feeding ``q`` tokens per sequence: the least measured at
        ``q`` or more (feeding fewer tokens never costs more; this also keeps one slow outlier from blocking a
        shape), priced from the timed shapes below it when none above is timed; 0.0 when nothing at that batch size
        is timed yet."""
        timed = sorted(tq for b, tq in self._seconds if b == bucket)
        above = [self._seconds[(bucket, tq)] for tq in timed if tq >= q]
        if above:
            return min(above)
        below = [tq for tq in timed if tq < q]
        return self._seconds[(bucket, below[-1])] if below else 0.0

    def record(self, bucket: int, q: int, seconds: float) -> None:
        """A decode-only step of ``bucket`` rows fed ``q`` tokens per sequence (1 + its most guesses) in ``seconds``."""
        resumed = q > 1 and self._last_q.get(bucket, 1) == 1
        self._last_q[bucket] = q
        if resumed:
            return  # it paid a draft model's catch-up on the steps it skipped
        key = (bucket, q)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else self.SMOOTHING * seconds + (1 - self.SMOOTHING) * old
        self._samples[key] = self._samples.get(key, 0) + 1
