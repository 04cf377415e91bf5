"""An EXL3-quantized linear behind the common ``Linear`` interface.

Two execution paths, picked once at load:
- "dense": reconstruct W once (kernels.exl3_ref, bit-exact decode) and run a plain matmul. Used on CPU, and on CUDA
  when no Triton kernel is available. Costs the dense weight's memory, so it is the fallback, not the goal.
- "triton": keep only what the file stores (packed trellis, suh, svh, bias) on the device and call
  ``kernels.exl3_matmul.exl3_matmul`` (same contract as ``kernels.exl3_ref.exl3_matmul_ref``: x [..., in_pad] ->
  y [..., out_pad], Hadamards, scales and bias fused). The layer's memory is then its file size.

The default is "triton" on CUDA, "dense" elsewhere (``select_path``). ``exl3_path("triton")`` forces a path for every
layer built inside it: tests run the Triton path on CPU under TRITON_INTERPRET=1 and compare it with the dense one.

Layers stored padded to multiples of 128 (e.g. a 576 -> 192 k_proj) take real-width inputs and give real-width
outputs: inputs are zero-padded, padded output columns are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from inference_worker.layers import Linear
from kernels.exl3_ref import reconstruct_weight
from shared.exl3_format import (
    QUANT_CONFIG_FILE,
    Exl3Tensors,
    read_exl3_linear,
    read_quantization_config,
    stored_features,
)
from shared.model_dir import TensorSource

PATHS = ("dense", "triton")
# A context variable, not a global: asyncio.to_thread (the worker's model load) carries it into its thread, and
# nothing outside an ``exl3_path`` block sees it.
_forced_path: ContextVar[str | None] = ContextVar("exl3_forced_path", default=None)


@lru_cache(maxsize=1)
def triton_matmul() -> Any | None:
    """The fused EXL3 Triton matmul if that module is installed and importable here, else None."""
    try:
        from kernels.exl3_matmul import exl3_matmul
    except ImportError:
        return None
    return exl3_matmul


@contextmanager
def exl3_path(path: str) -> Iterator[None]:
    """Build every Exl3Linear inside this block on ``path`` ("dense" or "triton") whatever the device."""
    if path not in PATHS:
        raise ValueError(f"unknown EXL3 execution path {path!r}; expected one of {', '.join(PATHS)}")
    token = _forced_path.set(path)
    try:
        yield
    finally:
        _forced_path.reset(token)


def _check_triton_runs_on(device: torch.device) -> None:
    if triton_matmul() is None:
        raise RuntimeError("the EXL3 'triton' path needs kernels.exl3_matmul, which cannot be imported here")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"the EXL3 'triton' path runs on CUDA, or on {device} only under TRITON_INTERPRET=1 (set before triton "
            "is imported); use the 'dense' path there"
        )


class Exl3Linear(Linear):
    """y = x W (+ b) with W stored as EXL3 trellis codes (W is (in, out): EXL3's orientation)."""

    def __init__(self, t: Exl3Tensors, dtype: torch.dtype, device: torch.device | str, path: str | None = None) -> None:
        super().__init__()
        device = torch.device(device)
        self.in_features, self.out_features = t.in_features, t.out_features
        self.in_padded, self.out_padded = t.in_padded, t.out_padded
        self.codebook, self.K = t.codebook, t.K
        self.dtype = dtype
        self.path = path or _forced_path.get() or self.select_path(device)
        if self.path not in PATHS:
            raise ValueError(f"unknown EXL3 execution path {self.path!r}; expected one of {', '.join(PATHS)}")
        bias = None if t.bias is None else t.bias.to(device=device, dtype=dtype)
        self.register_buffer("bias", bias)
        if self.path == "triton":
            _check_triton_runs_on(device)
            self.register_buffer("trellis", t.trellis.to(device))
            self.register_buffer("suh", t.suh.to(device))
            self.register_buffer("svh", t.svh.to(device))
            self.weight = None
        else:
            # Reconstructed on the CPU where it was read, then moved; stored [out, in] for F.linear.
            w = reconstruct_weight(t.trellis, t.suh, t.svh, t.codebook)[: self.in_features, : self.out_features]
            self.register_buffer("weight", w.t().contiguous().to(device=device, dtype=dtype))

    @staticmethod
    def select_path(device: torch.device) -> str:
        """The default seam between kernels: "triton" on CUDA when the fused kernel is importable, else "dense"."""
        if device.type == "cuda" and triton_matmul() is not None:
            return "triton"
        return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Exl3Linear expects {self.in_features} input features, got {x.shape[-1]}")
        if self.path == "dense":
            return F.linear(x, self.weight, self.bias)
        # The kernel zero-pads missing input features itself and adds the bias in its epilogue.
        y = triton_matmul()(x, self.trellis, self.suh, self.svh, self.codebook, self.bias)
        return y if self.out_padded == self.out_features else y[..., : self.out_features]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, K={self.K}, codebook={self.codebook}, path={self.path}"


@lru_cache(maxsize=8)
def _quantization_config(model_dir: str, mtime_ns: int) -> dict | None:
    return read_quantization_config(Path(model_dir))  # cached per file version: read once per model load


def build_exl3_linear(prefix: str, source: TensorSource, dtype: torch.dtype, device: torch.device) -> Exl3Linear:
    """Builder registered in ``inference_worker.layers.LINEAR_BUILDERS`` for prefixes holding ``{prefix}.trellis``.

    The real sizes of layers stored padded come from quantization_config.json; otherwise the stored sizes are real.
    The path is the device's default unless an ``exl3_path`` block forces one.
    """
    model_dir = getattr(source, "model_dir", None)
    qcfg = None
    if model_dir is not None:
        qfile = Path(model_dir) / QUANT_CONFIG_FILE
        qcfg = _quantization_config(str(model_dir), qfile.stat().st_mtime_ns if qfile.is_file() else 0)
    in_f, out_f = stored_features(qcfg, prefix)
    return Exl3Linear(read_exl3_linear(source, prefix, in_f, out_f), dtype, device)
