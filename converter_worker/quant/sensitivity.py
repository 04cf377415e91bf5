"""How much each linear's quantization error costs the model's output: the damage that bit allocation weighs.

Quantizing a linear y = W x adds an error E to W. If E's entries were independent with variance m(K) * rms(W)^2
(m(K) the codebook's relative error at K bits), then to second order the KL divergence of the model's next-token
distributions from the original's, summed over the tokens, would grow on average by
    1/2 m(K) rms(W)^2 tr(F),   tr(F) = E |dL/dW|^2,
F the Fisher information of W and L the negative log-likelihood of next tokens drawn from the model itself. Each
token's term has mean zero over its draw, so one draw per token and |dL/dW|^2 per calibration row, summed over
rows, estimates tr(F) without bias; a per-token shortcut (sum of |dL/dy|^2 |x|^2) would drop the terms between
positions that attention mixes, and under-rated v_proj by up to 5x on a test model.

LDLQ does not leave evenly spread error: it feeds each strip's error forward so that correlated inputs cancel much
of it. ``ldlq_gain`` estimates the share of the output error that remains from the rotated Hessian's block-LDL
diagonal; it ranges from 0.03 to 0.7 over the default model's linears (the actual quantization: 0.004 to 0.74).
A linear's damage is rms(W)^2 tr(F) per token times that gain, so quantizing it at K bits costs about
damage * m(K) / 2 of KL divergence per token. (Without the gain, the plan gave bits to linears whose error LDLQ
cancels anyway, and scored worse than the plain plan on the CPU proxy; BENCHMARKS.md.)

Everything is measured on a few calibration rows in one forward pass (capturing each block's Hessians) and one
backward pass, streamed a block at a time as the converter streams everything: the forward keeps each block's input
on the host, the backward rebuilds one block at a time from the source weights and recomputes it with gradients.
Attention runs through SDPA's plain math backend, whose backward is deterministic, so the same inputs give the same
damage (and the same bit plan).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from converter_worker.quant.block import CalibrationBlock
from converter_worker.quant.ldlq import block_ldl
from converter_worker.quant.linear import padded_hessian
from converter_worker.quant.regularize import balance, rotate_hessian
from shared.exl3_format import padded

# relative mean-squared error of the MUL1 trellis code per K on unit-Gaussian tiles (32 tiles of 256, the torch
# reference search): about a quarter per bit up to 6 bits, flattening where the 16-bit codebook values run out
CODE_ERROR = {1: 0.277, 2: 0.0684, 3: 0.0179, 4: 0.00431, 5: 0.00128, 6: 0.00032, 7: 0.00017, 8: 0.00014}
SENSITIVITY_ROWS = 16  # calibration rows the measurement runs over
SENSITIVITY_COLS = 512  # tokens per row (at most the calibration's)
_HEAD_TOKENS_PER_CHUNK = 512  # logits (and their float64 CDF) are [tokens, vocab]: computed a slice at a time


class _Recorder:
    """Hooks on a block's linears: keeps each linear's input from the forward and, when the gradient of its output
    arrives, adds |dL/dW|^2 = |sum over the tokens of g x^T|^2 (one calibration row goes through at a time)."""

    def __init__(self, linears: dict[str, torch.nn.Module], scores: dict[str, float]) -> None:
        self.scores = scores
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def forward_hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if not out.requires_grad:
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])

            def on_grad(g: torch.Tensor) -> None:
                weight_grad = g.detach().float().reshape(-1, g.shape[-1]).T @ x
                self.scores[name] = self.scores.get(name, 0.0) + weight_grad.pow(2).sum().item()

            out.register_hook(on_grad)

        return forward_hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _sampled_targets(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One next token per row of logits [T, vocab], drawn from the model's own distribution by inverse CDF with
    uniforms from a CPU generator (the same draws on every device)."""
    u = torch.rand(logits.shape[0], 1, generator=gen, dtype=torch.float64).to(logits.device)
    cdf = logits.double().softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_max(logits.shape[1] - 1)


def _head_gradient(state: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], seed: int) -> torch.Tensor:
    """d(sum of the sampled tokens' negative log-likelihoods) / d(final hidden state), state [rows, cols, hidden]."""
    gen = torch.Generator().manual_seed(seed)
    flat = state.reshape(-1, state.shape[-1])
    grads = []
    for part in flat.split(_HEAD_TOKENS_PER_CHUNK):
        x = part.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head(x).float()
            target = _sampled_targets(logits.detach(), gen)
            F.cross_entropy(logits, target, reduction="sum").backward()
        grads.append(x.grad)
    return torch.cat(grads).view_as(state)


