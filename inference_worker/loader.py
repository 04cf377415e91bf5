"""Load a model directory onto a device: read config.json, pick the family, build it from the safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from inference_worker.models import find_spec
from inference_worker.models.decoder import DecoderConfig, DecoderModel, build_decoder
from shared.model_dir import TensorSource, load_config


def load_model(model_dir: Path, device: torch.device | str, dtype: torch.dtype) -> tuple[DecoderModel, DecoderConfig]:
    """(model in eval mode on ``device`` in ``dtype``, its parsed config) for the model stored in ``model_dir``.

    An architecture Trellis does not support is refused here, before any weight is read."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    spec = find_spec(config, model_dir)
    parsed = DecoderConfig.from_hf(config, spec)
    with TensorSource(model_dir) as source:
        model = build_decoder(parsed, spec, source, dtype, torch.device(device))
    return model.eval().requires_grad_(False), parsed
