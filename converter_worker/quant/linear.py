"""Quantize linear layers to EXL3: pad, damp the Hessian, regularize, LDLQ, and package the stored tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from converter_worker.quant.hessian import DEFAULT_DAMPING, damp
from converter_worker.quant.ldlq import LdlqJob, TileQuantizer, ldlq_many, proxy_error
from converter_worker.quant.refit import REFIT_ROUNDS, refit_scales
from converter_worker.quant.regularize import Regularized, block_hadamard, regularize
from converter_worker.quant.viterbi import quantize_tiles
from shared.exl3_format import Exl3Tensors, padded

# Bump when a change alters the codes or scales a conversion writes: a work dir started by another revision is not
# resumed (its finished blocks would mix two quantizers in one model). 2: scale refit and the 64-tile scale search.
QUANTIZER_REVISION = 2


@dataclass
class LinearSpec:
    """One linear to quantize. ``weight`` is [out, in] as torch.nn.Linear stores it; ``hessian`` is the undamped
    X^T X / n of its inputs [in, in] (None: no calibration, every input direction weighs the same)."""

    name: str
    weight: torch.Tensor
    K: int
    seed: int
    hessian: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass
class LinearResult:
    name: str
    tensors: Exl3Tensors
    proxy_error: float  # tr(E^T H E) / tr(W^T H W) in the original basis, H damped


def padded_hessian(hessian: torch.Tensor | None, features: int, device: torch.device) -> torch.Tensor:
    """Damped float64 Hessian padded to the Hadamard block; padded inputs are always zero, so their diagonal gets
    only the damping (their errors cost next to nothing)."""
    size = padded(features)
    if hessian is None:
        return torch.eye(size, dtype=torch.float64, device=device)
    if tuple(hessian.shape) != (features, features):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match {features} input features")
    h = hessian.to(device, torch.float64)
    damping = DEFAULT_DAMPING * h.diagonal().mean().clamp_min(0)
    out = torch.zeros(size, size, dtype=torch.float64, device=device)
    out[:features, :features] = damp(h, DEFAULT_DAMPING)  # one damping setting for the real and the padded inputs
    out.diagonal()[features:] = damping if damping > 0 else 1.0
    return out


def dense_from_parts(quantized: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor) -> torch.Tensor:
    """diag(suh) Had Q Had diag(svh) in float32: the weight the stored tensors stand for, [in_pad, out_pad]."""
    w = block_hadamard(quantized.float(), 0) * suh.float().unsqueeze(1)
    return block_hadamard(w, 1) * svh.float().unsqueeze(0)


@dataclass
class PreparedLinear:
    """One linear ready for LDLQ: its padded weight (EXL3 orientation) and damped Hessian, the regularized target
    and the job that ``ldlq_many`` fills."""

    spec: LinearSpec
    w: torch.Tensor  # float32 [in_pad, out_pad]
    hessian: torch.Tensor  # float64 [in_pad, in_pad], damped
    reg: Regularized
    job: LdlqJob


def prepare_linear(
    spec: LinearSpec, codebook: str, device: torch.device, quantize: TileQuantizer = quantize_tiles
) -> PreparedLinear:
    """Pad, damp and regularize one linear (seeded by ``spec.seed``; ``quantize``: the tile search)."""
    if spec.weight.dim() != 2:
        raise ValueError(f"{spec.name}: weight must be 2-D [out, in], got shape {tuple(spec.weight.shape)}")
    if not isinstance(spec.K, int) or not 1 <= spec.K <= 8:
        raise ValueError(f"{spec.name}: bits per weight must be an integer in 1..8, got {spec.K!r}")
    out_f, in_f = spec.weight.shape
    w = torch.zeros(padded(in_f), padded(out_f), device=device)
    w[:in_f, :out_f] = spec.weight.to(device, torch.float32).T
    h = padded_hessian(spec.hessian, in_f, device)
    reg = regularize(w, h, spec.K, codebook, torch.Generator().manual_seed(spec.seed), quantize)
    return PreparedLinear(spec, w, h, reg, LdlqJob(reg.w_hat, reg.hessian, spec.K))


def stored_scales(p: PreparedLinear, refit_rounds: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(suh, svh, proxy error) to store once LDLQ has run: the regularization's scales, refit to the codes in the
    Hessian's metric (quant/refit.py, ``refit_rounds`` rounds; 0: not at all) when that lowers the proxy error after
    rounding to float16; padded rows and columns exactly zero."""
    out_f, in_f = p.spec.weight.shape
    suh, svh = p.reg.suh.clone(), p.reg.svh.clone()
    suh[in_f:] = 0
    svh[out_f:] = 0
    dense = dense_from_parts(p.job.quantized, suh, svh)
    error = proxy_error(p.w, dense, p.hessian)
    if refit_rounds <= 0:
        return suh, svh, error
    r, c = refit_scales(p.w[:in_f, :out_f], dense[:in_f, :out_f], p.hessian[:in_f, :in_f], refit_rounds)
    suh_fit, svh_fit = suh.clone(), svh.clone()
    suh_fit[:in_f] = (suh[:in_f].double() * r).to(torch.float16)
    svh_fit[:out_f] = (svh[:out_f].double() * c).to(torch.float16)
    error_fit = proxy_error(p.w, dense_from_parts(p.job.quantized, suh_fit, svh_fit), p.hessian)
    return (suh_fit, svh_fit, error_fit) if error_fit < error else (suh, svh, error)


def quantize_linears(
    specs: list[LinearSpec], codebook: str, device: torch.device | str = "cpu", quantize: TileQuantizer = quantize_tiles
) -> list[LinearResult]:
    """Quantize several linears together (their strips share trellis searches); results in the same order."""
    device = torch.device(device)
    prepared = [prepare_linear(spec, codebook, device, quantize) for spec in specs]
    ldlq_many([p.job for p in prepared], codebook, quantize)
    results = []
    for p in prepared:
        out_f, in_f = p.spec.weight.shape
        suh, svh, error = stored_scales(p, REFIT_ROUNDS)
        bias = None if p.spec.bias is None else p.spec.bias.detach().to("cpu", torch.float16)
        tensors = Exl3Tensors(p.job.trellis.cpu(), suh.cpu(), svh.cpu(), codebook, bias, in_f, out_f)
        results.append(LinearResult(p.spec.name, tensors, error))
    return results
