"""What the converter does with each tensor of one decoder layer, for every supported family.

The family's ``ArchSpec`` names the linears and groups them by shared input (``spec.linear_groups``): q/k/v; o; the
gate/up of the MLP (of every expert and the shared expert too, which all read the same normalised hidden state); each
down on its own. This module adds what quantization needs on top of that: the Hessian each linear uses (its input
group's), the bit-allocation group it is promoted with (all experts of a layer together, per projection), and the
tensors of the layer that stay unquantized (norms, and the MoE router and shared-expert gate).
"""

from __future__ import annotations

from dataclasses import dataclass

from inference_worker.models.decoder import DecoderConfig
from inference_worker.models.spec import ArchSpec

NORMS = ("input_layernorm", "post_attention_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class QuantizedLinear:
    name: str  # its Hugging Face prefix, e.g. model.layers.3.mlp.experts.5.down_proj
    input_group: str  # the first linear of its input group: every member shares that linear's Hessian
    bit_group: str  # "qkv" | "o" | "gate_up" | "down": promoted by one bit together within the layer


def experts_in_layer(config: DecoderConfig, layer: int) -> int:
    """How many routed experts the layer's MLP has (0: a dense MLP)."""
    moe = config.moe
    return moe.num_experts if moe is not None and layer in moe.sparse_layers else 0


def quantized_linears(spec: ArchSpec, config: DecoderConfig, layer: int) -> list[QuantizedLinear]:
    """Every linear of the layer that is stored as EXL3, in the spec's order (q, k, v, o, gate, up, down for Llama)."""
    groups = spec.linear_groups(layer, experts_in_layer(config, layer))
    # linear_groups lists q/k/v, then o, then the whole gate/up group, then every down (one per expert) last
    kinds = ["qkv", "o", "gate_up"] + ["down"] * (len(groups) - 3)
    return [QuantizedLinear(name, group[0], kind) for group, kind in zip(groups, kinds, strict=True) for name in group]


def norm_tensors(spec: ArchSpec, layer: int) -> list[str]:
    """The layer's RMSNorm weights (stored in 16 bits, like every other unquantized tensor)."""
    p = spec.layer_prefix(layer)
    names = [f"{p}.{n}.weight" for n in NORMS]
    if spec.qk_norm:
        names += [f"{p}.{n}.weight" for n in QK_NORMS]
    return names


def routing_linears(spec: ArchSpec, config: DecoderConfig, layer: int) -> list[str]:
    """Prefixes of the MoE router and the shared-expert gate: tiny, and quantizing them would change which experts
    run and how much the shared expert counts, so they keep their source dtype."""
    if experts_in_layer(config, layer) == 0 or spec.moe is None:
        return []
    p = spec.layer_prefix(layer)
    prefixes = [spec.moe.router(p)]
    if spec.moe.shared_expert:
        prefixes.append(spec.moe.shared_gate(p))
    return prefixes
