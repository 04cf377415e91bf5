"""Continuous-batching scheduler: which sequences run this step, how many new tokens each gets, and which KV pages.

Pure bookkeeping with no torch (vLLM v1 style), so it is unit-tested with plain Python; the engine turns a StepPlan
into a ForwardBatch and runs it. Policy, per step, under ``max_batch_size`` sequences and ``max_batch_tokens`` tokens:

1. every running sequence that is decoding gets its one token first;
2. running sequences still prefilling get chunks of the remaining token budget (chunked prefill);
3. waiting sequences are admitted strictly FIFO while slots, budget and pages for their first chunk allow.

Pages are allocated on demand as a sequence's cached length grows. When a running sequence needs a page and none is
free, the most recently admitted running sequence is preempted: its pages are freed and it goes back to the front of
the waiting queue, to be recomputed later from prompt + the tokens generated so far. Nothing is ever dropped.

Speculative decoding: ``schedule(drafts)`` feeds a decoding sequence its guessed next tokens after its last one, as
long as budget and free pages allow (never preempting for a guess). Their K/V are written but not counted in
``num_computed`` until the engine keeps them one by one (``accept_draft_token``); ``discard_draft_pages`` then frees the
pages only rejected guesses used. So ``num_computed`` only ever counts verified tokens and the prefix cache, which
publishes from it, never sees a guess.

Prefix reuse (inference_worker/prefix_cache.py): a sequence being admitted first takes the cached pages that hold the
longest prefix of its known tokens, and computes only the rest. Full pages are published to the cache once the
forward that wrote them is done (at the next ``schedule``, or when the sequence finishes or is preempted), so a page
is never found before its K/V exist; a page that is shared is full, so nobody ever writes into it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from inference_worker.batch import pages_for
from inference_worker.prefix_cache import PageHash, PagePool, page_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class CapacityError(ValueError):
    """A sequence that can never fit in the whole KV cache, however empty."""


@dataclass(eq=False)
class Sequence:
    """One generated choice: its known tokens, how many of them have K/V in the cache, and the pages holding them."""

    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache (the newest sampled token never is until fed)
    pages: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # tokens its last admission found in the prefix cache instead of computing them
    # Names of the full pages of its known tokens (prefix_cache.page_hash), filled lazily. Tokens are only ever
    # appended (speculative guesses never become known tokens unless kept), so they stay valid.
    page_hashes: list[PageHash] = field(default_factory=list)
    num_published_pages: int = 0  # leading pages of ``pages`` already registered in the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    def tokens(self, start: int, stop: int) -> list[int]:
        """Known token ids in positions [start, stop) of prompt + output."""
        n_prompt = len(self.prompt_ids)
        if stop <= n_prompt:
            return self.prompt_ids[start:stop]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : stop - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[: stop - n_prompt]


@dataclass
class ScheduledSeq:
    """One sequence's part of a step: everything the forward needs for it."""

    seq: Sequence
    token_ids: list[int]  # the new tokens to feed
    positions: list[int]  # their absolute positions
    slot_mapping: list[int]  # page * page_size + offset where each new token's K/V go
    block_table: list[int]  # the sequence's pages, in order
    samples: bool  # True when this chunk reaches the end of the known tokens: the step samples a token for it
    draft_ids: list[int] = field(default_factory=list)  # guessed tokens fed after the last known one (the tail)

    @property
    def query_len(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.positions[-1] + 1

    @property
    def num_logits(self) -> int:
        """Rows whose logits the step needs: the last known token's, and one per guess after it."""
        return 1 + len(self.draft_ids) if self.samples else 0


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]  # sent back to waiting during this step (for metrics and logs)
    prefix_query_tokens: int = 0  # known tokens of the sequences admitted this step, looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, tokens found there (their K/V reused, not computed)

    @property
    def num_tokens(self) -> int:
        return sum(s.query_len for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, num_pages: int, page_size: int, max_batch_size: int, max_batch_tokens: int, prefix_caching: bool = True
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < max_batch_size:
            # otherwise a full batch of decodes could not all advance in one step
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_batch_size ({max_batch_size})")
        self.pool = PagePool(num_pages, caching=prefix_caching)
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self._live: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.num_scheduled_tokens = 0  # tokens handed to forwards so far (prefix hits are not among them)

    # -- queries ------------------------------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_pages * self.page_size

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence can get now, counting cached pages nobody uses (they are evicted on demand)."""
        return self.pool.num_free

    @property
    def kv_usage(self) -> float:
        """Fraction of pages live sequences hold."""
        return self.pool.num_in_use / self.pool.num_pages

    @property
    def num_live(self) -> int:
        return len(self._live)

    def has_work(self) -> bool:
        return bool(self._live)

    def fits(self, num_tokens: int) -> str | None:
        """None when a sequence of num_tokens total tokens can ever fit in the cache, else the reason it cannot."""
        if num_tokens > self.capacity_tokens:
            return (
                f"prompt + max_tokens = {num_tokens} tokens cannot fit in the KV cache of {self.capacity_tokens} "
                f"tokens ({self.pool.num_pages} pages of {self.page_size})"
            )
        return None

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of the waiting queue; CapacityError if it can never fit."""
        if seq.seq_id in self._live:
            raise ValueError(f"sequence {seq.seq_id!r} is already scheduled")
        if not seq.prompt_ids:
            raise ValueError(f"sequence {seq.seq_id!r} has an empty prompt")
        reason = self.fits(seq.max_total_tokens)
        if reason is not None:
            raise CapacityError(reason)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def finish(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves at once and its pages are free for the next step."""
        if self._live.get(seq.seq_id) is not seq:
            raise ValueError(f"sequence {seq.seq_id!r} is not scheduled")
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._publish(seq)  # called after the step's forward: everything computed is in the cache
        else:
            self.waiting.remove(seq)
        self._release_pages(seq)
        seq.status = SeqStatus.FINISHED
        del self._live[seq.seq_id]

    def accept_draft_token(self, seq: Sequence) -> None:
        """The next guessed token fed for seq was kept: its K/V (already written) now count as computed. Call it
        before appending the token to seq's output."""
        if seq.num_computed != seq.num_tokens:
            raise RuntimeError(f"sequence {seq.seq_id!r} has no fed guess at position {seq.num_tokens} to accept")
        seq.num_computed += 1

    def discard_draft_pages(self, seq: Sequence) -> None:
        """After verification: free seq's pages past its known tokens (held only by rejected guesses). The rejected
        guesses' slots in the kept pages are simply overwritten later, as num_computed stops before them."""
        if seq.status is not SeqStatus.RUNNING:
            return  # finished (pages already freed) or preempted
        keep = pages_for(seq.num_tokens, self.page_size)
        if len(seq.pages) > keep:
            self.pool.release(reversed(seq.pages[keep:]))
            del seq.pages[keep:]

    def clear_prefix_cache(self) -> None:
        """Forget every cached page (after a failed forward, whatever it was writing is not trustworthy)."""
        self.pool.clear_index()
        for seq in self._live.values():
            seq.num_published_pages = len(seq.pages)  # their pages stay theirs, just unpublished

    def _release_pages(self, seq: Sequence) -> None:
        self.pool.release(reversed(seq.pages))  # tail first: the prefix is the likeliest to be reused
        seq.pages = []
        seq.num_published_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._publish(seq)  # its own pages may still be cached when it comes back
        self._release_pages(seq)
        seq.num_computed = 0  # its K/V are gone: recomputed from prompt + output when readmitted
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- prefix cache -------------------------------------------------------------------------------------------------
    def _page_hash(self, seq: Sequence, index: int) -> PageHash:
        """The name of seq's full page ``index`` (of known tokens), computed once."""
        ps = self.page_size
        while len(seq.page_hashes) <= index:
            i = len(seq.page_hashes)
            previous = seq.page_hashes[-1] if i else None
            seq.page_hashes.append(page_hash(previous, seq.tokens(i * ps, (i + 1) * ps)))
        return seq.page_hashes[index]

    def _publish(self, seq: Sequence) -> None:
        """Register seq's computed full pages in the prefix cache (only once their forward has run)."""
        if not self.pool.caching:
            return
        full = seq.num_computed // self.page_size
        for i in range(seq.num_published_pages, full):
            self.pool.register(seq.pages[i], self._page_hash(seq, i))
        seq.num_published_pages = max(full, seq.num_published_pages)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding the longest prefix of seq's known tokens. The last known token is always left to
        compute (its logits are needed), in a page of seq's own: a shared page is never written."""
        if not self.pool.caching:
            return []
        full_pages = (seq.num_tokens - 1) // self.page_size
        return self.pool.lookup(self._page_hash(seq, i) for i in range(full_pages))  # hashes only up to a miss

    # -- one step -----------------------------------------------------------------------------------------------------
    def schedule(self, drafts: Mapping[str, list[int]] | None = None) -> StepPlan:
        """This step's plan. ``drafts``: guessed next tokens by seq_id, fed after decoding sequences' last token."""
        drafts = drafts or {}
        for seq in self.running:  # the previous plan's forward has run: its full pages can be found now
            self._publish(seq)
        budget = self.max_batch_tokens
        chunks: dict[Sequence, int] = {}  # insertion order is the order of the forward
        fed_drafts: dict[Sequence, list[int]] = {}
        preempted: list[Sequence] = []
        query_tokens = hit_tokens = 0

        def grow(seq: Sequence, new_tokens: int) -> bool:
            """Give seq pages for new_tokens more cached tokens, preempting from the back; False if seq itself went."""
            nonlocal budget
            needed = pages_for(seq.num_computed + new_tokens, self.page_size) - len(seq.pages)
            while needed > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                budget += chunks.pop(victim, 0)
                if victim is seq:
                    return False
            seq.pages.extend(self.pool.allocate(needed))
            return True

        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        for seq in decoding + prefilling:
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted a moment ago to make room for an earlier one
            new_tokens = min(seq.num_tokens - seq.num_computed, budget)
            if new_tokens > 0 and grow(seq, new_tokens):
                chunks[seq] = new_tokens
                budget -= new_tokens
        # guesses only take what the sure tokens left: pages free now and budget, never a preemption
        for seq in decoding:
            if seq in chunks and drafts.get(seq.seq_id):
                fed_drafts[seq] = self._fit_draft(seq, drafts[seq.seq_id], budget)
                budget -= len(fed_drafts[seq])

        # Admit FIFO; not in a step that had to preempt (the freed pages are what the running ones just needed).
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hits = self._cached_prefix(seq)
            cached = len(hits) * self.page_size
            new_tokens = min(seq.num_tokens - cached, budget)
            needed = pages_for(cached + new_tokens, self.page_size) - len(hits)
            # hit pages nobody holds count as free until this sequence takes them
            if needed + sum(self.pool.refcount(p) == 0 for p in hits) > self.pool.num_free:
                break  # strict FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            for page in hits:
                self.pool.share(page)
            seq.pages = hits + self.pool.allocate(needed)
            seq.num_computed = seq.num_cached_tokens = cached
            seq.num_published_pages = len(hits)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks[seq] = new_tokens
            budget -= new_tokens
            if self.pool.caching:
                query_tokens += seq.num_tokens
                hit_tokens += cached

        items = [self._materialize(seq, n, fed_drafts.get(seq, [])) for seq, n in chunks.items()]
        plan = StepPlan(items, preempted, query_tokens, hit_tokens)
        self.num_scheduled_tokens += plan.num_tokens
        return plan

    def _fit_draft(self, seq: Sequence, draft: list[int], budget: int) -> list[int]:
        """The longest head of ``draft`` that fits in the budget and in pages free now (no preemption for a guess);
        the pages it needs are taken."""
        room = (len(seq.pages) + self.pool.num_free) * self.page_size - seq.num_tokens
        draft = list(draft[: max(0, min(budget, room))])
        if draft:
            needed = pages_for(seq.num_tokens + len(draft), self.page_size) - len(seq.pages)
            seq.pages.extend(self.pool.allocate(needed))
        return draft

    def _materialize(self, seq: Sequence, new_tokens: int, draft: list[int]) -> ScheduledSeq:
        start, stop = seq.num_computed, seq.num_computed + new_tokens
        ps = self.page_size
        positions = list(range(start, stop + len(draft)))
        item = ScheduledSeq(
            seq=seq,
            token_ids=seq.tokens(start, stop) + draft,
            positions=positions,
            slot_mapping=[seq.pages[p // ps] * ps + p % ps for p in positions],
            block_table=list(seq.pages),
            samples=stop == seq.num_tokens,
            draft_ids=draft,
        )
        seq.num_computed = stop  # the forward of this plan writes these tokens' K/V (guesses count once accepted)
        return item
