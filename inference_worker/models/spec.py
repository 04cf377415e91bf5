"""What a model family declares: the names it goes by, which tensors it has, and how it differs from plain Llama.

Every supported family is a decoder-only transformer with RMSNorm, rotary attention and SwiGLU MLPs, so one shared
model (``decoder.py``) runs them all. A family module (``llama.py``, ``qwen3.py``, ``mixtral.py``, ...) is just an
``ArchSpec``: the config.json names that select it, and the few things that differ (per-head q/k norms, which layers
use a sliding window, where a mixture-of-experts keeps its router and experts). The builder and the converter both
read tensor names from here, so a family's layout is written down exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (config.json dict, layer index) -> does this layer use the config's sliding window?
SlidingRule = Callable[[dict[str, Any], int], bool]


def every_layer(config: dict[str, Any], layer: int) -> bool:
    """Mistral, Mixtral, Qwen3-MoE: when a window is set, every layer uses it."""
    return True


def layers_from_max_window_layers(config: dict[str, Any], layer: int) -> bool:
    """Qwen2/Qwen3: layers from ``max_window_layers`` on use the window (the first ones attend fully)."""
    return layer >= int(config.get("max_window_layers", 0))


def even_layers_below_max_window_layers(config: dict[str, Any], layer: int) -> bool:
    """Qwen2-MoE: every other layer (0, 2, ...) below ``max_window_layers`` uses the window."""
    return layer % 2 == 0 and layer < int(config.get("max_window_layers", 0))


@dataclass(frozen=True)
class MoeSpec:
    """Where a family's sparse MLP keeps its tensors, and the routing rule that is not in config.json."""

    block: str  # the module under each layer holding router and experts: "{block}.gate", "{block}.experts.{e}..."
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up and down
    always_norm_topk: bool = False  # Mixtral renormalises the top-k weights; Qwen follows config's norm_topk_prob
    # Qwen2-MoE: a "{block}.shared_expert" MLP every token uses, scaled by sigmoid("{block}.shared_expert_gate")
    shared_expert: bool = False

    def router(self, layer_prefix: str) -> str:
        return f"{layer_prefix}.{self.block}.gate"

    def expert(self, layer_prefix: str, expert: int) -> tuple[str, str, str]:
        """Prefixes of expert ``expert``'s gate, up and down linears."""
        base = f"{layer_prefix}.{self.block}.experts.{expert}"
        gate, up, down = self.expert_projs
        return f"{base}.{gate}", f"{base}.{up}", f"{base}.{down}"

    def shared(self, layer_prefix: str) -> tuple[str, str, str]:
        base = f"{layer_prefix}.{self.block}.shared_expert"
        return f"{base}.gate_proj", f"{base}.up_proj", f"{base}.down_proj"

    def shared_gate(self, layer_prefix: str) -> str:
        return f"{layer_prefix}.{self.block}.shared_expert_gate"


@dataclass(frozen=True)
class ArchSpec:
    """One model family. Defaults describe plain Llama; a family states only what differs."""

    name: str  # short name for messages and logs
    architectures: tuple[str, ...]  # config.json "architectures" values that select this family
    model_types: tuple[str, ...]  # config.json "model_type" values (used when "architectures" names nothing known)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k ("self_attn.q_norm"/"k_norm") before rotary
    sliding_layers: SlidingRule | None = None  # None: the family never uses a sliding window
    moe: MoeSpec | None = None  # None: every MLP is dense

    @staticmethod
    def layer_prefix(layer: int) -> str:
        return f"model.layers.{layer}"

    def attention_linears(self, layer: int) -> tuple[str, str, str, str]:
        p = f"{self.layer_prefix(layer)}.self_attn"
        return f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj", f"{p}.o_proj"

    def dense_mlp_linears(self, layer: int) -> tuple[str, str, str]:
        p = f"{self.layer_prefix(layer)}.mlp"
        return f"{p}.gate_proj", f"{p}.up_proj", f"{p}.down_proj"

    def linear_groups(self, layer: int, num_experts: int) -> list[tuple[str, ...]]:
        """The linears of one layer (``num_experts`` 0 for a dense MLP), grouped by shared input: q/k/v; o; the
        gate/up of the MLP (across every expert and the shared expert, which all read the same hidden state); each
        down on its own. This is what a quantizer captures one Hessian for. The MoE router and the shared-expert gate
        are not listed: they stay unquantized."""
        q, k, v, o = self.attention_linears(layer)
        groups: list[tuple[str, ...]] = [(q, k, v), (o,)]
        if num_experts == 0:
            gate, up, down = self.dense_mlp_linears(layer)
            return [*groups, (gate, up), (down,)]
        if self.moe is None:
            raise ValueError(
                f"{self.name} models have no mixture-of-experts layers, yet {num_experts} experts were asked"
            )
        p = self.layer_prefix(layer)
        experts = [self.moe.expert(p, e) for e in range(num_experts)]
        if self.moe.shared_expert:
            experts.append(self.moe.shared(p))
        gate_up = tuple(name for gate, up, _ in experts for name in (gate, up))
        return [*groups, gate_up, *[(down,) for _, _, down in experts]]
