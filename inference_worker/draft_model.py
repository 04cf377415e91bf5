"""The draft-model proposer: a smaller model with the target's vocabulary guesses the next tokens greedily.

It runs on the worker's device next to the target, with a paged KV cache of its own, and is incremental: per sequence
it remembers which tokens its cache holds, so each engine step it only feeds what is new. One ``propose`` call
advances every requesting sequence together:

1. roll back: the guesses the target rejected are cut from the draft's cache (it keeps the longest common prefix of
   the tokens it cached and the sequence's real tokens; pages past that are freed);
2. catch up: one batched forward (chunked by ``max_batch_tokens``) feeds each sequence the real tokens its cache
   lacks: the whole prompt the first time, afterwards the last kept guesses and the target's own token;
3. guess: the argmax after the last real token is guess 1; k - 1 batched one-token forwards feed each guess to get the
   next. The last guess is never fed: if the target keeps it, the next catch-up feeds it.

When the draft cache is full, a sequence gets fewer guesses, or none; the request never fails for it.

On CUDA the guess forwards (one token per sequence) and the usual catch-ups (one or two tokens per sequence, shorter
ones padded into a scratch page of the draft cache) replay CUDA graphs (inference_worker/cuda_graphs.py); a first
catch-up over a whole prompt runs eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from inference_worker.batch import Chunk, ForwardBatch, build_batch, padded_chunk, pages_for
from inference_worker.cuda_graphs import DecodeGraphs
from inference_worker.kv_cache import PagedKVCache
from inference_worker.prefix_cache import PagePool
from inference_worker.speculative import DraftRequest, Proposer


@dataclass(eq=False)
class _DraftSeq:
    """One sequence as the draft cache holds it."""

    pages: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # token ids whose K/V are in the draft cache, position by position


@dataclass(eq=False)
class _Proposal:
    """One sequence's part of a ``propose`` call."""

    state: _DraftSeq
    token_ids: list[int]  # the sequence's real tokens
    num_guesses: int  # what the request asked for, cut to what the draft cache has room for
    guesses: list[int] = field(default_factory=list)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case (nothing rejected), compared in C
        return n
    return int(np.argmax(np.asarray(a[:n]) != np.asarray(b[:n])))


