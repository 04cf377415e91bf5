"""Reading a Hugging Face style model directory: ``config.json`` and its safetensors weights.

Weights are read lazily, one tensor at a time, through ``safe_open`` (memory-mapped), so loading a model never holds
more than the tensor being converted plus the model built so far. Both layouts are supported: a single
``model.safetensors``, or shards ``model-0000X-of-0000N.safetensors`` listed in ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def load_config(model_dir: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {model_dir} is not a model directory (it needs {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file name (relative to the directory), from the index or the single weights file."""
    index_path = model_dir / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map' naming the shard of each tensor")
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise FileNotFoundError(f"shard {shard} listed in {index_path} is missing from {model_dir}")
        return dict(weight_map)
    single = model_dir / SINGLE_WEIGHTS_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), SINGLE_WEIGHTS_FILE)
    raise FileNotFoundError(f"{model_dir} has no weights: expected {SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


class TensorSource:
    """Lazy access to every tensor of a model directory by its stored name (one open handle per shard)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._weight_map = _weight_map(self.model_dir)
        self._handles: dict[str, tuple[Any, set[str]]] = {}  # file name -> (safe_open handle, its tensor names)

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def _handle(self, file_name: str) -> tuple[Any, set[str]]:
        if file_name not in self._handles:
            handle = safe_open(self.model_dir / file_name, framework="pt")
            self._handles[file_name] = (handle, set(handle.keys()))
        return self._handles[file_name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor called ``name``, in its stored dtype, on the CPU."""
        file_name = self._weight_map.get(name)
        if file_name is None:
            raise KeyError(f"tensor {name!r} not found in {self.model_dir}")
        handle, names = self._handle(file_name)
        if name not in names:
            raise KeyError(f"tensor {name!r} is listed for {file_name} in {WEIGHTS_INDEX_FILE} but is not in that file")
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
