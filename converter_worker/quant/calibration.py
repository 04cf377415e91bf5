"""Calibration inputs: token rows cut from the public-domain text that ships with Trellis, plus seeded random rows.

The rows are a pure function of (tokenizer, rows, cols, vocabulary size, seed), so a conversion repeated or resumed
with the same arguments sees exactly the same tokens. Random token rows (about one in ten, as ExLlamaV3 mixes in)
exercise embeddings and channels that ordinary text rarely reaches.
"""

from __future__ import annotations

import tokenizers
import torch

from shared.calibration import calibration_text

RANDOM_ROW_FRACTION = 0.1


def calibration_rows(
    tokenizer: tokenizers.Tokenizer, rows: int, cols: int, vocab_size: int, seed: int = 0, text: str | None = None
) -> torch.Tensor:
    """int64 [rows, cols] token ids: windows of the calibration text at seeded offsets, and seeded random rows."""
    if rows < 1 or cols < 2:
        raise ValueError(f"calibration needs at least 1 row of 2 tokens, got {rows} x {cols}")
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    ids = torch.tensor(tokenizer.encode(text if text is not None else calibration_text()).ids, dtype=torch.int64)
    ids = ids[ids < vocab_size]  # a tokenizer may know tokens the embedding lacks
    if ids.numel() == 0:
        raise ValueError("the calibration text tokenizes to nothing this model's vocabulary holds")
    gen = torch.Generator().manual_seed(seed)
    random_rows = int(rows * RANDOM_ROW_FRACTION)
    text_rows = rows - random_rows
    offsets = torch.randint(0, ids.numel(), (text_rows,), generator=gen)
    window = (offsets.unsqueeze(1) + torch.arange(cols)) % ids.numel()  # texts shorter than a row wrap around
    out = torch.empty(rows, cols, dtype=torch.int64)
    out[:text_rows] = ids[window]
    out[text_rows:] = torch.randint(0, vocab_size, (random_rows, cols), generator=gen)
    return out
