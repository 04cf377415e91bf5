"""Llama 1, 2, 3 and 3.1 (rope scaling "linear" or "llama3"): the plain decoder, with nothing declared beyond names.

The model itself lives in decoder.py, shared by every family; this module also keeps the Llama-specific names that
callers used before the families shared it (``LlamaConfig``, ``LlamaModel``, ``build_llama``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from inference_worker.models.decoder import DecoderConfig, DecoderModel, build_decoder
from inference_worker.models.spec import ArchSpec
from shared.model_dir import TensorSource

SPEC = ArchSpec(name="llama", architectures=("LlamaForCausalLM",), model_types=("llama",))

LlamaModel = DecoderModel


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """A DecoderConfig read by Llama's rules."""

    @classmethod
    def from_hf(cls, config: dict[str, Any], spec: ArchSpec = SPEC) -> LlamaConfig:
        return super().from_hf(config, spec)


def build_llama(
    config: DecoderConfig, source: TensorSource, dtype: torch.dtype, device: torch.device | str
) -> DecoderModel:
    """A Llama model from the Hugging Face tensor names in ``source``."""
    return build_decoder(config, SPEC, source, dtype, device)
