"""The contract between the scheduler's plan and the model runner: one forward over a ragged batch.

Tokens of all sequences in the step are concatenated along one axis (no padding): a decoding sequence contributes
one token, a prefilling one a chunk. The paged KV cache is addressed through ``slot_mapping`` (where each new token's
K/V are written) and ``block_tables`` (which pages each sequence reads).
"""

from __future__ import annotations

from dataclasses import dataclass

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
