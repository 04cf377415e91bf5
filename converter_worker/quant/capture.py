"""Recording the inputs of a block's linears while the serving model's own block code runs.

A forward pre-hook on the first linear of each input group adds what that linear reads to the group's Hessian
accumulator; the other members (k and v after q, up after gate, every expert's gate/up after expert 0's) read the same
input and share it, so they are not hooked (counting the same rows twice would only cost time).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from converter_worker.quant.hessian import HessianAccumulator


class InputCapture:
    """Hessians of linear inputs, one per group. ``groups`` maps every linear's name to its group's first linear;
    ``linears`` maps names to the modules. Hooks record only inside ``recording()``."""

    def __init__(self, linears: dict[str, nn.Module], groups: dict[str, str], device: torch.device | str) -> None:
        missing = sorted(set(groups.values()) - set(linears))
        if missing:
            raise ValueError(f"no module for the input group(s) {', '.join(missing)}")
        self.groups = dict(groups)
        self.accumulators = {
            leader: HessianAccumulator(int(linears[leader].in_features), device) for leader in set(groups.values())
        }
        self.linears = linears

    def _record(self, leader: str) -> Any:
        accumulator = self.accumulators[leader]

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            accumulator.add(args[0])

        return hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks on the group leaders while the block runs inside; removed on the way out, whatever happens."""
        handles = [self.linears[leader].register_forward_pre_hook(self._record(leader)) for leader in self.accumulators]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def hessians(self) -> dict[str, torch.Tensor]:
        """H = X^T X / n of every linear's input (members of a group share one tensor)."""
        per_group = {leader: acc.hessian() for leader, acc in self.accumulators.items()}
        return {name: per_group[leader] for name, leader in self.groups.items()}
