"""Refit the stored channel scales to the codes LDLQ chose, in the Hessian's metric.

The trellis codes are searched for W-hat = Had diag(1/suh) W diag(1/svh) Had under scales picked before quantization
(RMS matching and a global scale). Once the codes are fixed, the scales are free parameters again: the decoded weight
is diag(r) Q diag(c) for any input-side r and output-side c, and both can be chosen to minimize the proxy loss
tr(E^T H E) with E = diag(r) Q diag(c) - W. For fixed r each output column has a closed-form scale,
c_j = q_j^T H w_j / q_j^T H q_j; for fixed c the input scales solve the linear system ((Q Q^T) * H) r = rowsum(Q * HW)
(* elementwise). Alternating the two never raises the loss. The result costs nothing at inference: r and c fold into
the float16 suh and svh the format already stores.
"""

from __future__ import annotations

import torch

REFIT_ROUNDS = 2  # the second round gains a fraction of the first; further rounds move the loss by noise


def refit_scales(
    w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor, rounds: int = REFIT_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output scale factors (r [in], c [out], float64) that lower tr(E^T H E) for E = diag(r) q diag(c) - w.

    ``w`` and ``q`` are [in, out] (the original weight and its decoded quantization), ``hessian`` [in, in] damped.
    Channels a factor cannot help (all-zero rows or columns of q, or a non-positive solution) keep factor 1.
    """
    if w.shape != q.shape or tuple(hessian.shape) != (w.shape[0], w.shape[0]):
        raise ValueError(f"shapes disagree: w {tuple(w.shape)}, q {tuple(q.shape)}, H {tuple(hessian.shape)}")
    w64, q64, h = w.double(), q.double(), hessian.double().to(w.device)
    hw = h @ w64
    r = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
    c = torch.ones(w.shape[1], dtype=torch.float64, device=w.device)
    for _ in range(rounds):
        step = _positive_or_one((q64 * hw).sum(0) / (q64 * (h @ q64)).sum(0))
        q64 = q64 * step
        c = c * step
        system = (q64 @ q64.T) * h
        # a tiny ridge keeps rows that q leaves empty (padding, dead channels) solvable; they come out at 0 -> 1
        system.diagonal().add_(1e-9 * system.diagonal().mean().clamp_min(1e-300))
        step = _positive_or_one(torch.linalg.solve(system, (q64 * hw).sum(1)))
        q64 = q64 * step.unsqueeze(1)
        r = r * step
    return r, c


def _positive_or_one(factors: torch.Tensor) -> torch.Tensor:
    """Factors that cannot be right (non-finite from an empty channel, or not positive) become 1."""
    return torch.where(torch.isfinite(factors) & (factors > 0), factors, torch.ones_like(factors))
