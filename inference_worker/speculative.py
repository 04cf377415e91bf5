"""Speculative decoding: cheap guesses of a sequence's next tokens, verified by the target model in the batched step.

A *proposer* guesses up to k tokens per decoding sequence. The engine feeds ``[last token, guess 1..k]`` as one chunk
of the step's ragged forward (the chunked-prefill path), gets logits at every position, and keeps the guesses the
target model agrees with (inference_worker/sampling.py ``verify_token``), plus one token of its own. Greedy output is
unchanged; sampled output keeps the target distribution.

Proposers here:
- ``NgramProposer`` (prompt lookup): the tokens that followed the latest earlier occurrence of the sequence's suffix;
  free, and very good on copy-heavy work (quoting, code edits, extraction).

``AdaptiveDraftLength`` keeps each sequence's k in line with how often its guesses are accepted, and switches
speculation off for a sequence while it does not pay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
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

    @abstractmethod
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        """Per request, at most ``num_tokens`` guessed next tokens (possibly none)."""

    def forget(self, seq_id: str) -> None:  # noqa: B027 - optional hook: stateless proposers keep nothing
        """The sequence finished or was preempted: drop whatever was kept for it."""


class NgramProposer(Proposer):
    """Prompt lookup: find the sequence's last n tokens earlier in its prompt + output (n from ``max_ngram`` down to
    ``min_ngram``, latest occurrence first) and propose what followed them there."""

    method = "ngram"

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


class AdaptiveDraftLength:
    """One sequence's draft length, following an exponential moving average of its acceptance rate.

    High acceptance grows k towards the request's maximum, low acceptance shrinks it; when even one guessed token is
    rarely right, speculation pauses for ``cooldown`` steps (the verify rows cost compute for nothing), then probes
    again with one token.
    """

    SMOOTHING = 0.3  # weight of the newest verification
    GROW_ABOVE = 0.7
    SHRINK_BELOW = 0.4
    PAUSE_BELOW = 0.15
    COOLDOWN_STEPS = 16

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.num_tokens = max_tokens
        self.acceptance = 0.5  # neutral start: neither grow nor shrink on no evidence
        self.paused_steps = 0

    def next_length(self) -> int:
        """How many tokens to ask the proposer for this step (0: not speculating now)."""
        if self.paused_steps > 0:
            self.paused_steps -= 1
            return 0
        return self.num_tokens

    def update(self, proposed: int, accepted: int) -> None:
        """After verifying ``proposed`` guessed tokens, of which the first ``accepted`` were kept."""
        if proposed < 1:
            return
        rate = accepted / proposed
        self.acceptance = self.SMOOTHING * rate + (1 - self.SMOOTHING) * self.acceptance
        if self.acceptance < self.PAUSE_BELOW:
            self.paused_steps = self.COOLDOWN_STEPS
            self.num_tokens, self.acceptance = 1, 0.5  # the probe after the pause starts small, without history
        elif self.acceptance < self.SHRINK_BELOW:
            self.num_tokens = max(1, self.num_tokens - 1)
        elif self.acceptance > self.GROW_ABOVE:
            self.num_tokens = min(self.max_tokens, self.num_tokens + 1)


class SpeculationGovernor:
    """Speculate only where it has paid, by measurement: whether guessing beats plain decoding depends on the model,
    the device, the batch size and the acceptance, so the engine times both.

    Per batch size (bucketed by the caller), it keeps moving averages of a decode step's seconds with guesses and
    without, and of the tokens a guessing step yields per sequence. It speculates while either is unmeasured, then
    whenever ``tokens / seconds`` with guesses beats ``1 / seconds`` without; every ``PROBE_EVERY`` decisions at a
    batch size it takes the other choice for ``PROBE_STEPS`` steps, so a change in acceptance or load is noticed.
    The first guessing step after plain ones is not timed: a draft model catches up on everything it missed there,
    a cost that steady speculation does not pay again.
    """

    SMOOTHING = 0.25
    PROBE_EVERY = 32
    PROBE_STEPS = 2  # a guessing probe needs two steps: the first is not timed

    def __init__(self) -> None:
        self._plain_s: dict[int, float] = {}
        self._spec_s: dict[int, float] = {}
        self._spec_tokens: dict[int, float] = {}  # tokens per sequence of a guessing step
        self._decisions: dict[int, int] = {}
        self._last_speculated: dict[int, bool] = {}

    def should_speculate(self, bucket: int) -> bool:
        n = self._decisions[bucket] = self._decisions.get(bucket, 0) + 1
        if bucket not in self._spec_s:
            return True
        if bucket not in self._plain_s:
            return False
        pays = self._spec_tokens[bucket] / self._spec_s[bucket] > 1.0 / self._plain_s[bucket]
        return pays != (n % self.PROBE_EVERY < self.PROBE_STEPS)

    def record(self, bucket: int, speculated: bool, seconds: float, tokens_per_seq: float) -> None:
        """A decode-only step at ``bucket`` took ``seconds`` and gave each sequence ``tokens_per_seq`` tokens."""
        resumed = speculated and not self._last_speculated.get(bucket, False)
        self._last_speculated[bucket] = speculated
        if resumed:
            return  # it paid a draft model's catch-up on the steps it skipped
        if speculated:
            self._spec_s[bucket] = self._average(self._spec_s.get(bucket), seconds)
            self._spec_tokens[bucket] = self._average(self._spec_tokens.get(bucket), tokens_per_seq)
        else:
            self._plain_s[bucket] = self._average(self._plain_s.get(bucket), seconds)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.SMOOTHING * new + (1 - self.SMOOTHING) * old
