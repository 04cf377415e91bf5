"""Decode steps, and short prompt steps, replayed from CUDA graphs.

A decode step (every sequence feeds its one known token, or that token and k guesses to verify) launches hundreds
of small kernels whose host-side cost, not the GPU, sets the pace at small batch. So does a step over short prompts
(a chat turn's few dozen tokens): on a small model it costs several decode steps, and every request that arrives
meanwhile waits for it. ``DecodeGraphs`` captures the whole forward once per shape and replays it:

- Shapes are bucketed: the batch is padded up to the next of ``BATCH_BUCKETS``, every sequence feeds the same number
  of tokens ``q`` (1 for plain decode; 1 + guesses when verifying: the engine pads shorter guesses), and the
  attention plan is built for a context bucket (1K, 4K, 16K, ... tokens, capped at the served length), so a handful
  of graphs serve every step. Each is captured on first use (about three eager forwards) and kept; all share one
  memory pool.
- Prompt steps (``prompt_tokens`` > 0): every sequence's chunk (a prompt's, or a decoding sequence's one token) is
  padded to the same ``q``, a power of two from ``MIN_PROMPT_QUERY``, as long as the padded step holds at most
  ``prompt_tokens`` tokens; only each sequence's last real row gets logits (``logits_indices``, one per sequence, is
  an input buffer like the tokens). Longer prompts run eagerly: there the GPU, not the host, sets the pace.
- Every graph owns fixed input buffers (a ``ForwardBatch``) and an attention plan whose per-sequence context lengths
  live on the device; a step copies its tokens, positions, slots and block tables into them and replays.
- Padding (whole sequences past the real batch, and tokens past a sequence's real guesses or chunk) writes its K/V
  into a scratch page of the KV cache that the scheduler never hands out (``scratch_page``); its logits are ignored.
  Padding sequences see only their own ``q``-token context, every page of it the scratch page, so they never read or
  write a real sequence's cache; a real sequence's padding tokens come after its real ones, which causal attention
  keeps from seeing them.

``capture=False`` runs the same buffers through the forward directly instead of replaying: the bookkeeping (bucketing,
padding, the scratch page) is then checkable on the CPU against the plain forward.
Mixture-of-experts layers run every expert over the step's tokens while a graph is captured (inference_worker/moe.py):
their usual grouping would need the host mid-step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from inference_worker.batch import ForwardBatch, pages_for
from inference_worker.kv_cache import PagedKVCache
from inference_worker.models.decoder import DecoderModel

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_BUCKET = 1024
CONTEXT_BUCKET_GROWTH = 4
MIN_PROMPT_QUERY = 8  # prompt graphs pad every sequence's chunk to a power of two from this many tokens


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


def prompt_query_bucket(query_len: int) -> int:
    """The tokens per sequence a prompt graph pads a step whose longest chunk is ``query_len`` to."""
    if query_len < 1:
        raise ValueError(f"a chunk feeds at least one token, got {query_len}")
    return max(MIN_PROMPT_QUERY, 1 << (query_len - 1).bit_length())


def prompt_graph_budget(model: Any, requested: int) -> int:
    """The padded tokens a prompt graph of ``model`` may hold: ``requested``, or 0 (none) for a mixture-of-experts
    model, whose captured layers run every expert over every token: a decode step's few tokens, not a prompt's."""
    return 0 if getattr(getattr(model, "config", None), "moe", None) is not None else requested


def graphs_supported(model: Any) -> bool:
    """Whether ``model``'s forward can be captured: a ``DecoderModel`` (its MoE layers switch to a host-free path
    while capturing); anything else is run eagerly."""
    return isinstance(model, DecoderModel)


@dataclass(eq=False)
class _Graph:
    """One captured shape: its input buffers, the plan's device-side context lengths, and the output."""

    batch: ForwardBatch
    tokens_per_seq: int
    last_rows: bool  # logits for each sequence's last real row (prompt steps), not for every row
    ctx_len: torch.Tensor | None  # the attention plan's per-sequence context lengths (CUDA only)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


