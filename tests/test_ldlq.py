"""LDLQ, Hessians and regularization: proxy error falls with bits, calibration helps, stored tensors round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter_worker.quant.hessian import HessianAccumulator, damp
from converter_worker.quant.ldlq import block_ldl
from converter_worker.quant.linear import LinearSpec, dense_from_parts, quantize_linears
from converter_worker.quant.regularize import block_hadamard
from kernels.exl3_ref import decode_trellis, exl3_matmul_ref, reconstruct_weight
from shared.exl3_format import exl3_tensors_to_dict, read_exl3_linear


def _correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Activations with a few dominant directions and outlier channels, like a transformer's."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features**0.5
    strong = torch.randn(features, 4, generator=gen) @ torch.randn(4, features, generator=gen)
    x = torch.randn(rows, features, generator=gen) @ (mix + strong)
    x[:, :3] *= 8.0
    return x


def _true_proxy(w: torch.Tensor, w_q: torch.Tensor, h: torch.Tensor) -> float:
    """tr(E^T H E) / tr(W^T H W) for weights in [out, in] orientation and an undamped Hessian."""
    e, w = (w_q - w).double(), w.double()
    return float((e @ h.double() * e).sum() / (w @ h.double() * w).sum())


def _dense(result) -> torch.Tensor:  # noqa: ANN001 - LinearResult
    t = result.tensors
    w = reconstruct_weight(t.trellis, t.suh, t.svh, t.codebook).float()
    return w[: t.in_features, : t.out_features].T


def test_block_ldl_factors_the_hessian_with_unit_diagonal_blocks() -> None:
    x = _correlated_inputs(300, 64, seed=1)
    h = damp(x.T.double() @ x.double() / 300)
    lower, d = block_ldl(h)
    assert torch.allclose(lower @ d @ lower.T, h, rtol=1e-9, atol=1e-9 * h.abs().max().item())
    blocks = lower.view(4, 16, 4, 16)
    for k in range(4):
        assert torch.allclose(blocks[k, :, k], torch.eye(16, dtype=torch.float64))
    assert lower.triu(1).abs().max() == 0
    off_diagonal_blocks = d.view(4, 16, 4, 16).clone()
    for k in range(4):
        off_diagonal_blocks[k, :, k] = 0
    assert off_diagonal_blocks.abs().max() == 0


def test_hessian_accumulator_is_the_mean_outer_product_of_all_rows() -> None:
    x = _correlated_inputs(50, 24, seed=2)
    acc = HessianAccumulator(24)
    acc.add(x[:20].reshape(4, 5, 24))
    acc.add(x[20:])
    assert acc.rows == 50
    assert torch.allclose(acc.hessian(), x.double().T @ x.double() / 50)
    damped = damp(acc.hessian())
    added = (damped - acc.hessian()).diagonal()
    assert torch.allclose(added, torch.full((24,), 0.025 * acc.hessian().diagonal().mean().item(), dtype=torch.float64))


def test_proxy_error_falls_as_bits_rise() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 128, generator=gen) * 0.05
    x = _correlated_inputs(512, 128, seed=4)
    h = x.T @ x / 512
    errors = []
    for K in (1, 2, 3, 4):
        (result,) = quantize_linears([LinearSpec("w", w, K, seed=5, hessian=h)], "mul1")
        errors.append(_true_proxy(w, _dense(result), h))
        # the reported figure is the one the quantizer minimizes: with the damped Hessian
        assert result.proxy_error == pytest.approx(_true_proxy(w, _dense(result), damp(h)), rel=0.02)
    assert all(a > 2.5 * b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_calibrated_quantization_beats_uncalibrated_on_correlated_inputs() -> None:
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(64, 128, generator=gen) * 0.05
    x = _correlated_inputs(1024, 128, seed=7)
    h = x.T @ x / 1024
    calibrated, uncalibrated = quantize_linears(
        [LinearSpec("cal", w, 2, seed=8, hessian=h), LinearSpec("uncal", w, 2, seed=8)], "3inst"
    )
    cal_err, uncal_err = _true_proxy(w, _dense(calibrated), h), _true_proxy(w, _dense(uncalibrated), h)
    assert cal_err < 0.8 * uncal_err, (cal_err, uncal_err)


def test_quantized_layer_round_trips_through_safetensors_and_the_reader(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(72, 200, generator=gen) * 0.03  # neither size a multiple of 128: stored padded
    bias = torch.randn(72, generator=gen) * 0.01
    x = _correlated_inputs(256, 200, seed=10)
    (result,) = quantize_linears([LinearSpec("model.layers.0.mlp.up_proj", w, 3, 11, x.T @ x / 256, bias)], "mcg")
    t = result.tensors
    assert tuple(t.trellis.shape) == (16, 8, 48) and t.suh.shape == (256,) and t.svh.shape == (128,)
    assert (t.suh[200:] == 0).all() and (t.svh[72:] == 0).all()

    path = tmp_path / "layer.safetensors"
    save_file(exl3_tensors_to_dict("model.layers.0.mlp.up_proj", t), str(path))
    back = read_exl3_linear(load_file(str(path)), "model.layers.0.mlp.up_proj", 200, 72)

    assert back.codebook == "mcg" and back.K == 3 and torch.equal(back.trellis, t.trellis)
    stored = reconstruct_weight(back.trellis, back.suh, back.svh, back.codebook).float()
    assert stored[200:].abs().max() == 0 and stored[:, 72:].abs().max() == 0
    y = exl3_matmul_ref(x[:8], back.trellis, back.suh, back.svh, back.codebook, back.bias)[:, :72]
    expected = x[:8] @ _dense(result).T + bias.half().float()
    assert torch.allclose(y, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    assert _true_proxy(w, stored[:200, :72].T, x.T @ x) < 0.05  # 3 bits: a close copy of the weight


def test_stored_scales_and_codes_reproduce_the_quantizer_own_reconstruction() -> None:
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(12)) * 0.02
    (result,) = quantize_linears([LinearSpec("w", w, 2, seed=13)], "mul1")
    t = result.tensors
    decoded = decode_trellis(t.trellis, 2, "mul1").float()
    ours = dense_from_parts(decoded, t.suh, t.svh)
    stored = reconstruct_weight(t.trellis, t.suh, t.svh, "mul1").float()
    assert torch.allclose(ours, stored, rtol=1e-3, atol=1e-3 * w.abs().max().item())


def test_same_seed_gives_the_same_codes_and_another_seed_does_not() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(14)) * 0.02
    a, b, c = quantize_linears(
        [LinearSpec("a", w, 2, seed=1), LinearSpec("b", w, 2, seed=1), LinearSpec("c", w, 2, seed=2)], "mul1"
    )
    assert torch.equal(a.tensors.trellis, b.tensors.trellis) and torch.equal(a.tensors.suh, b.tensors.suh)
    assert not torch.equal(a.tensors.suh, c.tensors.suh)


def test_block_hadamard_is_its_own_inverse() -> None:
    x = torch.randn(256, 128, dtype=torch.float64)
    assert torch.allclose(block_hadamard(block_hadamard(x, 0), 0), x)
    assert torch.allclose(block_hadamard(block_hadamard(x, 1), 1), x)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LinearSpec("bad_k", torch.zeros(16, 16), 9, 0), "integer in 1..8"),
        (LinearSpec("bad_dims", torch.zeros(16), 2, 0), "2-D"),
        (LinearSpec("bad_h", torch.ones(16, 32), 2, 0, torch.eye(16)), "does not match 32 input features"),
        (LinearSpec("nan", torch.full((16, 16), float("nan")), 2, 0), "NaN"),
    ],
)
def test_bad_layers_are_refused_with_a_clear_message(spec: LinearSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quantize_linears([spec], "mul1")
