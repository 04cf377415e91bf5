"""Quality of a (quantized) model on a text: perplexity, and KL divergence and top-1 agreement against a reference.

The text is tokenized once (no BOS) and cut into consecutive windows of ``ctx`` tokens; each window is one
sequence through the serving model's own forward (paged KV cache, ``logits_indices`` on every row), and every token
after the first of a window is scored: ``windows * (ctx - 1)`` predictions. Both models are run in float32.
KL is KL(reference || model) per position, averaged.

``kv_bits`` runs the model through a quantized KV cache (keys centered as the worker centers them, unless
``key_centering`` is off); the reference is then the reference model or, without one, the same model with an
unquantized cache: the figure is what the cache setting alone costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inference_worker.batch import ForwardBatch
from inference_worker.key_centering import measure_keys
from inference_worker.kv_cache import KVBits, PagedKVCache
from inference_worker.loader import load_model
from shared.tokenizer import ModelTokenizer

PAGE_SIZE = 16


@dataclass
class EvalResult:
    perplexity: float
    tokens: int  # scored predictions
    kl_divergence: float | None = None  # mean KL(reference || model); None without a reference
    top1_agreement: float | None = None  # fraction of positions where both models' argmax agree
    reference_perplexity: float | None = None


def text_windows(tokenizer: ModelTokenizer, text: str, windows: int, ctx: int) -> torch.Tensor:
    """int64 [n, ctx]: the first n <= ``windows`` whole windows of the tokenized text."""
    if windows < 1 or ctx < 2:
        raise ValueError(f"need at least 1 window of 2 tokens, got {windows} x {ctx}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = min(windows, len(ids) // ctx)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    return torch.tensor(ids[: n * ctx], dtype=torch.int64).view(n, ctx)


@torch.inference_mode()
def sequence_logits(
    model: nn.Module,
    ids: torch.Tensor,
    kv_bits: KVBits = (None, None),
    key_offsets: list[torch.Tensor] | None = None,
    key_scales: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 logits [len, vocab] for every position of one sequence, through the model's paged forward (and a
    cache at ``kv_bits``, storing keys minus ``key_offsets``, divided by ``key_scales``, when given)."""
    config = model.config
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    n = ids.shape[0]
    pages = -(-n // PAGE_SIZE)
    cache = PagedKVCache(
        config.num_hidden_layers, pages, PAGE_SIZE, config.num_key_value_heads, config.head_dim, torch.float32, device,
        kv_bits,
    )  # fmt: skip
    cache.key_offsets, cache.key_scales = key_offsets, key_scales
    batch = ForwardBatch(
        input_ids=ids.to(device),
        positions=torch.arange(n, device=device),
        query_lens=[n],
        context_lens=[n],
        block_tables=torch.arange(pages, device=device).unsqueeze(0),
        slot_mapping=torch.arange(n, device=device),
        logits_indices=torch.arange(n, device=device),
    )
    return model(batch, cache).float()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(
    model_dir: Path,
    text: str,
    reference_dir: Path | None = None,
    windows: int = 16,
    ctx: int = 512,
    device: str = "auto",
    kv_bits: KVBits = (None, None),
    key_centering: bool = True,
) -> EvalResult:
    """Score ``model_dir`` on ``text`` (and compare with ``reference_dir`` when given, or with itself over an
    unquantized cache when ``kv_bits`` quantizes), both in float32."""
    dev = _device(device)
    tokenizer = ModelTokenizer.from_dir(model_dir)
    batches = text_windows(tokenizer, text, windows, ctx)
    model, _ = load_model(Path(model_dir), dev, torch.float32)
    reference = load_model(Path(reference_dir), dev, torch.float32)[0] if reference_dir is not None else None
    quantized = kv_bits != (None, None)
    if reference is None and quantized:
        reference = model  # what the cache setting alone costs
    offsets, scales = measure_keys(model, tokenizer) if kv_bits[0] is not None and key_centering else (None, None)
    nll = ref_nll = kl = 0.0
    agree = scored = 0
    for row in batches:
        logits = sequence_logits(model, row, kv_bits, offsets, scales)[:-1]
        targets = row[1:].to(logits.device)
        logp = F.log_softmax(logits, dim=-1)
        nll += -logp.gather(1, targets.unsqueeze(1)).sum().item()
        scored += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(sequence_logits(reference, row)[:-1].to(logits.device), dim=-1)
            ref_nll += -ref_logp.gather(1, targets.unsqueeze(1)).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    result = EvalResult(math.exp(nll / scored), scored)
    if reference is not None:
        result.kl_divergence = kl / scored
        result.top1_agreement = agree / scored
        result.reference_perplexity = math.exp(ref_nll / scored)
    return result


def format_result(result: EvalResult) -> str:
    lines = [f"scored tokens        {result.tokens}", f"perplexity           {result.perplexity:.4f}"]
    if result.kl_divergence is not None:
        lines += [
            f"reference perplexity {result.reference_perplexity:.4f}",
            f"KL divergence        {result.kl_divergence:.5f}",
            f"top-1 agreement      {result.top1_agreement:.4f}",
        ]
    return "\n".join(lines)
