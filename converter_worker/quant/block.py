"""One decoder block of any supported family, run over calibration rows by the serving model's own block code.

The converter runs each block twice: with its original weights, recording the Hessian of every linear's input
(``capture_hessians``), and with its quantized weights, to produce the next block's inputs (``forward``). The block
is built by ``inference_worker.models.decoder.build_block`` from the family's spec, so q/k/v biases (Qwen2), per-head
q/k norms (Qwen3), sliding windows (Mistral, Qwen2 where the config sets one), rope scaling (Llama 3) and MoE routing
are the serving model's. Only attention is done here: rows are independent sequences that attend causally over
themselves, with no KV cache. Quantized linears are their bit-exact decoded weights, run in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from converter_worker.quant.capture import InputCapture
from converter_worker.quant.layout import QuantizedLinear, quantized_linears
from converter_worker.quant.moe_capture import routed_output, run_every_expert
from inference_worker.layers import Linear, RotaryEmbedding
from inference_worker.models.decoder import Block, DecoderConfig, build_block
from inference_worker.models.spec import ArchSpec
from inference_worker.moe import SparseMoe

TOKENS_PER_CHUNK = 8192  # rows are pushed through in chunks of about this many tokens, bounding activation memory


def causal_mask(cols: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [cols, cols], True where query i may see key j: j <= i, and j > i - window with a sliding window.
    None without a window (SDPA's own causal mask is then used)."""
    if window is None:
        return None
    pos = torch.arange(cols, device=device)
    offset = pos[:, None] - pos[None, :]
    return (offset >= 0) & (offset < window)


class CalibrationBlock:
    """A decoder ``Block`` plus what calibration needs: ``linears`` maps the Hugging Face prefix of every linear in the
    block to its module, ``quantized`` lists those stored as EXL3 with their input groups."""

    def __init__(
        self, block: Block, linears: dict[str, Linear], quantized: list[QuantizedLinear], rotary: RotaryEmbedding
    ) -> None:
        missing = sorted({q.name for q in quantized} - set(linears))
        if missing:
            raise ValueError(f"the block lacks the linears {', '.join(missing)}")
        self.block, self.linears, self.quantized, self.rotary = block, linears, quantized, rotary

    @property
    def moe(self) -> SparseMoe | None:
        return self.block.mlp if isinstance(self.block.mlp, SparseMoe) else None

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        """h [rows, cols, hidden] (normalised) -> attention output before o_proj, [rows, cols, heads * head_dim]."""
        rows, cols, _ = h.shape
        attn = self.block.attn
        cos, sin = self.rotary(torch.arange(cols, device=h.device).repeat(rows), h.dtype)
        q, k, v = attn.project(h.reshape(rows * cols, -1), cos, sin)
        group = attn.num_heads // attn.num_kv_heads

        def per_row(t: torch.Tensor) -> torch.Tensor:  # [rows*cols, heads, d] -> [rows, heads, cols, d]
            return t.view(rows, cols, t.shape[1], attn.head_dim).transpose(1, 2)

        keys = per_row(k).repeat_interleave(group, dim=1)
        values = per_row(v).repeat_interleave(group, dim=1)
        mask = causal_mask(cols, attn.window, h.device)
        out = F.scaled_dot_product_attention(per_row(q), keys, values, attn_mask=mask, is_causal=mask is None)
        return out.transpose(1, 2).reshape(rows, cols, attn.num_heads * attn.head_dim)

    def _attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream after attention, the MLP's normalised input) for x [rows, cols, hidden]."""
        x = x + self.block.attn.o_proj(self._attention(self.block.attn_norm(x)))
        return x, self.block.mlp_norm(x)

    def _forward_chunk(self, x: torch.Tensor) -> torch.Tensor:
        x, h = self._attend(x)
        moe = self.moe
        if moe is None:
            return x + self.block.mlp(h)
        return x + routed_output(moe, h.reshape(-1, h.shape[-1])).view_as(h)

    def _capture_chunk(self, x: torch.Tensor) -> None:
        _, h = self._attend(x)
        moe = self.moe
        if moe is None:
            self.block.mlp(h)
        else:
            run_every_expert(moe, h.reshape(-1, h.shape[-1]))

    @staticmethod
    def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(max(1, TOKENS_PER_CHUNK // x.shape[1]))

    def differentiable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, cols, hidden] -> the block's output, same shape, with the model's own MoE routing; records
        autograd history where gradients are enabled (the sensitivity pass backpropagates through it)."""
        return torch.cat([self._forward_chunk(part) for part in self._chunks(x)])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, cols, hidden] -> the block's output, same shape, with the model's own MoE routing."""
        return self.differentiable_forward(x)

    @torch.no_grad()
    def capture_hessians(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """H = X^T X / n of the input of every quantized linear (by name) over the rows x [rows, cols, hidden];
        linears that read the same input share one tensor. MoE experts all see every row (moe_capture.py)."""
        capture = InputCapture(self.linears, {q.name: q.input_group for q in self.quantized}, x.device)
        with capture.recording():
            for part in self._chunks(x):
                self._capture_chunk(part)
        return capture.hessians()


def build_calibration_block(
    config: DecoderConfig,
    spec: ArchSpec,
    layer: int,
    rotary: RotaryEmbedding,
    tensor: Callable[[str], torch.Tensor],
    linear: Callable[[str], Linear],
) -> CalibrationBlock:
    """Block ``layer`` built by the serving model's builder from ``tensor(name)`` (norms, router) and
    ``linear(prefix)``: float32 originals for the capture, decoded quantized weights for the forward."""
    linears: dict[str, Linear] = {}

    def named_linear(prefix: str) -> Linear:
        linears[prefix] = linear(prefix)
        return linears[prefix]

    block = build_block(config, spec, layer, tensor, named_linear)
    return CalibrationBlock(block, linears, quantized_linears(spec, config, layer), rotary)
