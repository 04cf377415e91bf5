"""Attention over the paged KV cache: the torch reference (the CPU path, and the oracle for the Triton kernel).

Every sequence's query chunk attends causally over its whole context, cached tokens plus the new ones. The ragged
batch is padded once: contexts are gathered page by page into [B, max_context, ...], queries into [B, max_query, ...],
and a boolean mask hides both padding and the future, so the whole step is one SDPA call.

Quantized pages (kernels/kv_quant_ref.py) hold keys and values rotated by the 32-point Hadamard. The reference does what
the kernel does: it dequantizes them in the rotated domain, rotates the query when keys are quantized, and
un-rotates the output when values are.

On CUDA, ``attend_paged`` runs the Triton kernel (kernels/paged_attention.py) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference_worker.batch import ForwardBatch
from inference_worker.kv_cache import PagedKVCache
from kernels import kv_quant_ref
from kernels.kv_quant_ref import QuantPages


def _page_geometry(pages: torch.Tensor | QuantPages) -> tuple[int, int]:
    """(page_size, kv_heads) of fp or quantized pages."""
    data = pages.codes if isinstance(pages, QuantPages) else pages
    return data.shape[1], data.shape[2]


@dataclass
class ReferenceLayout:
    """How a ragged batch's query rows map onto the reference's padded SDPA call: the same for every layer of a
    forward (only the pages' contents differ), so a forward builds it once (``attend_paged``), not once per layer.
    It depends on the query and context lengths only; the block tables are read at each call."""

    pages_needed: int  # block table columns a context spans
    seq_of_token: torch.Tensor  # [T] the sequence each query row belongs to
    row_in_seq: torch.Tensor  # [T] its row among that sequence's queries
    mask: torch.Tensor  # [B, 1, max_query, max_context] which keys each padded query row sees
    num_seqs: int
    max_query: int
    max_context: int


def reference_layout(
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    page_size: int,
    device: torch.device,
    window: int | None = None,
) -> ReferenceLayout:
    """The padded layout of a ragged batch (see ``paged_attention``), its arguments checked."""
    if len(query_lens) != len(context_lens) or len(query_lens) != block_tables.shape[0]:
        raise ValueError(
            f"batch disagrees on its size: {len(query_lens)} query_lens, {len(context_lens)} context_lens, "
            f"{block_tables.shape[0]} block table rows"
        )
    if any(ql < 1 or ql > cl for ql, cl in zip(query_lens, context_lens, strict=True)):
        raise ValueError(f"each sequence needs 1 <= query_len <= context_len, got {query_lens} and {context_lens}")
    num_seqs, max_query, max_context = len(query_lens), max(query_lens), max(context_lens)
    pages_needed = -(-max_context // page_size)
    if block_tables.shape[1] < pages_needed:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns; a {max_context}-token context needs more")
    num_tokens = sum(query_lens)
    q_lens = torch.tensor(query_lens, device=device)
    ctx_lens = torch.tensor(context_lens, device=device)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
    first_token = torch.cumsum(q_lens, 0) - q_lens
    row_in_seq = torch.arange(num_tokens, device=device) - first_token[seq_of_token]
    # Query row i of sequence b sits at position context - query_len + i and sees keys at positions <= its own.
    # Padding rows sit past the context, see every real key (no all-masked row, so no NaN) and are dropped later.
    query_pos = (ctx_lens - q_lens)[:, None] + torch.arange(max_query, device=device)[None, :]
    key_pos = torch.arange(max_context, device=device)
    mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < ctx_lens[:, None, None])
    if window is not None:  # padding rows keep the last real row's window, so none is fully masked
        newest = torch.minimum(query_pos, (ctx_lens - 1)[:, None])
        mask &= key_pos[None, None, :] > newest[:, :, None] - window
    return ReferenceLayout(pages_needed, seq_of_token, row_in_seq, mask[:, None], num_seqs, max_query, max_context)


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor | QuantPages,
    v_pages: torch.Tensor | QuantPages,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float | None = None,
    window: int | None = None,
    layout: ReferenceLayout | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, heads, head_dim] over paged K/V [pages, page_size, kv_heads, head_dim] (tensors,
    or ``QuantPages`` of that geometry).

    Sequence b owns the next ``query_lens[b]`` rows of q, which are the last tokens of its ``context_lens[b]``-token
    context; its context lives in pages ``block_tables[b, :]``. Returns [T, heads, head_dim] in q's dtype.
    ``window`` (sliding-window attention, e.g. Mistral): a query sees only the ``window`` latest positions, its own
    included; None sees the whole context. ``layout``: ``reference_layout`` of these arguments, when the caller
    already has it (every layer of a forward shares one).
    """
    num_tokens, num_heads, head_dim = q.shape
    page_size, num_kv_heads = _page_geometry(k_pages)
    if _page_geometry(v_pages) != (page_size, num_kv_heads):
        raise ValueError(f"k and v pages disagree: {_page_geometry(k_pages)} vs {_page_geometry(v_pages)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} kv heads evenly")
    if sum(query_lens) != num_tokens:
        raise ValueError(f"query_lens sum to {sum(query_lens)} but q has {num_tokens} tokens")
    if layout is None:
        layout = reference_layout(block_tables, query_lens, context_lens, page_size, q.device, window)
    num_seqs, pages = layout.num_seqs, block_tables[:, : layout.pages_needed].to(q.device)
    padded_len = layout.pages_needed * page_size

    # Gather each sequence's pages into one contiguous, padded context: [B, kv_heads, max_context, head_dim].
    def gather(cache_pages: torch.Tensor | QuantPages) -> torch.Tensor:
        def contexts(t: torch.Tensor) -> torch.Tensor:
            return t[pages].reshape(num_seqs, padded_len, num_kv_heads, -1)[:, : layout.max_context]

        if isinstance(cache_pages, QuantPages):  # dequantized, still rotated
            codes, scales = contexts(cache_pages.codes), contexts(cache_pages.scales)
            ctx = kv_quant_ref.dequantize_ref(codes, scales, cache_pages.bits, rotated=True)
        else:
            ctx = contexts(cache_pages)
        return ctx.transpose(1, 2).to(q.dtype)

    keys, values = gather(k_pages), gather(v_pages)
    if isinstance(k_pages, QuantPages):
        q = kv_quant_ref.rotate_groups(q).to(q.dtype)  # q . k = Hq . Hk: rotate the query, not every key

    # Scatter the ragged queries into [B, heads, max_query, head_dim].
    padded_q = q.new_zeros(num_seqs, layout.max_query, num_heads, head_dim)
    padded_q[layout.seq_of_token, layout.row_in_seq] = q
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2), keys, values, attn_mask=layout.mask, scale=scale, enable_gqa=True
    )  # [B, heads, max_query, head_dim]; GQA: head h reads kv head h // (heads / kv_heads)
    out = out.transpose(1, 2)[layout.seq_of_token, layout.row_in_seq]
    if isinstance(v_pages, QuantPages):
        out = kv_quant_ref.rotate_groups(out).to(q.dtype)  # values were summed rotated: undo it once
    return out


