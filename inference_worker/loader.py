"""Load a model directory onto a device: read config.json, pick the architecture, build it from the safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference_worker.models import ARCHITECTURES
from shared.model_dir import TensorSource, load_config


def load_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model in eval mode on ``device`` in ``dtype``, its parsed config) for the model stored in ``model_dir``."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    names = config.get("architectures") or []
    if not names:
        raise ValueError(f"{model_dir}/config.json has no 'architectures' entry, so the model type is unknown")
    builder = ARCHITECTURES.get(names[0])
    if builder is None:
        raise ValueError(
            f"{model_dir} holds a {names[0]} model, which Trellis cannot run yet "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    with TensorSource(model_dir) as source:
        model, parsed = builder(config, source, dtype, torch.device(device))
    return model.eval().requires_grad_(False), parsed