def ldlq_gain(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """The output error LDLQ leaves, as a share of what evenly spread code error of the same relative size would:
    the regularized weight's error is even in W-hat's basis, and LDLQ feeds each 16-row strip's error forward, so
    the output error is rms(W-hat)^2 * sum of the output scales^2 * tr(D) (H-hat = L D L^T in 16-blocks) against
    rms(W)^2 * out * tr(H). Far below 1 where the inputs are correlated (0.004 for one down_proj of the default
    model, whose inputs carry a few huge channels) - the damage of a linear's codes is its Fisher trace times this.
    ``weight`` [out, in], ``hessian`` [in, in]; signs are left out (they change the expectation little)."""
    out_f, in_f = weight.shape
    device = weight.device
    w = torch.zeros(padded(in_f), padded(out_f), device=device)
    w[:in_f, :out_f] = weight.detach().float().T
    h = padded_hessian(hessian, in_f, device)
    w_rot, suh, out_scale = balance(w, torch.ones(w.shape[1], device=device), torch.ones(w.shape[0], device=device))
    d = block_ldl(rotate_hessian(h, suh))[1]
    ldlq = w_rot.double().pow(2).mean() * out_scale.double().pow(2).sum() * d.trace()
    even = weight.detach().double().pow(2).mean() * out_f * h[:in_f, :in_f].trace()
    return float(ldlq / even)


def _mean_square(linear: torch.nn.Module) -> float:
    return linear.weight.detach().float().pow(2).mean().item()  # type: ignore[operator]


def measure_sensitivity(
    state: torch.Tensor,
    num_layers: int,
    block: Callable[[int], CalibrationBlock],
    head: Callable[[torch.Tensor], torch.Tensor],
    seed: int = 0,
    ldlq: bool = True,
) -> dict[str, float]:
    """The damage per unit of code error of every quantized linear (by name): mean(W^2) * |dL/dW|^2 summed over the
    embedded rows ``state`` [rows, cols, hidden], per token. ``block(i)`` builds block i with its original float32
    weights; ``head`` maps hidden states to logits (final norm and output head). Quantizing linear t at K bits is
    expected to add about damage[t] * CODE_ERROR[K] / 2 to the KL divergence per token.
    With ``ldlq`` each damage is scaled by the linear's ``ldlq_gain`` on the same rows' Hessian (the shape of the
    error LDLQ leaves); without it, it is the damage of evenly spread error (weight noise)."""
    device = state.device
    inputs: list[torch.Tensor | None] = []  # each block's input, on the host: one block on the device at a time
    gains: dict[str, float] = {}
    with torch.no_grad():
        for layer in range(num_layers):
            inputs.append(state.cpu())
            calibration = block(layer)
            if ldlq:
                hessians = calibration.capture_hessians(state)
                for q in calibration.quantized:
                    gains[q.name] = ldlq_gain(calibration.linears[q.name].weight, hessians[q.name])  # type: ignore[arg-type]
            state = calibration.forward(state)
    grad = _head_gradient(state, head, seed)
    scores: dict[str, float] = {}
    weight_power: dict[str, float] = {}  # mean(W^2) per linear
    with sdpa_kernel(SDPBackend.MATH):
        for layer in reversed(range(num_layers)):
            calibration = block(layer)
            linears = {q.name: calibration.linears[q.name] for q in calibration.quantized}
            weight_power.update({name: _mean_square(module) for name, module in linears.items()})
            recorder = _Recorder(linears, scores)
            x = inputs[layer].to(device).requires_grad_(True)  # type: ignore[union-attr]
            inputs[layer] = None
            try:
                for row in range(x.shape[0]):  # a row at a time: |dL/dW|^2 summed per row (see the module doc)
                    with torch.enable_grad():
                        calibration.differentiable_forward(x[row : row + 1]).backward(grad[row : row + 1])
            finally:
                recorder.close()
            grad = x.grad
    tokens = state.shape[0] * state.shape[1]
    return {name: weight_power[name] * scores.get(name, 0.0) / tokens * gains.get(name, 1.0) for name in weight_power}
