"""One Llama decoder block run over calibration rows, recording the Hessian of every linear's input.

The converter runs each block twice: with its original weights (to capture H = X^T X / n at the four input points
q/k/v, o, gate/up and down) and with its quantized weights (to produce the next block's inputs). Rows are
independent sequences, so attention is plain causal SDPA per row; norms and rotary embeddings are the serving
model's own (inference_worker.layers). Quantized linears are their bit-exact decoded weights, run in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from converter_worker.quant.hessian import HessianAccumulator
from inference_worker.layers import RMSNorm, RotaryEmbedding, apply_rotary
from inference_worker.models.llama import LlamaConfig

# short name -> (module path inside the block, Hessian input point, bit-allocation group)
LINEARS = {
    "q_proj": ("self_attn.q_proj", "attn_in", "qkv"),
    "k_proj": ("self_attn.k_proj", "attn_in", "qkv"),
    "v_proj": ("self_attn.v_proj", "attn_in", "qkv"),
    "o_proj": ("self_attn.o_proj", "o_in", "o"),
    "gate_proj": ("mlp.gate_proj", "mlp_in", "gate_up"),
    "up_proj": ("mlp.up_proj", "mlp_in", "gate_up"),
    "down_proj": ("mlp.down_proj", "down_in", "down"),
}
NORMS = ("input_layernorm", "post_attention_layernorm")
TOKENS_PER_CHUNK = 8192  # rows are pushed through in chunks of about this many tokens, bounding activation memory


def linear_prefix(layer: int, short: str) -> str:
    return f"model.layers.{layer}.{LINEARS[short][0]}"


def input_features(config: LlamaConfig) -> dict[str, int]:
    """Width of each Hessian input point."""
    return {
        "attn_in": config.hidden_size,
        "o_in": config.num_attention_heads * config.head_dim,
        "mlp_in": config.hidden_size,
        "down_in": config.intermediate_size,
    }


class CalibrationBlock:
    """A decoder block as plain callables: ``linears`` maps short names (q_proj, ...) to modules x -> x W^T + b."""

    def __init__(
        self,
        config: LlamaConfig,
        linears: dict[str, Callable[[torch.Tensor], torch.Tensor]],
        attn_norm: RMSNorm,
        mlp_norm: RMSNorm,
        rotary: RotaryEmbedding,
    ) -> None:
        missing = sorted(set(LINEARS) - set(linears))
        if missing:
            raise ValueError(f"a Llama block needs the linears {', '.join(missing)}")
        self.config, self.linears, self.rotary = config, linears, rotary
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        rows, cols, _ = h.shape
        c = self.config
        flat = h.reshape(rows * cols, -1)
        q = self.linears["q_proj"](flat).view(rows * cols, c.num_attention_heads, c.head_dim)
        k = self.linears["k_proj"](flat).view(rows * cols, c.num_key_value_heads, c.head_dim)
        v = self.linears["v_proj"](flat).view(rows * cols, c.num_key_value_heads, c.head_dim)
        cos, sin = self.rotary(torch.arange(cols, device=h.device).repeat(rows), h.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = c.num_attention_heads // c.num_key_value_heads

        def per_row(t: torch.Tensor) -> torch.Tensor:  # [rows*cols, heads, d] -> [rows, heads, cols, d]
            return t.view(rows, cols, t.shape[1], c.head_dim).transpose(1, 2)

        keys = per_row(k).repeat_interleave(group, dim=1)
        values = per_row(v).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(per_row(q), keys, values, is_causal=True)
        return out.transpose(1, 2).reshape(rows, cols, c.num_attention_heads * c.head_dim)

    def _chunk(self, x: torch.Tensor, capture: dict[str, HessianAccumulator] | None) -> torch.Tensor:
        h = self.attn_norm(x)
        if capture is not None:
            capture["attn_in"].add(h)
        attn = self._attention(h)
        if capture is not None:
            capture["o_in"].add(attn)
        x = x + self.linears["o_proj"](attn)
        h = self.mlp_norm(x)
        if capture is not None:
            capture["mlp_in"].add(h)
        act = F.silu(self.linears["gate_proj"](h)) * self.linears["up_proj"](h)
        if capture is not None:
            capture["down_in"].add(act)
        return x + self.linears["down_proj"](act)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, capture: dict[str, HessianAccumulator] | None = None) -> torch.Tensor:
        """x [rows, cols, hidden] -> the block's output, same shape; ``capture`` accumulates the four inputs."""
        rows_per_chunk = max(1, TOKENS_PER_CHUNK // x.shape[1])
        return torch.cat([self._chunk(part, capture) for part in x.split(rows_per_chunk)])