class DraftModelProposer(Proposer):
    """Greedy guesses from ``model`` (anything ``loader.load_model`` builds), cached in ``cache_tokens`` tokens of
    its own paged KV cache on ``device``."""

    method = "draft"

    def __init__(
        self,
        model: Any,
        model_config: Any,
        cache_tokens: int,
        page_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
        max_batch_tokens: int = 2048,
        graphs: str = "off",
        max_seqs: int = 16,
        max_model_len: int = 2048,
    ) -> None:
        """``graphs``: "auto" replays uniform forwards from CUDA graphs, "static" runs the graphs' buffers without
        capturing (tests), "off" runs every forward eagerly; sized for ``max_seqs`` sequences of ``max_model_len``."""
        num_pages = cache_tokens // page_size
        if num_pages < 1:
            raise ValueError(f"the draft cache of {cache_tokens} tokens is less than one page of {page_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model = model
        self.vocab_size = int(model_config.vocab_size)
        self.page_size = page_size
        self.device = torch.device(device)
        self.max_batch_tokens = max_batch_tokens
        self.pool = PagePool(num_pages, caching=False)  # a plain free list: drafts share no prefixes
        self.cache = PagedKVCache(
            model_config.num_hidden_layers,
            num_pages + (graphs != "off"),  # the graphs' scratch page, which the pool never hands out
            page_size,
            model_config.num_key_value_heads,
            model_config.head_dim,
            dtype,
            self.device,
        )
        self._seqs: dict[str, _DraftSeq] = {}
        self.graphs = None
        if graphs != "off":
            self.graphs = DecodeGraphs(
                model,
                self.cache,
                max_seqs,
                max_model_len,
                scratch_page=num_pages,
                num_heads=model_config.num_attention_heads,
                max_query=min(2, page_size),
                capture=graphs == "auto",
            )

    # -- what tests and logs may look at ---------------------------------------------------------------------------
    def cached_tokens(self, seq_id: str) -> list[int]:
        """The tokens of ``seq_id`` whose K/V the draft cache holds (empty for a sequence it does not know)."""
        seq = self._seqs.get(seq_id)
        return list(seq.cached) if seq else []

    def num_pages_held(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return len(seq.pages) if seq else 0

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    # -- the Proposer interface ------------------------------------------------------------------------------------
    def propose(self, requests: list[DraftRequest]) -> list[list[int]]:
        token_ids = [list(r.token_ids) for r in requests]
        states = [self._seqs.setdefault(r.seq_id, _DraftSeq()) for r in requests]
        for state, tokens in zip(states, token_ids, strict=True):  # all first: rollbacks free pages for the others
            self._roll_back(state, tokens)
        proposals: list[_Proposal | None] = []
        for state, tokens, request in zip(states, token_ids, requests, strict=True):
            num_guesses = self._reserve(state, len(tokens), request.num_tokens) if tokens else 0
            proposals.append(_Proposal(state, tokens, num_guesses) if num_guesses else None)
        active = [p for p in proposals if p is not None]
        if active:
            with torch.inference_mode():
                self._catch_up(active)
                self._guess_rest(active)
        return [p.guesses if p else [] for p in proposals]

    def forget(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self.pool.release(reversed(seq.pages))

    # -- cache bookkeeping -----------------------------------------------------------------------------------------
    def _roll_back(self, seq: _DraftSeq, token_ids: list[int]) -> None:
        """Cut what the draft cached back to the real tokens it shares with the sequence, always leaving the last
        real token to feed again (its logits give the first guess)."""
        keep = min(common_prefix_length(seq.cached, token_ids), len(token_ids) - 1)
        del seq.cached[max(keep, 0) :]
        self._free_pages_past(seq, len(seq.cached))

    def _free_pages_past(self, seq: _DraftSeq, num_tokens: int) -> None:
        keep = pages_for(num_tokens, self.page_size)
        if len(seq.pages) > keep:
            self.pool.release(reversed(seq.pages[keep:]))
            del seq.pages[keep:]

    def _reserve(self, seq: _DraftSeq, num_tokens: int, num_guesses: int) -> int:
        """Pages to cache all ``num_tokens`` real tokens plus the guesses fed after them (all but the last guess);
        the number of guesses the free pages allow (0: not even the real tokens fit)."""
        room = (len(seq.pages) + self.pool.num_free) * self.page_size
        num_guesses = min(num_guesses, room - num_tokens + 1)
        if num_guesses < 1:
            return 0
        needed = pages_for(num_tokens + num_guesses - 1, self.page_size) - len(seq.pages)
        if needed > 0:
            seq.pages.extend(self.pool.allocate(needed))
        return num_guesses

    # -- forwards --------------------------------------------------------------------------------------------------
    def _catch_up(self, proposals: list[_Proposal]) -> None:
        """Feed every sequence the real tokens its draft cache lacks; the argmax after the last one is its first
        guess. More tokens than ``max_batch_tokens`` go in several forwards, each sequence's in order."""
        pending = proposals
        while pending:
            budget = self.max_batch_tokens
            feeds: list[tuple[_Proposal, list[int]]] = []
            for p in pending:
                if budget == 0:
                    break
                start = len(p.state.cached)
                chunk = p.token_ids[start : start + budget]
                feeds.append((p, chunk))
                budget -= len(chunk)
            next_tokens = self._forward([(p.state, chunk) for p, chunk in feeds])
            for (p, _), token in zip(feeds, next_tokens, strict=True):
                p.guesses = [token]  # only the last chunk's (after the last real token) survives
            pending = [p for p in pending if len(p.state.cached) < len(p.token_ids)]

    def _guess_rest(self, proposals: list[_Proposal]) -> None:
        """Guesses 2..k: feed each sequence its latest guess, one token per sequence per forward."""
        while True:
            growing = [p for p in proposals if len(p.guesses) < p.num_guesses]
            if not growing:
                return
            next_tokens = self._forward([(p.state, p.guesses[-1:]) for p in growing])
            for p, token in zip(growing, next_tokens, strict=True):
                p.guesses.append(token)

    def _forward(self, feeds: list[tuple[_DraftSeq, list[int]]]) -> list[int]:
        """One ragged forward appending each sequence's new tokens to its draft cache (pages already reserved); the
        argmax after each sequence's last new token. Short feeds (a guess, a catch-up of a token or two) go through
        the graphs, shorter ones padded to the longest with tokens whose K/V land in the scratch page."""
        q = max(len(tokens) for _, tokens in feeds)
        logits = None
        if self.graphs is not None and q <= self.graphs.max_query:
            batch = self._batch(feeds, pad_to=q)
            if self.graphs.eligible(batch):
                rows = torch.tensor([i * q + len(tokens) - 1 for i, (_, tokens) in enumerate(feeds)])
                logits = self.graphs.forward(batch)[rows.to(self.device)]
        if logits is None:
            logits = self.model.forward(self._batch(feeds), self.cache)
        for seq, tokens in feeds:
            seq.cached.extend(tokens)
        return logits.argmax(dim=-1).tolist()

    def _batch(self, feeds: list[tuple[_DraftSeq, list[int]]], pad_to: int = 0) -> ForwardBatch:
        """The forward over ``feeds``; ``pad_to`` feeds every sequence that many tokens and asks for every row's
        logits, as a graph step does (``batch.padded_chunk``)."""
        ps = self.page_size
        chunks = []
        for seq, tokens in feeds:
            positions = list(range(len(seq.cached), len(seq.cached) + len(tokens)))
            slots = [seq.pages[p // ps] * ps + p % ps for p in positions]
            chunk = Chunk(tokens, positions, slots, seq.pages)
            if pad_to:
                assert self.graphs is not None
                chunk = padded_chunk(chunk, pad_to, self.graphs.scratch_slot)
            chunks.append(chunk)
        return build_batch(chunks, self.device)
