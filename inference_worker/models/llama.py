"""The Llama family: config, modules, forward over a ragged batch with a paged KV cache, and the tensor-name map.

Reads like gpt-fast's model.py: a config dataclass, then the model as data plus a forward. Linears come from
``build_linear``, so the same code runs dense bf16/fp32 checkpoints and quantized ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from inference_worker.attention import attend_paged
from inference_worker.batch import ForwardBatch
from inference_worker.kv_cache import PagedKVCache
from inference_worker.layers import (
    DenseLinear,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    build_linear,
    rope_scaling_type,
)
from shared.model_dir import TensorSource

ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True)
class LlamaConfig:
    """The fields the model needs, under their Hugging Face names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (both the classic ``rope_theta``/``rope_scaling`` keys and the
        newer ``rope_parameters`` are understood)."""
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}, which a Llama model needs")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama models use hidden_act 'silu', this config has {config['hidden_act']!r}")
        num_heads = int(config["num_attention_heads"])
        rope = dict(config.get("rope_parameters") or {})
        rope_theta = float(config.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = config.get("rope_scaling") or rope
        rope_type = rope_scaling_type(scaling)  # refuses unsupported scaling before any weight is read
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else dict(scaling),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int, q: Linear, k: Linear, v: Linear, o: Linear) -> None:
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads = layer, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend_paged(q, k, v, cache, self.layer, batch)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, batch, cache)
        return x + self.mlp(self.mlp_norm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, embed: torch.Tensor, blocks: list[Block], norm: RMSNorm, head: Linear):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """float32 logits [S, vocab] for the token rows ``batch.logits_indices``; writes every token's K/V."""
        x = self.embed(batch.input_ids)
        cos, sin = self.rotary(batch.positions, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, batch, cache)
        x = x[batch.logits_indices]  # only the rows that get sampled pay for the norm and the head
        return self.head(self.norm(x)).float()


def build_llama(
    config: LlamaConfig, source: TensorSource, dtype: torch.dtype, device: torch.device | str
) -> LlamaModel:
    """A LlamaModel from the Hugging Face tensor names in ``source``."""
    device = torch.device(device)

    def tensor(name: str) -> torch.Tensor:
        return source.get(name).to(device=device, dtype=dtype)

    def linear(prefix: str) -> Linear:
        return build_linear(prefix, source, dtype, device)

    blocks = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = Attention(
            config,
            i,
            linear(f"{p}.self_attn.q_proj"),
            linear(f"{p}.self_attn.k_proj"),
            linear(f"{p}.self_attn.v_proj"),
            linear(f"{p}.self_attn.o_proj"),
        )
        mlp = MLP(linear(f"{p}.mlp.gate_proj"), linear(f"{p}.mlp.up_proj"), linear(f"{p}.mlp.down_proj"))
        attn_norm = RMSNorm(tensor(f"{p}.input_layernorm.weight"), config.rms_norm_eps)
        mlp_norm = RMSNorm(tensor(f"{p}.post_attention_layernorm.weight"), config.rms_norm_eps)
        blocks.append(Block(attn_norm, attn, mlp_norm, mlp))

    embed = tensor("model.embed_tokens.weight")
    has_head = any(name.startswith("lm_head.") for name in source.keys())
    if has_head:
        head = linear("lm_head")
    elif config.tie_word_embeddings:
        head = DenseLinear(embed)  # shares storage with the embedding
    else:
        raise KeyError(f"{source.model_dir} has no lm_head tensors and its config does not tie word embeddings")
    norm = RMSNorm(tensor("model.norm.weight"), config.rms_norm_eps)
    return LlamaModel(config, embed, blocks, norm, head).to(device).eval()  # .to moves the rotary buffer too
