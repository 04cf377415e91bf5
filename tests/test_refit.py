"""The post-LDLQ scale refit: exact where only scales are wrong, never worse, folded into the stored suh/svh."""

from __future__ import annotations

import pytest
import torch

from converter_worker.quant.ldlq import ldlq_many, proxy_error
from converter_worker.quant.linear import LinearSpec, dense_from_parts, prepare_linear, stored_scales
from converter_worker.quant.refit import REFIT_ROUNDS, refit_scales
from kernels.exl3_ref import reconstruct_weight


def _hessian(features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(600, features, generator=gen) @ torch.randn(features, features, generator=gen)
    x[:, :2] *= 6.0  # outlier channels, as transformers' inputs have
    h = (x.T @ x / 600).double()
    h.diagonal().add_(0.025 * h.diagonal().mean())
    return h


def test_scales_alone_are_recovered_exactly_given_rounds() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=gen)
    row, col = 1 + 0.2 * torch.rand(48, 1, generator=gen), 1 - 0.2 * torch.rand(1, 40, generator=gen)
    h = _hessian(48, 1)
    q = w * row * col
    before = proxy_error(w, q, h)
    assert before > 1e-3
    r, c = refit_scales(w, q, h)  # the converter's two rounds: most of the way
    assert proxy_error(w, (q.double() * r.unsqueeze(1) * c).float(), h) < 0.01 * before
    r, c = refit_scales(w, q, h, rounds=20)  # alternating minimization converges to the exact scales
    assert proxy_error(w, (q.double() * r.unsqueeze(1) * c).float(), h) < 1e-9


def test_refit_never_raises_the_loss_and_leaves_dead_channels_alone() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=gen)
    q = w + 0.3 * torch.randn(64, 32, generator=gen)
    q[5] = 0  # an input row the quantizer zeroed, and a dead output column
    q[:, 7] = 0
    h = _hessian(64, 3)
    for rounds in (1, 2, 4):
        r, c = refit_scales(w, q, h, rounds)
        assert torch.isfinite(r).all() and torch.isfinite(c).all()
        assert r[5] == 1 and c[7] == 1
        assert proxy_error(w, (q.double() * r.unsqueeze(1) * c).float(), h) < proxy_error(w, q, h)


def test_quantized_linear_stores_refit_scales_that_lower_its_proxy_error() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(72, 200, generator=gen) * 0.03  # padded to 256 x 128: padding must stay exactly zero
    h = _hessian(200, 5).float()
    p = prepare_linear(LinearSpec("w", w, 2, seed=6, hessian=h), "mul1", torch.device("cpu"))
    ldlq_many([p.job], "mul1")
    suh0, svh0, plain = stored_scales(p, refit_rounds=0)
    suh, svh, refit = stored_scales(p, REFIT_ROUNDS)
    assert refit < 0.97 * plain, (refit, plain)
    assert (suh[200:] == 0).all() and (svh[72:] == 0).all()
    assert suh.dtype == svh.dtype == torch.float16 and not torch.equal(suh, suh0) and not torch.equal(svh, svh0)
    # the reported error is the stored tensors' own: decode the codes through the float16 scales
    stored = reconstruct_weight(p.job.trellis, suh, svh, "mul1").float()
    assert proxy_error(p.w, stored, p.hessian) == pytest.approx(refit, rel=1e-3)
    ours = dense_from_parts(p.job.quantized, suh, svh)
    assert torch.allclose(stored, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item())
