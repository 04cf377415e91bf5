"""The contract between the scheduler's plan and the model runner: one forward over a ragged batch.

Tokens of all sequences in the step are concatenated along one axis (no padding): a decoding sequence contributes
one token, a prefilling one a chunk. The paged KV cache is addressed through ``slot_mapping`` (where each new token's
K/V are written) and ``block_tables`` (which pages each sequence reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: the new tokens of every sequence, in sequence order
    positions: torch.Tensor  # [T] int64: absolute position of each new token in its sequence
    query_lens: list[int]  # [B] new tokens per sequence
    context_lens: list[int]  # [B] tokens in the cache for each sequence after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_pages] int64 page ids per sequence, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: page * page_size + offset for each new token's K/V
    logits_indices: torch.Tensor  # [S] int64: rows of the token axis whose logits the step needs

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class BatchChunk(Protocol):
    """One sequence's part of a forward: its new tokens and where they go (scheduler.ScheduledSeq is one)."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_table: list[int]

    @property
    def context_len(self) -> int: ...

    @property
    def num_logits(self) -> int:
        """How many of the chunk's last rows need logits (0: none)."""
        ...


@dataclass
class Chunk:
    """A plain ``BatchChunk``, for callers with no scheduler plan of their own (the draft model)."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_table: list[int]
    num_logits: int = 1

    @property
    def context_len(self) -> int:
        return self.positions[-1] + 1


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


def padded_chunk(chunk: BatchChunk, length: int, scratch_slot: int) -> Chunk:
    """``chunk`` fed as ``length`` tokens, every row wanting logits, as a CUDA-graph step takes it: its own tokens,
    then copies of its last one at the next positions whose K/V go to ``scratch_slot`` (their logits are ignored)."""
    pad = length - len(chunk.token_ids)
    last = chunk.positions[-1]
    return Chunk(
        token_ids=[*chunk.token_ids, *[chunk.token_ids[-1]] * pad],
        positions=[*chunk.positions, *range(last + 1, last + 1 + pad)],
        slot_mapping=[*chunk.slot_mapping, *[scratch_slot] * pad],
        block_table=chunk.block_table,
        num_logits=length,
    )


def build_batch(
    chunks: Sequence[BatchChunk], device: torch.device | str, logits_rows: list[int] | None = None
) -> ForwardBatch:
    """The tensors of one ragged forward over ``chunks``, in order; the logits go to each chunk's last num_logits
    rows unless ``logits_rows`` names the rows."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    wanted: list[int] = []
    tables = torch.zeros((len(chunks), max(len(c.block_table) for c in chunks)), dtype=torch.int64)
    for row, chunk in enumerate(chunks):
        input_ids += chunk.token_ids
        positions += chunk.positions
        slots += chunk.slot_mapping
        tables[row, : len(chunk.block_table)] = torch.tensor(chunk.block_table, dtype=torch.int64)
        if logits_rows is None:
            wanted += range(len(input_ids) - chunk.num_logits, len(input_ids))

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        query_lens=[len(c.token_ids) for c in chunks],
        context_lens=[c.context_len for c in chunks],
        block_tables=tables.to(device, non_blocking=True),
        slot_mapping=as_tensor(slots),
        logits_indices=as_tensor(wanted if logits_rows is None else logits_rows),
    )
