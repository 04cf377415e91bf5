"""Building blocks shared by every architecture: linears (dense or quantized), RMSNorm and rotary embeddings.

A model module never asks how a linear is stored: ``build_linear`` looks at the tensors present under the layer's
prefix and picks the implementation from ``LINEAR_BUILDERS``. Dense ``{prefix}.weight`` is built in; a quantized
format registers its own detector and builder (e.g. EXL3 on ``{prefix}.trellis``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.model_dir import TensorSource


class Linear(nn.Module):
    """y = x W^T (+ b) for x of shape [..., in_features] -> [..., out_features], however W is stored."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


class DenseLinear(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"a dense linear weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight rows {weight.shape[0]}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


Detector = Callable[[str, TensorSource], bool]
Builder = Callable[[str, TensorSource, torch.dtype, torch.device], Linear]


def _has_dense_weight(prefix: str, source: TensorSource) -> bool:
    return f"{prefix}.weight" in source


def _build_dense(prefix: str, source: TensorSource, dtype: torch.dtype, device: torch.device) -> Linear:
    weight = source.get(f"{prefix}.weight").to(device=device, dtype=dtype)
    bias = source.get(f"{prefix}.bias").to(device=device, dtype=dtype) if f"{prefix}.bias" in source else None
    return DenseLinear(weight, bias)


# Detector -> builder, tried in order; the first detector that recognises the prefix wins. Quantized formats add
# themselves with register_linear_builder, which puts them ahead of dense.
LINEAR_BUILDERS: dict[Detector, Builder] = {_has_dense_weight: _build_dense}


def register_linear_builder(detect: Detector, build: Builder) -> None:
    """Teach build_linear a storage format (e.g. EXL3: ``detect`` looks for ``{prefix}.trellis``); tried first."""
    existing = {k: v for k, v in LINEAR_BUILDERS.items() if k is not detect}
    LINEAR_BUILDERS.clear()
    LINEAR_BUILDERS.update({detect: build, **existing})


def _has_exl3_trellis(prefix: str, source: TensorSource) -> bool:
    return f"{prefix}.trellis" in source


def _build_exl3(prefix: str, source: TensorSource, dtype: torch.dtype, device: torch.device) -> Linear:
    from inference_worker.exl3_linear import build_exl3_linear  # late: exl3_linear subclasses Linear from here

    return build_exl3_linear(prefix, source, dtype, device)


LINEAR_BUILDERS[_has_exl3_trellis] = _build_exl3


def build_linear(prefix: str, source: TensorSource, dtype: torch.dtype, device: torch.device | str) -> Linear:
    """The linear stored under ``prefix`` (e.g. ``model.layers.0.self_attn.q_proj``), in whatever format it has."""
    device = torch.device(device)
    for detect, build in LINEAR_BUILDERS.items():
        if detect(prefix, source):
            return build(prefix, source, dtype, device)
    found = sorted(name for name in source.keys() if name.startswith(prefix + "."))
    where = getattr(source, "model_dir", "the tensor source")
    raise KeyError(f"no known linear format for {prefix!r} in {where}: tensors under it are {found or 'none'}")


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (as Hugging Face Llama does), scaled in the input dtype. With
    ``fused`` set (inference_worker.models.decoder.use_fused_kernels), one Triton launch (kernels/norm_rope.py)
    that rounds the same way."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.weight.dtype == x.dtype:
            from kernels.norm_rope import rms_norm  # triton compiles only where it runs

            return rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_scaling_type(scaling: dict[str, Any] | None) -> str:
    """The scaling type of a Hugging Face rope_scaling / rope_parameters dict ("default" when absent)."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return rope_type


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32) for rotary embeddings, with optional context scaling.

    ``scaling`` is a Hugging Face ``rope_scaling`` dict: ``None``/``default``, ``linear`` (positions divided by
    ``factor``) or ``llama3`` (low frequencies divided by ``factor``, high ones kept, a smooth ramp between).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope_scaling_type(scaling)
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Wavelengths longer than the original context are stretched by `factor`; shorter than
        # old_context / high_freq_factor are kept; in between, interpolate smoothly.
        scaled = torch.where(wavelen > old_context / low_freq_factor, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high_freq_factor) & (wavelen <= old_context / low_freq_factor)
        return torch.where(is_medium, smoothed, scaled)
    raise AssertionError(f"rope type {rope_type!r} is listed as supported but has no implementation")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary absolute positions, computed on the fly (no length limit, no big cache)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim] for positions [T], in ``dtype``."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by position (the half-split layout of Hugging Face checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
