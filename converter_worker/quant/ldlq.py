"""LDLQ: quantize W-hat one 16-row strip at a time, last strip first, feeding back the errors already made.

With H = L D L^T (L unit lower-triangular in 16x16 blocks, D block-diagonal) and strips k quantized from last to
first with targets  W_k - sum_{j>k} L_jk^T E_j  (E = Q - W), the proxy loss tr(E^T H E) equals
sum_k tr(eta_k^T D_k eta_k), where eta_k is strip k's own rounding error: each strip's tiles can be searched
independently, and the feedback carries the correlations the Hessian knows about.

Several linears can be quantized together (``ldlq_many``): round r takes strip (strips - 1 - r) of every linear and
sends all their tiles through one trellis search per bit width, which keeps a GPU busy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from converter_worker.quant.viterbi import quantize_tiles
from kernels.exl3_ref import pack_codes

STRIP = 16
TileQuantizer = Callable[[torch.Tensor, int, str], tuple[torch.Tensor, torch.Tensor]]


def block_ldl(hessian: torch.Tensor, block: int = STRIP) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D) with H = L D L^T, L unit lower-triangular in ``block``-sized blocks, D block-diagonal; float64."""
    n = hessian.shape[0]
    if hessian.shape != (n, n) or n % block:
        raise ValueError(f"Hessian must be square with a size divisible by {block}, got {tuple(hessian.shape)}")
    h = hessian.to(torch.float64)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError("the damped Hessian is not positive definite; calibration activations may be degenerate")
    diag_blocks = chol.view(n // block, block, n // block, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    inv = torch.linalg.inv(diag_blocks)  # [n/block, block, block]
    lower = torch.einsum("rkb,kbc->rkc", chol.view(n, n // block, block), inv).reshape(n, n)
    d = diag_blocks @ diag_blocks.transpose(1, 2)
    return lower, torch.block_diag(*d)


@dataclass
class LdlqJob:
    """One linear's LDLQ inputs and, once run, its outputs."""

    w_hat: torch.Tensor  # float32 [in_pad, out_pad]
    hessian: torch.Tensor  # float64 [in_pad, in_pad], damped and rotated into W-hat's basis
    K: int
    trellis: torch.Tensor | None = None  # int16 [in_pad/16, out_pad/16, 16K]
    quantized: torch.Tensor | None = None  # float32 [in_pad, out_pad]: the decoded codes


def _strip_tiles(strip: torch.Tensor) -> torch.Tensor:
    """[16, out] -> [out/16, 16, 16] tiles, row = input index."""
    return strip.view(STRIP, -1, STRIP).permute(1, 0, 2)


def ldlq_many(jobs: list[LdlqJob], codebook: str, quantize: TileQuantizer = quantize_tiles) -> None:
    """Quantize every job (fills ``trellis`` and ``quantized``); ``quantize`` maps tiles [T, 16, 16] to
    (states [T, 256], decoded [T, 16, 16]) and defaults to the torch reference search."""
    states: list[torch.Tensor] = []
    feedback: list[torch.Tensor] = []
    for job in jobs:
        k, n = job.w_hat.shape
        if k % STRIP or n % STRIP or tuple(job.hessian.shape) != (k, k):
            raise ValueError(
                f"LDLQ needs a [k, n] weight with k, n multiples of 16 and a [k, k] Hessian; got "
                f"{tuple(job.w_hat.shape)} and {tuple(job.hessian.shape)}"
            )
        lower, _ = block_ldl(job.hessian)
        feedback.append(lower.to(job.w_hat.device, torch.float32))
        job.quantized = torch.zeros_like(job.w_hat, dtype=torch.float32)
        states.append(torch.zeros(k // STRIP, n // STRIP, 256, dtype=torch.int32, device=job.w_hat.device))
    errors = [torch.zeros_like(job.quantized) for job in jobs]
    rounds = max(job.w_hat.shape[0] // STRIP for job in jobs)
    for r in range(rounds):
        by_bits: dict[int, list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            strip = job.w_hat.shape[0] // STRIP - 1 - r
            if strip < 0:
                continue
            rows = slice(strip * STRIP, (strip + 1) * STRIP)
            done = slice((strip + 1) * STRIP, None)
            target = job.w_hat[rows].float() - feedback[i][done, rows].T @ errors[i][done]
            by_bits[job.K].append((i, strip, target))
        for K, items in sorted(by_bits.items()):
            tiles = torch.cat([_strip_tiles(target) for _, _, target in items])
            found, decoded = quantize(tiles, K, codebook)
            offset = 0
            for i, strip, _ in items:
                count = jobs[i].w_hat.shape[1] // STRIP
                rows = slice(strip * STRIP, (strip + 1) * STRIP)
                states[i][strip] = found[offset : offset + count]
                jobs[i].quantized[rows] = decoded[offset : offset + count].permute(1, 0, 2).reshape(STRIP, -1)
                errors[i][rows] = jobs[i].quantized[rows] - jobs[i].w_hat[rows]
                offset += count
    for i, job in enumerate(jobs):
        job.trellis = pack_codes(states[i], job.K)


def proxy_error(w: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E^T H E) / tr(W^T H W) with E = quantized - w: the output error the Hessian predicts, relative."""
    w64, e = w.double(), quantized.double() - w.double()
    h = hessian.double().to(w.device)
    num = (e * (h @ e)).sum()
    den = (w64 * (h @ w64)).sum()
    return float(num / den) if den > 0 else float(num)
