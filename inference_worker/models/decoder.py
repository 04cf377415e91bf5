"""The decoder-only transformer every supported family shares: config, modules, and forward over a ragged batch with a
paged KV cache.

Reads like gpt-fast's model.py: a config dataclass, then the model as data plus a forward. Linears come from
``build_linear``, so the same code runs dense bf16/fp32 checkpoints and quantized ones. What differs between
families (q/k norms, sliding windows, mixture-of-experts MLPs, tensor names) is declared in each family's
``ArchSpec`` (see spec.py) and only consulted here while building.
"""

from __future__ import annotations

from collections.abc import Callable
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
from inference_worker.models.spec import ArchSpec
from inference_worker.moe import SparseMoe
from shared.model_dir import TensorSource


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int  # experts per token
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1
    sparse_layers: tuple[int, ...]  # layers whose MLP is the mixture (the others are dense)


@dataclass(frozen=True)
class DecoderConfig:
    """The fields the model needs, under their Hugging Face names (plus the per-layer facts derived from them)."""

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
    sliding_windows: tuple[int | None, ...] = ()  # per layer: attend only to this many latest tokens; () = none
    moe: MoeConfig | None = None

    @classmethod
    def from_hf(cls, config: dict[str, Any], spec: ArchSpec) -> DecoderConfig:
        """From a Hugging Face ``config.json`` dict, read by the rules of ``spec`` (both the classic
        ``rope_theta``/``rope_scaling`` keys and the newer ``rope_parameters`` are understood)."""
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}, which a {spec.name} model needs")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{spec.name} models use hidden_act 'silu', this config has {config['hidden_act']!r}")
        num_heads = int(config["num_attention_heads"])
        num_layers = int(config["num_hidden_layers"])
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
            num_hidden_layers=num_layers,
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
            sliding_windows=_sliding_windows(config, spec, num_layers),
            moe=_moe_config(config, spec, num_layers),
        )


def _sliding_windows(config: dict[str, Any], spec: ArchSpec, num_layers: int) -> tuple[int | None, ...]:
    """The window of each layer (None: full attention), as transformers decides it for the family."""
    window = config.get("sliding_window")
    if spec.sliding_layers is None or not window or not config.get("use_sliding_window", True):
        return ()
    layer_types = config.get("layer_types")  # newer exports spell the choice out per layer
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"config.json layer_types has {len(layer_types)} entries for {num_layers} layers")
        sliding = [kind == "sliding_attention" for kind in layer_types]
    else:
        sliding = [spec.sliding_layers(config, i) for i in range(num_layers)]
    windows = tuple(int(window) if s else None for s in sliding)
    return windows if any(w is not None for w in windows) else ()


def _moe_config(config: dict[str, Any], spec: ArchSpec, num_layers: int) -> MoeConfig | None:
    if spec.moe is None:
        return None
    num_experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    top_k = int(config.get("num_experts_per_tok") or 0)
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"a {spec.name} model needs num_local_experts/num_experts >= 1 and 1 <= num_experts_per_tok <= that; "
            f"config.json has {num_experts} experts and num_experts_per_tok {top_k}"
        )
    # Qwen-MoE may keep some layers dense: those in mlp_only_layers, and all but every decoder_sparse_step-th.
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    norm = spec.moe.always_norm_topk or bool(config.get("norm_topk_prob", False))
    return MoeConfig(num_experts, top_k, norm, sparse)


