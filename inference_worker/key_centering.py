"""Key centering: a quantized key cache stores ``k - c`` with ``c`` each layer's mean key, measured once at load.

Softmax attention is blind to a vector added to every key of a sequence (``q . (k - c)`` shifts all of a query's
logits by the same ``q . c``), so the shift changes nothing in exact arithmetic. Keys carry large per-channel offsets,
though, and removing them before the 32-value groups are rotated and scaled leaves a smaller range for the same bits:
on the default model K4/V4 KL against the fp cache falls by about a third, K3 by about half (BENCHMARKS.md). ``c`` is
measured on the first ``tokens`` tokens of Trellis's calibration text (shared/calibration_text) through an unquantized
cache; it is a fixed property of the served model, so prefix-cached pages stay valid for every request.
"""

from __future__ import annotations

from typing import Any

import torch

from inference_worker.batch import ForwardBatch
from inference_worker.kv_cache import PagedKVCache
from shared.calibration import calibration_text
from shared.tokenizer import ModelTokenizer

CALIBRATION_TOKENS = 512
_CALIBRATION_CHARS = 16_000  # comfortably more text than CALIBRATION_TOKENS tokens, without tokenizing every file


@torch.inference_mode()
def measure_key_offsets(model: Any, tokenizer: ModelTokenizer, tokens: int = CALIBRATION_TOKENS) -> list[torch.Tensor]:
    """Each layer's mean stored key [kv_heads, head_dim] (in the model's dtype, on its device) over ``tokens``
    tokens of calibration text."""
    config = model.config
    device = model.embed.weight.device
    ids = [i for i in tokenizer.encode(calibration_text()[:_CALIBRATION_CHARS]) if i < config.vocab_size][:tokens]
    if len(ids) < 2:
        raise ValueError("the calibration text gives this model fewer than two tokens to measure its keys on")
    n, page = len(ids), 16
    pages = -(-n // page)
    cache = PagedKVCache(
        config.num_hidden_layers, pages, page, config.num_key_value_heads, config.head_dim,
        model.embed.weight.dtype, device,
    )  # fmt: skip
    batch = ForwardBatch(
        input_ids=torch.tensor(ids, device=device),
        positions=torch.arange(n, device=device),
        query_lens=[n],
        context_lens=[n],
        block_tables=torch.arange(pages, device=device)[None],
        slot_mapping=torch.arange(n, device=device),
        logits_indices=torch.tensor([n - 1], device=device),
    )
    model.forward(batch, cache)
    shape = (-1, config.num_key_value_heads, config.head_dim)
    return [k.reshape(shape)[:n].float().mean(0).to(k.dtype) for k in cache.k]  # type: ignore[union-attr]
