"""An EXL3-quantized linear behind the common ``Linear`` interface.

Two execution paths, picked once at load by ``select_path``:
- "dense": reconstruct W once (kernels.exl3_ref, bit-exact decode) and run a plain matmul. Used on CPU, and on CUDA
  when no Triton kernel is available. Costs the dense weight's memory, so it is the fallback, not the goal.
- "triton": keep only the packed trellis on the GPU and call ``kernels.exl3_matmul.exl3_matmul`` (same contract as
  ``kernels.exl3_ref.exl3_matmul_ref``: x [..., in_pad] -> y [..., out_pad], Hadamards and scales fused).

Layers stored padded to multiples of 128 (e.g. a 576 -> 192 k_proj) take real-width inputs and give real-width
outputs: inputs are zero-padded, padded output columns are dropped.
"""

from __future__ import annotations

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


@lru_cache(maxsize=1)
def triton_matmul() -> Any | None:
    """The fused EXL3 Triton matmul if that module is installed and importable here, else None."""
    try:
        from kernels.exl3_matmul import exl3_matmul
    except ImportError:
        return None
    return exl3_matmul


class Exl3Linear(Linear):
    """y = x W (+ b) with W stored as EXL3 trellis codes (W is (in, out): EXL3's orientation)."""

    def __init__(self, t: Exl3Tensors, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        device = torch.device(device)
        self.in_features, self.out_features = t.in_features, t.out_features
        self.in_padded, self.out_padded = t.in_padded, t.out_padded
        self.codebook, self.K = t.codebook, t.K
        self.dtype = dtype
        self.path = self.select_path(device)
        bias = None if t.bias is None else t.bias.to(device=device, dtype=dtype)
        self.register_buffer("bias", bias)
        if self.path == "triton":
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
        """The seam between kernels: "triton" on CUDA when the fused kernel is importable, else "dense"."""
        if device.type == "cuda" and triton_matmul() is not None:
            return "triton"
        return "dense"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Exl3Linear expects {self.in_features} input features, got {x.shape[-1]}")
        if self.path == "dense":
            return F.linear(x, self.weight, self.bias)
        if self.in_padded != self.in_features:
            x = F.pad(x, (0, self.in_padded - self.in_features))
        y = triton_matmul()(x, self.trellis, self.suh, self.svh, self.codebook)[..., : self.out_features]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, K={self.K}, codebook={self.codebook}, path={self.path}"


@lru_cache(maxsize=8)
def _quantization_config(model_dir: str, mtime_ns: int) -> dict | None:
    return read_quantization_config(Path(model_dir))  # cached per file version: read once per model load


def build_exl3_linear(prefix: str, source: TensorSource, dtype: torch.dtype, device: torch.device) -> Exl3Linear:
    """Builder registered in ``inference_worker.layers.LINEAR_BUILDERS`` for prefixes holding ``{prefix}.trellis``.

    The real sizes of layers stored padded come from quantization_config.json; otherwise the stored sizes are real.
    """
    model_dir = getattr(source, "model_dir", None)
    qcfg = None
    if model_dir is not None:
        qfile = Path(model_dir) / QUANT_CONFIG_FILE
        qcfg = _quantization_config(str(model_dir), qfile.stat().st_mtime_ns if qfile.is_file() else 0)
    in_f, out_f = stored_features(qcfg, prefix)
    return Exl3Linear(read_exl3_linear(source, prefix, in_f, out_f), dtype, device)
