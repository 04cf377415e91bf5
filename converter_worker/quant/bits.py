"""Bit allocation: an integer K per linear whose average over the model meets a fractional target.

Every linear starts at floor(target). Whole groups are then promoted by one bit (q/k/v together, o, gate/up
together, down), in priority order, while the average stays within the target: attention before MLP (attention
is a small share of the weights and sensitive), and within each kind the layers nearest the ends of the stack first
(the first and last layers are the most sensitive to quantization error).

In a mixture-of-experts layer a group spans every expert (quant/layout.py): all gate/up of the layer, experts and
shared expert, are one group and all downs another, so every expert of a layer gets the same K per projection.
"""

from __future__ import annotations

import heapq
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
ALLOCATION_SPREAD = (1, 1)  # the measured plan's K: from floor(target) - 1 to floor(target) + 1


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


def _priority(key: tuple[int, str], num_layers: int) -> tuple[int, int, int, int]:
    """The plain plan's promotion order of a (layer, group): attention first, then the layers nearest the ends."""
    layer, group = key
    attention = 0 if group in ("qkv", "o") else 1
    distance = min(layer, num_layers - 1 - layer)
    return attention, distance, _GROUP_ORDER.index(group), layer


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

    for key in sorted(groups, key=lambda key: _priority(key, num_layers)):
        cost = sum(lin.stored_weights for lin in groups[key])
        if cost <= budget + 1e-9 * total:
            for lin in groups[key]:
                bits[lin.name] += 1
            budget -= cost
    return bits


def allocate_bits_by_sensitivity(
    linears: list[LinearShape],
    target: float,
    num_layers: int,
    damage: dict[str, float],
    code_error: dict[int, float],
    spread: tuple[int, int] | None = None,
) -> dict[str, int]:
    """K for every linear minimizing the expected output damage sum(damage[name] * code_error[K]) (quant/sensitivity.py)
    with the stored-weight average at most ``target``, groups moving together as in ``allocate_bits``.

    Every group starts ``spread[0]`` bits below floor(target) (default: ``ALLOCATION_SPREAD``) and is promoted a bit
    at a time, the group that removes the most damage per stored weight first (ties in ``allocate_bits``' order), up
    to ``spread[1]`` bits above it, while the budget allows: the marginal gains fall with each bit, so this is the
    greedy optimum of a knapsack whose items shrink. The spread bounds how far a noisy estimate can move any tensor
    from the plain plan."""
    target = check_bits(target)
    below, above = spread or ALLOCATION_SPREAD
    base = min(int(math.floor(target)), MAX_BITS)
    lo, hi = max(MIN_BITS, base - below), min(MAX_BITS, base + above)
    groups: dict[tuple[int, str], list[LinearShape]] = {}
    for lin in linears:
        groups.setdefault((lin.layer, lin.group), []).append(lin)
    total = sum(lin.stored_weights for lin in linears)
    budget = target * total - lo * total
    level = dict.fromkeys(groups, lo)
    cost = {key: sum(lin.stored_weights for lin in members) for key, members in groups.items()}
    group_damage = {key: sum(damage.get(lin.name, 0.0) for lin in members) for key, members in groups.items()}

    def entry(key: tuple[int, str]) -> tuple[float, tuple[int, int, int, int], tuple[int, str]]:
        gain = group_damage[key] * (code_error[level[key]] - code_error[level[key] + 1])
        return -gain / cost[key], _priority(key, num_layers), key

    heap = [entry(key) for key in groups if lo < hi]
    heapq.heapify(heap)
    while heap:
        _, _, key = heapq.heappop(heap)
        if cost[key] > budget + 1e-9 * total:
            continue  # the budget only shrinks: this group can never be promoted again
        level[key] += 1
        budget -= cost[key]
        if level[key] < hi:
            heapq.heappush(heap, entry(key))
    return {lin.name: level[(lin.layer, lin.group)] for lin in linears}


def average_bits(linears: list[LinearShape], bits: dict[str, int]) -> float:
    total = sum(lin.stored_weights for lin in linears)
    return sum(bits[lin.name] * lin.stored_weights for lin in linears) / total