class DecodeGraphs:
    """Runs ``ForwardBatch``es of ``model`` over ``cache`` through captured graphs (see the module doc): decode and
    verification steps, where every sequence feeds the same number of tokens, at most ``max_query``, and wants
    logits for each; and, with ``prompt_tokens`` > 0, steps whose chunks are padded to one prompt bucket and want
    logits for one row per sequence."""

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
        prompt_tokens: int = 0,
    ) -> None:
        if not 0 <= scratch_page < cache.num_pages:
            raise ValueError(f"scratch page {scratch_page} is not a page of a {cache.num_pages}-page cache")
        if not 1 <= max_query <= cache.page_size:
            raise ValueError(f"max_query must be 1 to the page size {cache.page_size}, got {max_query}")
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be 0 (no prompt graphs) or more, got {prompt_tokens}")
        if capture and cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the cache is on {cache.device}")
        self.model, self.cache = model, cache
        self.max_batch, self.max_context, self.max_query = max_batch, max_context, max_query
        self.prompt_tokens = prompt_tokens
        self.scratch_page, self.num_heads = scratch_page, num_heads
        self.capture = capture
        self.device = cache.device
        self._graphs: dict[tuple[int, int, int, bool], _Graph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps served from a graph (or from the static buffers when not capturing)
        self.prompt_replays = 0  # ... of which prompt steps
        self.capture_seconds = 0.0  # spent capturing, a one-time cost per shape (benchmarks leave it out)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    @property
    def scratch_slot(self) -> int:
        """A KV slot no sequence owns: where the engine sends the K/V of the tokens it pads guesses with."""
        return self.scratch_page * self.cache.page_size

    def prompt_fits(self, num_seqs: int, longest_chunk: int) -> bool:
        """Whether a prompt graph takes a step of ``num_seqs`` chunks, the longest ``longest_chunk`` tokens."""
        if not 0 < num_seqs <= self.max_batch:
            return False
        return batch_bucket(num_seqs, self.max_batch) * prompt_query_bucket(longest_chunk) <= self.prompt_tokens

    def warm_up(self) -> int:
        """Build (on CUDA: capture) ahead of traffic the shapes short chats need at the smallest context bucket: a
        decode graph per batch bucket, and a prompt graph per batch bucket and prompt bucket within
        ``prompt_tokens``; so no early request waits for a capture. Returns the graphs built now."""
        context = context_bucket(1, self.max_context)
        buckets = sorted({batch_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)})
        shapes = [(b, 1, context, False) for b in buckets]
        q = MIN_PROMPT_QUERY
        while q <= context and q <= self.prompt_tokens:
            shapes += [(b, q, context, True) for b in buckets if b * q <= self.prompt_tokens]
            q *= 2
        built = 0
        for key in shapes:
            if key not in self._graphs:
                self._graphs[key] = self._build(*key)
                built += 1
        return built

    def eligible(self, batch: ForwardBatch) -> bool:
        """Every sequence feeds the same number of tokens within the batch and context limits, and either wants the
        logits of each (at most ``max_query`` tokens: decode and verification) or of one row per sequence (a
        prompt bucket's worth, within ``prompt_tokens``)."""
        q = batch.query_lens[0] if batch.query_lens else 0
        n, rows = batch.num_seqs, int(batch.logits_indices.shape[0])
        uniform = (
            0 < n <= self.max_batch
            and q >= 1
            and batch.num_tokens == q * n
            and all(ql == q for ql in batch.query_lens)
            and max(batch.context_lens) <= self.max_context
        )
        if not uniform:
            return False
        if rows == batch.num_tokens and q <= self.max_query:
            return True
        return rows == n and q > 1 and q == prompt_query_bucket(q) and self.prompt_fits(n, q)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """float32 logits [rows, vocab] of the step's ``logits_indices``, what ``model.forward`` would give for it."""
        if not self.eligible(batch):
            raise ValueError(
                "DecodeGraphs.forward takes a uniform decode/verify or prompt batch within its limits; see eligible()"
            )
        n, q = batch.num_seqs, batch.query_lens[0]
        last_rows = int(batch.logits_indices.shape[0]) != batch.num_tokens
        bucket = batch_bucket(n, self.max_batch)
        key = (bucket, q, context_bucket(max(batch.context_lens), self.max_context), last_rows)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._build(*key)
        self._load(g, batch)
        self.replays += 1
        self.prompt_replays += last_rows
        rows = n if last_rows else n * q
        if g.graph is not None:
            g.graph.replay()
            assert g.logits is not None
            return g.logits[:rows]
        with torch.inference_mode():
            return self.model.forward(g.batch, self.cache)[:rows]

    def _load(self, g: _Graph, batch: ForwardBatch) -> None:
        """Copy the step into the graph's buffers; sequences past it become padding again (they may hold an earlier,
        larger step's sequences, whose slots must not be written)."""
        s, n, q = g.batch, batch.num_seqs, g.tokens_per_seq
        s.input_ids[: n * q].copy_(batch.input_ids)
        s.positions[: n * q].copy_(batch.positions)
        s.slot_mapping[: n * q].copy_(batch.slot_mapping)
        if g.last_rows:  # rows past n keep an earlier step's choice: some padding row, whose logits nobody reads
            s.logits_indices[:n].copy_(batch.logits_indices)
        width = min(batch.block_tables.shape[1], s.block_tables.shape[1])
        s.block_tables[:n, :width].copy_(batch.block_tables[:, :width])
        self._pad(g, n)
        if g.ctx_len is not None:
            g.ctx_len[:n].copy_(batch.positions.view(n, q)[:, -1] + 1)  # a sequence's context ends at its last token
        if g.graph is None:  # run directly: the torch reference reads the host-side lengths
            s.context_lens[:] = [*batch.context_lens, *[q] * (len(s.context_lens) - n)]

    def _pad(self, g: _Graph, first: int) -> None:
        """Sequences ``first``.. feed ``q`` tokens at positions 0..q-1, all in the scratch page, and see only those."""
        s, q = g.batch, g.tokens_per_seq
        rows = s.input_ids.shape[0] - first * q
        if rows == 0:
            return
        page_size = self.cache.page_size
        s.input_ids[first * q :].zero_()
        offsets = torch.arange(q, device=self.device).repeat(rows // q)
        s.positions[first * q :].copy_(offsets)
        s.slot_mapping[first * q :].copy_(offsets % page_size + self.scratch_slot)
        s.block_tables[first:, : pages_for(q, page_size)].fill_(self.scratch_page)
        if g.ctx_len is not None:
            g.ctx_len[first:].fill_(q)

    def _build(self, num_seqs: int, q: int, context: int, last_rows: bool) -> _Graph:
        device = self.device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        context = max(context, q)
        rows = torch.arange(num_seqs if last_rows else num_seqs * q, device=device)
        rows = rows * q + q - 1 if last_rows else rows  # a sequence's last row, or every row
        batch = ForwardBatch(
            input_ids=zeros(num_seqs * q),
            positions=zeros(num_seqs * q),
            query_lens=[q] * num_seqs,
            # the host-side lengths only bound the plan and its checks; the kernel reads ctx_len on the device
            context_lens=[context] * num_seqs,
            block_tables=zeros(num_seqs, pages_for(context, self.cache.page_size)),
            slot_mapping=zeros(num_seqs * q),
            logits_indices=rows,
        )
        g = _Graph(batch, q, last_rows, None)
        if device.type == "cuda":
            from kernels.paged_attention import AttentionConfig, plan_attention  # triton compiles only where it runs

            # attention reads the quantized pages directly: the prefill path's bf16 copies are laid out once per
            # plan from the block tables at hand, which a replay would not refresh
            config = replace(AttentionConfig(), dequantize_reuse=None)
            plan = plan_attention(
                batch.query_lens, batch.context_lens, self.num_heads, self.cache.num_kv_heads, device, config,
                kv_bits=self.cache.kv_bits,
            )  # fmt: skip
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
