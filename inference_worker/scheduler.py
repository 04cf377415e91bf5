"""Continuous-batching scheduler: which sequences run this step, how many new tokens each gets, and which KV pages.

Pure bookkeeping with no torch (vLLM v1 style), so it is unit-tested with plain Python; the engine turns a StepPlan
into a ForwardBatch and runs it. Policy, per step, under ``max_batch_size`` sequences and ``max_batch_tokens`` tokens:

1. every running sequence that is decoding gets its one token first;
2. running sequences still prefilling get chunks of the remaining token budget (chunked prefill);
3. waiting sequences are admitted strictly FIFO while slots, budget and pages for their first chunk allow.

Pages are allocated on demand as a sequence's cached length grows. When a running sequence needs a page and none is
free, the most recently admitted running sequence is preempted: its pages are freed and it goes back to the front of
the waiting queue, to be recomputed later from prompt + the tokens generated so far. Nothing is ever dropped.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class CapacityError(ValueError):
    """A sequence that can never fit in the whole KV cache, however empty."""


class PageAllocator:
    """A free list of KV page ids; any free page can serve any sequence."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._in_use = [False] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV pages but only {len(self._free)} are free")
        pages = [self._free.popleft() for _ in range(count)]
        for page in pages:
            self._in_use[page] = True
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if not self._in_use[page]:
                raise RuntimeError(f"KV page {page} freed twice")
            self._in_use[page] = False
            self._free.append(page)


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

    @property
    def query_len(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.positions[-1] + 1


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]  # sent back to waiting during this step (for metrics and logs)

    @property
    def num_tokens(self) -> int:
        return sum(s.query_len for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_batch_size: int, max_batch_tokens: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_batch_tokens < max_batch_size:
            # otherwise a full batch of decodes could not all advance in one step
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be >= max_batch_size ({max_batch_size})")
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self._live: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # -- queries ------------------------------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_pages * self.page_size

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.allocator.num_free / self.allocator.num_pages

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
                f"tokens ({self.allocator.num_pages} pages of {self.page_size})"
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
        else:
            self.waiting.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages = []
        seq.status = SeqStatus.FINISHED
        del self._live[seq.seq_id]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages = []
        seq.num_computed = 0  # its K/V are gone: recomputed from prompt + output when readmitted
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- one step -----------------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.max_batch_tokens
        chunks: dict[Sequence, int] = {}  # insertion order is the order of the forward
        preempted: list[Sequence] = []

        def grow(seq: Sequence, new_tokens: int) -> bool:
            """Give seq pages for new_tokens more cached tokens, preempting from the back; False if seq itself went."""
            nonlocal budget
            needed = _pages_for(seq.num_computed + new_tokens, self.page_size) - len(seq.pages)
            while needed > self.allocator.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                budget += chunks.pop(victim, 0)
                if victim is seq:
                    return False
            seq.pages.extend(self.allocator.allocate(needed))
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

        # Admit FIFO; not in a step that had to preempt (the freed pages are what the running ones just needed).
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            new_tokens = min(seq.num_tokens - seq.num_computed, budget)
            needed = _pages_for(seq.num_computed + new_tokens, self.page_size) - len(seq.pages)
            if needed > self.allocator.num_free:
                break  # strict FIFO: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.pages.extend(self.allocator.allocate(needed))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            chunks[seq] = new_tokens
            budget -= new_tokens

        return StepPlan([self._materialize(seq, n) for seq, n in chunks.items()], preempted)

    def _materialize(self, seq: Sequence, new_tokens: int) -> ScheduledSeq:
        start, stop = seq.num_computed, seq.num_computed + new_tokens
        ps = self.page_size
        positions = list(range(start, stop))
        item = ScheduledSeq(
            seq=seq,
            token_ids=seq.tokens(start, stop),
            positions=positions,
            slot_mapping=[seq.pages[p // ps] * ps + p % ps for p in positions],
            block_table=list(seq.pages),
            samples=stop == seq.num_tokens,
        )
        seq.num_computed = stop  # the forward of this plan writes these tokens' K/V
        return item
