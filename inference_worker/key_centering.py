"""Key centering: a quantized key cache stores ``(k - c) / s`` with ``c`` each layer's mean key and ``s`` a per-channel
scale, both measured once at load; attention multiplies the query by ``s`` so ``q . k`` is unchanged.

Softmax attention is blind to a vector added to every key of a sequence (``q . (k - c)`` shifts all of a query's
logits by the same ``q . c``), so the shift changes nothing in exact arithmetic. Keys carry large per-channel offsets,
though, and removing them before the 32-value groups are rotated and scaled leaves a smaller range for the same bits:
on the default model K4/V4 KL against the fp cache falls by about a third, K3 by about half (BENCHMARKS.md). ``c`` is
measured on the first ``tokens`` tokens of Trellis's calibration text (shared/calibration_text) through an unquantized
cache; it is a fixed property of the served model, so prefix-cached pages stay valid for every request.

``s`` is the centered keys' per-channel RMS to the power ``KEY_SCALE_POWER`` (mean 1 per head): it evens out channels
of very different size before the Hadamard groups mix them, which the exact ``q * s`` pays back. On the default model
K4/V4 KL went 0.041 -> 0.036 with power 0.5 (0.25: 0.037, 0.75: 0.038, 1: 0.047; BENCHMARKS.md).
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
KEY_SCALE_POWER = 0.5


@torch.inference_mode()
def measure_keys(
    model: Any, tokenizer: ModelTokenizer, tokens: int = CALIBRATION_TOKENS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the mean stored key and the per-channel key scale, each [kv_heads, head_dim] in the model's dtype
    on its device, over ``tokens`` tokens of calibration text."""
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
    offsets, scales = [], []
    for k in cache.k:
        keys = k.reshape(shape)[:n].float()  # type: ignore[union-attr]
        mean = keys.mean(0)
        scale = (keys - mean).pow(2).mean(0).sqrt().clamp_min(1e-6).pow(KEY_SCALE_POWER)
        offsets.append(mean.to(k.dtype))
        scales.append((scale / scale.mean(-1, keepdim=True)).to(k.dtype))
    return offsets, scales
