"""Input statistics of a linear layer: H = X^T X / n over the calibration activations, and its damping.

Linears that read the same input (q/k/v, gate/up) share one accumulator. Sums are kept in float64 so the order in
which rows arrive cannot change the result beyond the last bit that matters, and a checkpointed sum resumes exactly.
"""

from __future__ import annotations

import torch

DEFAULT_DAMPING = 0.025  # times mean(diag H), added to the diagonal (ExLlamaV3's value)


class HessianAccumulator:
    """Accumulates X^T X over batches of input rows [..., features]."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.features = features
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.features:
            raise ValueError(f"input has {x.shape[-1]} features, the accumulator expects {self.features}")
        x = x.reshape(-1, self.features).to(self.sum.device, torch.float64)
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """float64 [features, features]: X^T X / n (undamped)."""
        if self.rows == 0:
            raise ValueError("no calibration rows were accumulated; the Hessian is undefined")
        return self.sum / self.rows


def damp(hessian: torch.Tensor, fraction: float = DEFAULT_DAMPING) -> torch.Tensor:
    """H + fraction * mean(diag H) * I; an all-zero H (a layer whose inputs were all zero) becomes the identity."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"a Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("the Hessian holds NaN or infinity: the calibration activations overflowed")
    mean_diag = hessian.diagonal().mean()
    if mean_diag <= 0:
        return torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    out = hessian.clone()
    out.diagonal().add_(fraction * mean_diag)
    return out