def _shared_layout(batch: ForwardBatch, page_size: int, window: int | None, device: torch.device) -> ReferenceLayout:
    """The batch's reference layout, built by the first layer that needs it (one per window and page size). A
    batch whose buffers are refilled step after step (inference_worker/cuda_graphs.py without capture) changes its
    lengths in place: the layouts are kept only while the lengths they were built for last."""
    lengths = (tuple(batch.query_lens), tuple(batch.context_lens))
    cached = batch.__dict__.get("_reference_layouts")
    if cached is None or cached[0] != lengths:
        cached = batch._reference_layouts = (lengths, {})  # type: ignore[attr-defined]
    layouts = cached[1]
    if (window, page_size) not in layouts:
        layouts[window, page_size] = reference_layout(
            batch.block_tables, batch.query_lens, batch.context_lens, page_size, device, window
        )
    return layouts[window, page_size]


def attend_paged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    batch: ForwardBatch,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Write this step's k, v [T, kv_heads, head_dim] into the cache, then attend q [T, heads, head_dim] over it
    (only the ``window`` latest positions when a sliding window is given): the Triton kernel on CUDA, the torch
    reference elsewhere."""
    cache.write(layer, k, v, batch.slot_mapping)
    k_pages, v_pages = cache.k[layer], cache.v[layer]
    if cache.key_scales is not None:  # keys were stored divided by the scale: q * s restores every q . k
        t, heads, dim = q.shape
        s = cache.key_scales[layer]
        q = (q.reshape(t, s.shape[0], heads // s.shape[0], dim) * s[None, :, None, :]).reshape(t, heads, dim)
    if q.device.type != "cuda":
        return paged_attention(
            q, k_pages, v_pages, batch.block_tables, batch.query_lens, batch.context_lens, scale, window,
            layout=_shared_layout(batch, _page_geometry(k_pages)[0], window, q.device),
        )
    from kernels import paged_attention as triton_attention  # triton compiles only where it runs

    # Every layer of a forward shares one plan (how the ragged batch maps onto programs): build it once per batch.
    plan = getattr(batch, "_attention_plan", None)
    if plan is None:
        plan = triton_attention.plan_attention(
            batch.query_lens, batch.context_lens, q.shape[1], cache.num_kv_heads, q.device, kv_bits=cache.kv_bits
        )
        batch._attention_plan = plan  # type: ignore[attr-defined]
    return triton_attention.paged_attention(
        q, k_pages, v_pages, batch.block_tables, batch.query_lens, batch.context_lens, scale, window, plan=plan
    )
