"""Bit allocation: an integer K per linear whose average over the model meets a fractional target.

Every linear starts at floor(target). Whole groups are then promoted by one bit (q/k/v together, o, gate/up
together, down), in priority order, while the average stays within the target: attention before MLP (attention
is a small share of the weights and sensitive), and within each kind the layers nearest the ends of the stack first
(the first and last layers are the most sensitive to quantization error).

In a mixture-of-experts layer a group spans every expert (quant/layout.py): all gate/up of the layer, experts and
shared expert, are one group and all downs another, so every expert of a layer gets the same K per projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_BITS, MAX_BITS = 1, 8
UNQUANTIZED_HEAD_BITS = 16  # -hb 16 keeps the output head in float16


@dataclass(frozen=True)
class LinearShape:
    name: str  # e.g. model.layers.3.self_attn.q_proj
    layer: int
    group: str  # "qkv" | "o" | "gate_up" | "down"
    in_features: int
    out_features: int

    @property
    def stored_weights(self) -> int:
        """Weights as stored (padded to 128), which is what the bits are counted over."""
        return -(-self.in_features // 128) * 128 * (-(-self.out_features // 128) * 128)


_GROUP_ORDER = ("qkv", "o", "down", "gate_up")  # promotion priority between groups of the same distance


def check_bits(bits: float) -> float:
    if not isinstance(bits, (int, float)) or math.isnan(bits) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits per weight must be a number in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return float(bits)


def check_head_bits(head_bits: int) -> int:
    if not isinstance(head_bits, int) or not (MIN_BITS <= head_bits <= MAX_BITS or head_bits == UNQUANTIZED_HEAD_BITS):
        raise ValueError(
            f"head bits must be an integer in {MIN_BITS}..{MAX_BITS}, or {UNQUANTIZED_HEAD_BITS} to keep the head "
            f"unquantized; got {head_bits!r}"
        )
    return head_bits


def allocate_bits(linears: list[LinearShape], target: float, num_layers: int) -> dict[str, int]:
    """K for every linear (by name) so that the stored-weight average is as close to ``target`` as whole-group
    promotions allow without exceeding it."""
    target = check_bits(target)
    base = min(int(math.floor(target)), MAX_BITS)
    bits = {lin.name: base for lin in linears}
    if base == MAX_BITS:
        return bits
    total = sum(lin.stored_weights for lin in linears)
    budget = target * total - base * total  # extra bits we may still spend
    groups: dict[tuple[int, str], list[LinearShape]] = {}
    for lin in linears:
        groups.setdefault((lin.layer, lin.group), []).append(lin)

    def priority(key: tuple[int, str]) -> tuple[int, int, int, int]:
        layer, group = key
        attention = 0 if group in ("qkv", "o") else 1
        distance = min(layer, num_layers - 1 - layer)
        return attention, distance, _GROUP_ORDER.index(group), layer

    for key in sorted(groups, key=priority):
        cost = sum(lin.stored_weights for lin in groups[key])
        if cost <= budget + 1e-9 * total:
            for lin in groups[key]:
                bits[lin.name] += 1
            budget -= cost
    return bits


def average_bits(linears: list[LinearShape], bits: dict[str, int]) -> float:
    total = sum(lin.stored_weights for lin in linears)
    return sum(bits[lin.name] * lin.stored_weights for lin in linears) / total
