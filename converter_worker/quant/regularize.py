"""Incoherence processing: turn a weight into a well-spread target for the trellis, and its scales into suh/svh.

EXL3 stores W (in x out) = diag(suh) . Had . W-hat . Had . diag(svh), Had the block Hadamard of size 128. We pick:
- output side: per-column RMS scales and random signs, then the output Hadamard;
- input side: per-row RMS scales (measured after the output rotation) and random signs, then the input Hadamard;
- a global scale found by quantizing sample tiles at a few candidate scales (the best fit depends on K and on the
  codebook's shape, which a formula would only approximate).
So suh = input signs * input scales and svh = output signs * output scales * global scale, both rounded to float16
before W-hat is formed from them, so the codes are fitted to exactly these scales. Once the codes are fixed, both
are refit to them in the Hessian's metric (quant/refit.py, applied by linear.stored_scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from converter_worker.quant.ldlq import TileQuantizer
from converter_worker.quant.viterbi import quantize_tiles
from kernels.exl3_ref import HAD_BLOCK, codebook_table, hadamard_128

_MIN_SCALE = 1e-4  # keeps scales inside float16's normal range when a channel is (nearly) all zero
# Global scale candidates around RMS matching, refined by a parabola through the best and its neighbours, judged on
# up to SCALE_SAMPLE_TILES tiles (a layer of fewer than 16x that many samples one tile in 16, at least 2). Measured
# on the default model (BENCHMARKS.md): 64 tiles and seven candidates lowered KL by 8 % at 4 bpw and 15 % at 5 bpw
# against 8 tiles and three; the sampled optimum was that noisy.
SCALE_FACTORS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
SCALE_SAMPLE_TILES = 64


def block_hadamard(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x with every consecutive 128-block along ``dim`` (0 or 1 of a matrix) multiplied by the Hadamard matrix."""
    h = hadamard_128(x.dtype, x.device)
    if dim == 0:
        k, n = x.shape
        return (h @ x.reshape(k // HAD_BLOCK, HAD_BLOCK, n)).reshape(k, n)
    k, n = x.shape
    return (x.reshape(k, n // HAD_BLOCK, HAD_BLOCK) @ h).reshape(k, n)


def random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1


def codebook_rms(codebook: str) -> float:
    return codebook_table(codebook).float().pow(2).mean().sqrt().item()


def _channel_rms(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.pow(2).mean(dim).sqrt().clamp_min(_MIN_SCALE)


def sample_tiles(w: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """[count, 16, 16] tiles of w picked at random (fewer when w has fewer tiles)."""
    ti, tj = w.shape[0] // 16, w.shape[1] // 16
    tiles = w.reshape(ti, 16, tj, 16).permute(0, 2, 1, 3).reshape(ti * tj, 16, 16)
    pick = torch.randperm(ti * tj, generator=gen)[:count]
    return tiles[pick.to(w.device)]


def search_global_scale(
    w: torch.Tensor, K: int, codebook: str, gen: torch.Generator, quantize: TileQuantizer = quantize_tiles
) -> float:
    """The divisor g for which w / g best fits the codebook at K bits, judged on sample tiles ``quantize``d."""
    count = min(SCALE_SAMPLE_TILES, max(2, w.numel() // (256 * 16)))
    tiles = sample_tiles(w, count, gen)
    base = tiles.pow(2).mean().sqrt().item() / codebook_rms(codebook)
    if base == 0.0:
        return 1.0
    factors = torch.tensor(SCALE_FACTORS, dtype=torch.float64, device=w.device)
    batch = torch.cat([tiles / (base * f.item()) for f in factors])
    _, decoded = quantize(batch, K, codebook)
    fitted = decoded.view(len(factors), -1).double() * (base * factors.unsqueeze(1))
    errors = (fitted - tiles.reshape(1, -1).double()).pow(2).mean(1)
    # vertex of the parabola through the best candidate and its neighbours, kept within the bracket's reach
    best_at = int(errors.argmin())
    mid = min(max(best_at, 1), len(SCALE_FACTORS) - 2)
    (f0, f1, f2), (e0, e1, e2) = factors[mid - 1 : mid + 2].tolist(), errors[mid - 1 : mid + 2].tolist()
    denom = (f0 - f1) * (f0 - f2) * (f1 - f2)
    a = (f2 * (e1 - e0) + f1 * (e0 - e2) + f0 * (e2 - e1)) / denom if denom else 0.0
    b = (f2 * f2 * (e0 - e1) + f1 * f1 * (e2 - e0) + f0 * f0 * (e1 - e2)) / denom if denom else 0.0
    best = factors[best_at].item()
    if a > 0:
        best = min(max(-b / (2 * a), SCALE_FACTORS[0] - 0.1), SCALE_FACTORS[-1] + 0.1)
    return base * best


@dataclass
class Regularized:
    """A weight prepared for LDLQ: the target W-hat, the float16 scales, and the input Hessian in W-hat's basis."""

    w_hat: torch.Tensor  # float32 [in_pad, out_pad]
    suh: torch.Tensor  # float16 [in_pad]
    svh: torch.Tensor  # float16 [out_pad]
    hessian: torch.Tensor  # float64 [in_pad, in_pad]: Had diag(suh) H diag(suh) Had


def regularize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    K: int,
    codebook: str,
    gen: torch.Generator,
    quantize: TileQuantizer = quantize_tiles,
) -> Regularized:
    """Prepare ``weight`` [in_pad, out_pad] (EXL3 orientation, zero-padded) with its damped Hessian [in_pad, in_pad].

    ``gen`` supplies the random signs and the scale-search sample, so a seeded generator gives the same result;
    ``quantize`` is the tile search the scale is judged with (the one LDLQ will use).
    """
    k, n = weight.shape
    if k % HAD_BLOCK or n % HAD_BLOCK:
        raise ValueError(f"weight shape ({k}, {n}) must be padded to multiples of {HAD_BLOCK}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {k} input features")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or infinity")
    out_signs, in_signs = random_signs(n, gen).to(w.device), random_signs(k, gen).to(w.device)
    w, suh, out_scale = balance(w, out_signs, in_signs)
    g = search_global_scale(w, K, codebook, gen, quantize)
    svh = (out_signs * out_scale * g).half()
    # W-hat from the float16 scales, so reconstruction uses exactly what was fitted
    w_hat = block_hadamard(block_hadamard(weight.float() / suh.float().unsqueeze(1), 0) / svh.float(), 1)
    return Regularized(w_hat, suh, svh, rotate_hessian(hessian, suh))


def balance(
    w: torch.Tensor, out_signs: torch.Tensor, in_signs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight [in_pad, out_pad] with signs, RMS channel scales and Hadamard rotations on both sides, before the
    global scale; with the input side's signed float16 scales (suh) and the output side's RMS scales."""
    out_scale = _channel_rms(w, 0)
    w = block_hadamard(w * (out_signs / out_scale), 1)
    in_scale = _channel_rms(w, 1)
    suh = (in_signs * in_scale).half()
    return block_hadamard(w / suh.float().unsqueeze(1), 0), suh, out_scale


def rotate_hessian(hessian: torch.Tensor, suh: torch.Tensor) -> torch.Tensor:
    """The Hessian in W-hat's basis (input scales, then the Hadamard rotation on both sides), float64."""
    h = hessian.to(torch.float64) * suh.double().unsqueeze(0) * suh.double().unsqueeze(1)
    return block_hadamard(block_hadamard(h, 0), 1)
