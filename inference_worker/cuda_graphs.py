"""Decode steps replayed from CUDA graphs.

A decode step (every sequence feeds its one known token, or that token and k guesses to verify) launches hundreds
of small kernels whose host-side cost, not the GPU, sets the pace at small batch. ``DecodeGraphs`` captures the whole
forward once per shape and replays it:

- Shapes are bucketed: the batch is padded up to the next of ``BATCH_BUCKETS``, every sequence feeds the same number
  of tokens ``q`` (1 for plain decode; 1 + guesses when verifying: the engine pads shorter guesses), and the
  attention plan is built for a context bucket (1K, 4K, 16K, ... tokens, capped at the served length), so a handful
  of graphs serve every step. Each is captured on first use (about three eager forwards) and kept; all share one
  memory pool.
- Every graph owns fixed input buffers (a ``ForwardBatch``) and an attention plan whose per-sequence context lengths
  live on the device; a step copies its tokens, positions, slots and block tables into them and replays.
- Padding (whole sequences past the real batch, and tokens past a sequence's real guesses) writes its K/V into a
  scratch page of the KV cache that the scheduler never hands out (``scratch_page``); its logits are ignored. Padding
  sequences see only their own ``q``-token context in that page, so they never read or write a real sequence's cache.

``capture=False`` runs the same buffers through the forward directly instead of replaying: the bookkeeping (bucketing,
padding, the scratch page) is then checkable on the CPU against the plain forward.
Mixture-of-experts layers run every expert over the step's tokens while a graph is captured (inference_worker/moe.py):
their usual grouping would need the host mid-step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from inference_worker.batch import ForwardBatch, pages_for
from inference_worker.kv_cache import PagedKVCache
from inference_worker.models.decoder import DecoderModel

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 1024
CONTEXT_BUCKET_GROWTH = 4


def batch_bucket(num_seqs: int, max_batch: int) -> int:
    """The padded batch size a step of ``num_seqs`` sequences runs at: the smallest bucket that holds it, and never
    past ``max_batch`` (itself the last bucket when it is not one of ``BATCH_BUCKETS``)."""
    if not 1 <= num_seqs <= max_batch:
        raise ValueError(f"a decode graph holds 1 to {max_batch} sequences, got {num_seqs}")
    return next((b for b in BATCH_BUCKETS if num_seqs <= b <= max_batch), max_batch)


def context_bucket(context_len: int, max_context: int) -> int:
    """The context length an attention plan is built for: 1K, 4K, 16K, ... tokens, at most ``max_context``."""
    if not 1 <= context_len <= max_context:
        raise ValueError(f"a decode graph serves contexts of 1 to {max_context} tokens, got {context_len}")
    bucket = MIN_CONTEXT_BUCKET
    while bucket < context_len:
        bucket *= CONTEXT_BUCKET_GROWTH
    return min(bucket, max_context)


def graphs_supported(model: Any) -> bool:
    """Whether ``model``'s forward can be captured: a ``DecoderModel`` (its MoE layers switch to a host-free path
    while capturing); anything else is run eagerly."""
    return isinstance(model, DecoderModel)


@dataclass(eq=False)
class _Graph:
    """One captured shape: its input buffers, the plan's device-side context lengths, and the output."""

    batch: ForwardBatch
    tokens_per_seq: int
    ctx_len: torch.Tensor | None  # the attention plan's per-sequence context lengths (CUDA only)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Runs decode and verification ``ForwardBatch``es of ``model`` over ``cache`` through captured graphs (see the
    module doc): every sequence feeds the same number of tokens, at most ``max_query``, and wants logits for each."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        max_batch: int,
        max_context: int,
        scratch_page: int,
        num_heads: int,
        max_query: int = 1,
        capture: bool = True,
    ) -> None:
        if not 0 <= scratch_page < cache.num_pages:
            raise ValueError(f"scratch page {scratch_page} is not a page of a {cache.num_pages}-page cache")
        if not 1 <= max_query <= cache.page_size:
            raise ValueError(f"max_query must be 1 to the page size {cache.page_size}, got {max_query}")
        if capture and cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the cache is on {cache.device}")
        self.model, self.cache = model, cache
        self.max_batch, self.max_context, self.max_query = max_batch, max_context, max_query
        self.scratch_page, self.num_heads = scratch_page, num_heads
        self.capture = capture
        self.device = cache.device
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps served from a graph (or from the static buffers when not capturing)
        self.capture_seconds = 0.0  # spent capturing, a one-time cost per shape (benchmarks leave it out)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @property
    def scratch_slot(self) -> int:
        """A KV slot no sequence owns: where the engine sends the K/V of the tokens it pads guesses with."""
        return self.scratch_page * self.cache.page_size

    def eligible(self, batch: ForwardBatch) -> bool:
        """Every sequence feeds the same number of tokens (at most ``max_query``) and wants the logits of each (of
        its one token, for plain decode), within the batch and context limits."""
        q = batch.query_lens[0] if batch.query_lens else 0
        return (
            0 < batch.num_seqs <= self.max_batch
            and 1 <= q <= self.max_query
            and batch.num_tokens == q * batch.num_seqs
            and all(ql == q for ql in batch.query_lens)
            and int(batch.logits_indices.shape[0]) == batch.num_tokens
            and max(batch.context_lens) <= self.max_context
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [num_tokens, vocab] of the step, what ``model.forward`` would give for it."""
        if not self.eligible(batch):
            raise ValueError(
                "DecodeGraphs.forward takes a uniform decode/verify batch within its limits; see eligible()"
            )
        n, q = batch.num_seqs, batch.query_lens[0]
        key = (batch_bucket(n, self.max_batch), q, context_bucket(max(batch.context_lens), self.max_context))
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._build(*key)
        self._load(g, batch)
        self.replays += 1
        if g.graph is not None:
            g.graph.replay()
            assert g.logits is not None
            return g.logits[: n * q]
        with torch.inference_mode():
            return self.model.forward(g.batch, self.cache)[: n * q]

    def _load(self, g: _Graph, batch: ForwardBatch) -> None:
        """Copy the step into the graph's buffers; sequences past it become padding again (they may hold an earlier,
        larger step's sequences, whose slots must not be written)."""
        s, n, q = g.batch, batch.num_seqs, g.tokens_per_seq
        s.input_ids[: n * q].copy_(batch.input_ids)
        s.positions[: n * q].copy_(batch.positions)
        s.slot_mapping[: n * q].copy_(batch.slot_mapping)
        width = min(batch.block_tables.shape[1], s.block_tables.shape[1])
        s.block_tables[:n, :width].copy_(batch.block_tables[:, :width])
        self._pad(g, n)
        if g.ctx_len is not None:
            g.ctx_len[:n].copy_(batch.positions.view(n, q)[:, -1] + 1)  # a sequence's context ends at its last token
        if g.graph is None:  # run directly: the torch reference reads the host-side lengths
            s.context_lens[:] = [*batch.context_lens, *[q] * (len(s.context_lens) - n)]

    def _pad(self, g: _Graph, first: int) -> None:
        """Sequences ``first``.. feed ``q`` tokens at positions 0..q-1 of the scratch page, and see only those."""
        s, q = g.batch, g.tokens_per_seq
        rows = s.input_ids.shape[0] - first * q
        if rows == 0:
            return
        s.input_ids[first * q :].zero_()
        offsets = torch.arange(q, device=self.device).repeat(rows // q)
        s.positions[first * q :].copy_(offsets)
        s.slot_mapping[first * q :].copy_(offsets + self.scratch_slot)
        s.block_tables[first:, 0].fill_(self.scratch_page)
        if g.ctx_len is not None:
            g.ctx_len[first:].fill_(q)

    def _build(self, num_seqs: int, q: int, context: int) -> _Graph:
        device = self.device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        context = max(context, q)
        batch = ForwardBatch(
            input_ids=zeros(num_seqs * q),
            positions=zeros(num_seqs * q),
            query_lens=[q] * num_seqs,
            # the host-side lengths only bound the plan and its checks; the kernel reads ctx_len on the device
            context_lens=[context] * num_seqs,
            block_tables=zeros(num_seqs, pages_for(context, self.cache.page_size)),
            slot_mapping=zeros(num_seqs * q),
            logits_indices=torch.arange(num_seqs * q, device=device),
        )
        g = _Graph(batch, q, None)
        if device.type == "cuda":
            from kernels.paged_attention import plan_attention  # triton compiles only where it runs

            plan = plan_attention(batch.query_lens, batch.context_lens, self.num_heads, self.cache.num_kv_heads, device)
            batch._attention_plan = plan  # type: ignore[attr-defined] # read by inference_worker.attention.attend_paged
            g.ctx_len = plan.ctx_len
        self._pad(g, 0)
        if self.capture:
            self._capture(g)
        return g

    def _capture(self, g: _Graph) -> None:
        """Warm up (compiles every kernel, settles the allocator) on a side stream, then capture. Every sequence is
        padding meanwhile, so capturing writes only the scratch page."""
        started = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):
                self.model.forward(g.batch, self.cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            g.logits = self.model.forward(g.batch, self.cache)
        g.graph = graph
        torch.cuda.current_stream(self.device).synchronize()
        self.capture_seconds += time.perf_counter() - started
