"""Key centering: a quantized key cache stores ``(k - c) / s`` with ``c`` each layer's mean key and ``s`` a per-channel
scale, both measured once at load; attention multiplies the query by ``s`` so ``q . k`` is unchanged.

Softmax attention is blind to a vector added to every key of a sequence (``q . (k - c)`` shifts all of a query's
logits by the same ``q . c``), so the shift changes nothing in exact arithmetic. Keys carry large per-channel offsets,
though, and removing them before the 32-value groups are rotated and scaled leaves a smaller range for the same bits:
on the default model K4/V4 KL against the fp cache falls by about a third, K3 by about half (BENCHMARKS.md). ``c`` is
measured on the first ``tokens`` tokens of Trellis's calibration text (shared/calibration_text) through an unquantized
cache; it is a fixed property of the served model, so prefix-cached pages stay valid for every request.

``s`` evens out channels before the Hadamard groups mix them, which the exact ``q * s`` pays back: a key channel
divided by ``s`` is stored with its group's error, which reaches the logit as ``q * s`` times that error. A channel
therefore matters by the size of the queries that meet it as much as by its own: ``s`` is the ratio of the centered
keys' per-channel RMS to the queries' (over a kv head's query heads), to the power ``KEY_SCALE_POWER``, mean 1 per head
(a group's absmax scale absorbs any common factor). Minimising a group's logit error ``(sum_c q_c^2 s_c^2) * (sum_c
k_c^2 / s_c^2)`` gives power 0.5; measured, 0.375 is a little better (0.25..0.625 are within 10 % of each other). On
the default model, 16 x 512 Britannica tokens, against the keys' own RMS^0.5 used before: K4/V4 KL 0.035 -> 0.030,
K4/V8 0.028 -> 0.021, K3/V4 0.115 -> 0.094 (BENCHMARKS.md).

Values get nothing of the kind: per-channel value scales (stored ``v / s``, the output multiplied by ``s``, exact as
well) did not lower K8/V4's KL at any power, nor weighted by the output projection's columns, nor with channels
permuted between groups; centering values made it worse (attention sinks hold values near zero, which the quantizer
keeps nearly exact, and centering turns them into the mean).
"""

from __future__ import annotations

from typing import Any

import torch

from inference_worker.batch import ForwardBatch
from inference_worker.kv_cache import PagedKVCache
from inference_worker.models.decoder import Attention
from shared.calibration import calibration_text
from shared.tokenizer import ModelTokenizer

CALIBRATION_TOKENS = 512
_CALIBRATION_CHARS = 16_000  # comfortably more text than CALIBRATION_TOKENS tokens, without tokenizing every file
KEY_SCALE_POWER = 0.375


@torch.inference_mode()
def measure_keys(
    model: Any, tokenizer: ModelTokenizer, tokens: int = CALIBRATION_TOKENS
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the mean stored key and the per-channel key scale, each [kv_heads, head_dim] in the model's dtype
    on its device, over ``tokens`` tokens of calibration text (and the queries that meet them)."""
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
    query_ms: dict[int, torch.Tensor] = {}  # per layer, the queries' mean square per channel [kv_heads, head_dim]

    def measure_queries(attn: Attention, args: tuple) -> None:
        q = attn.project(*args[:3])[0].float()  # args: x, cos, sin, batch, cache
        grouped = q.reshape(n, attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, attn.head_dim)
        query_ms[attn.layer] = grouped.pow(2).mean((0, 2))  # a kv head's scale multiplies all its query heads

    hooks = [m.register_forward_pre_hook(measure_queries) for m in model.modules() if isinstance(m, Attention)]
    try:
        model.forward(batch, cache)
    finally:
        for hook in hooks:
            hook.remove()
    shape = (-1, config.num_key_value_heads, config.head_dim)
    offsets, scales = [], []
    for layer, k in enumerate(cache.k):
        keys = k.reshape(shape)[:n].float()  # type: ignore[union-attr]
        mean = keys.mean(0)
        key_ms, q_ms = (keys - mean).pow(2).mean(0), query_ms[layer]
        # bounded ratios: a silent channel (all-zero keys or queries) must not send a scale to 0 or to infinity
        key_ms, q_ms = (x.clamp_min(1e-4 * x.mean(-1, keepdim=True) + 1e-12) for x in (key_ms, q_ms))
        scale = (key_ms / q_ms).pow(KEY_SCALE_POWER / 2)
        offsets.append(mean.to(k.dtype))
        scales.append((scale / scale.mean(-1, keepdim=True)).to(k.dtype))
    return offsets, scales
