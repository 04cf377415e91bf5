"""Calibration of a sparse mixture-of-experts MLP (``inference_worker.moe.SparseMoe``).

Capture: the router would send each expert only the few tokens it likes, and an expert it rarely (or never) picks on
the calibration text would get a Hessian from a handful of rows, or none. As the public EXL3 recipe does, every token
is sent through every expert while the Hessians are recorded, so each expert's gate/up see all rows (the same input
the shared expert and the router read) and each down sees what its own gate/up make of all of them.

Output: the block's output that moves the calibration state on uses the model's real routing, mixed without the
atomic adds of ``SparseMoe.run_experts`` (``index_add_`` is not bit-reproducible on a GPU), so a resumed conversion
computes exactly what an uninterrupted one did.
"""

from __future__ import annotations

import torch

from inference_worker.moe import SparseMoe


def run_every_expert(moe: SparseMoe, x: torch.Tensor) -> None:
    """x [T, hidden] through every routed expert and the shared expert; the outputs are not needed, only the inputs
    the hooked linears see on the way."""
    for expert in moe.experts:
        expert(x)
    if moe.shared_expert is not None:
        moe.shared_expert(x)


def routed_output(moe: SparseMoe, x: torch.Tensor) -> torch.Tensor:
    """What ``moe(x)`` computes for x [T, hidden]: each token's top-k experts by the router, mixed by its weights,
    plus the gated shared expert. Each (token, slot) is written once and the slots summed in order: deterministic."""
    weights, chosen = moe.route(x)
    mixed = torch.zeros(*chosen.shape, x.shape[-1], dtype=torch.float32, device=x.device)
    for e, expert in enumerate(moe.experts):
        tokens, slots = (chosen == e).nonzero(as_tuple=True)
        if tokens.numel():
            mixed[tokens, slots] = expert(x[tokens]).float() * weights[tokens, slots, None]
    return moe.add_shared(x, mixed.sum(dim=1).to(x.dtype))