class Attention(nn.Module):
    def __init__(
        self,
        config: DecoderConfig,
        layer: int,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.num_heads, self.num_kv_heads = layer, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_windows[layer] if config.sliding_windows else None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
        self.q_norm, self.k_norm = q_norm, k_norm
        self.fused = False  # rotary embedding through kernels/norm_rope.py (use_fused_kernels)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [T, heads, head_dim] of x [T, hidden], q and k normalised (Qwen3) and rotated: everything before
        attending, shared with the converter's calibration pass, which attends over whole rows without a cache."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: each head normalised before rotary
            q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            from kernels.norm_rope import rotary  # triton compiles only where it runs

            return rotary(q, cos, sin), rotary(k, cos, sin), v
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        out = attend_paged(q, k, v, cache, self.layer, batch, window=self.window)
        return self.o_proj(out.reshape(x.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Also one expert of a SparseMoe."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP | SparseMoe) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch, cache: PagedKVCache
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, batch, cache)
        return x + self.mlp(self.mlp_norm(x))


class DecoderModel(nn.Module):
    def __init__(
        self, config: DecoderConfig, embed: torch.Tensor, blocks: list[Block], norm: RMSNorm, head: Linear
    ) -> None:
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


def use_fused_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Route every RMSNorm and rotary embedding of ``model`` through one Triton launch each (kernels/norm_rope.py,
    CUDA or the Triton interpreter): the same rounding, a dozen fewer kernels per layer. Returns the modules set."""
    modules = [m for m in model.modules() if isinstance(m, (RMSNorm, Attention))]
    for m in modules:
        m.fused = enabled
    return len(modules)


def build_block(
    config: DecoderConfig,
    spec: ArchSpec,
    layer: int,
    tensor: Callable[[str], torch.Tensor],
    linear: Callable[[str], Linear],
) -> Block:
    """Decoder block ``layer`` as ``spec`` lays it out; ``tensor(name)`` gives a plain tensor (norms, the router) and
    ``linear(prefix)`` a linear, so the converter builds the same block from its own weights."""
    p = spec.layer_prefix(layer)

    def mlp(gate_up_down: tuple[str, str, str]) -> MLP:
        return MLP(*(linear(prefix) for prefix in gate_up_down))

    q_norm = k_norm = None
    if spec.qk_norm:
        q_norm = RMSNorm(tensor(f"{p}.self_attn.q_norm.weight"), config.rms_norm_eps)
        k_norm = RMSNorm(tensor(f"{p}.self_attn.k_norm.weight"), config.rms_norm_eps)
    attn = Attention(config, layer, *(linear(prefix) for prefix in spec.attention_linears(layer)), q_norm, k_norm)
    if config.moe is not None and layer in config.moe.sparse_layers:
        moe, moe_spec = config.moe, spec.moe
        assert moe_spec is not None  # a MoeConfig is only parsed for families that declare a MoeSpec
        shared = shared_gate = None
        if moe_spec.shared_expert:
            shared = mlp(moe_spec.shared(p))
            shared_gate = linear(moe_spec.shared_gate(p))
        ffn: MLP | SparseMoe = SparseMoe(
            tensor(f"{moe_spec.router(p)}.weight"),
            [mlp(moe_spec.expert(p, e)) for e in range(moe.num_experts)],
            moe.top_k,
            moe.norm_topk_prob,
            shared,
            shared_gate,
        )
    else:
        ffn = mlp(spec.dense_mlp_linears(layer))
    attn_norm = RMSNorm(tensor(f"{p}.input_layernorm.weight"), config.rms_norm_eps)
    mlp_norm = RMSNorm(tensor(f"{p}.post_attention_layernorm.weight"), config.rms_norm_eps)
    return Block(attn_norm, attn, mlp_norm, ffn)


def build_decoder(
    config: DecoderConfig, spec: ArchSpec, source: TensorSource, dtype: torch.dtype, device: torch.device | str
) -> DecoderModel:
    """A DecoderModel from the Hugging Face tensor names in ``source``, laid out as ``spec`` declares."""
    device = torch.device(device)

    def tensor(name: str) -> torch.Tensor:
        return source.get(name).to(device=device, dtype=dtype)

    def linear(prefix: str) -> Linear:
        return build_linear(prefix, source, dtype, device)

    blocks = [build_block(config, spec, i, tensor, linear) for i in range(config.num_hidden_layers)]
    embed = tensor("model.embed_tokens.weight")
    has_head = any(name.startswith("lm_head.") for name in source.keys())
    if has_head:
        head = linear("lm_head")
    elif config.tie_word_embeddings:
        head = DenseLinear(embed)  # shares storage with the embedding
    else:
        raise KeyError(f"{source.model_dir} has no lm_head tensors and its config does not tie word embeddings")
    norm = RMSNorm(tensor("model.norm.weight"), config.rms_norm_eps)
    return DecoderModel(config, embed, blocks, norm, head).to(device).eval()  # .to moves the rotary buffer too
