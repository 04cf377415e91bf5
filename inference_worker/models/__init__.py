"""One module per architecture family; ``ARCHITECTURES`` maps a config's ``architectures`` name to its builder.

A builder takes (config dict, TensorSource, dtype, device) and returns (model, parsed config). Adding a family means
adding its module and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from inference_worker.models import llama
from shared.model_dir import TensorSource

ModelBuilder = Callable[[dict[str, Any], TensorSource, torch.dtype, torch.device], tuple[nn.Module, Any]]


def _llama(
    config: dict[str, Any], source: TensorSource, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, llama.LlamaConfig]:
    parsed = llama.LlamaConfig.from_hf(config)
    return llama.build_llama(parsed, source, dtype, device), parsed


ARCHITECTURES: dict[str, ModelBuilder] = dict.fromkeys(llama.ARCHITECTURES, _llama)
