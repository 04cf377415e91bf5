"""Trellis Viterbi forward pass (Triton): the quantizer's inner loop, one program per 16x16 tile.

The torch reference is ``converter_worker.quant.viterbi`` (``forward_torch``); this kernel is a drop-in
``ForwardPass`` for its two-pass tail-biting driver, which also does the (cheap, vectorized) backtrack.

Each program walks its tile's 256 (or fewer) steps. A step reads the previous cost of all 65536 states and writes
the new one: for a chunk of groups g (the states s = g * 2^K + c share predecessors hi * 2^(16-K) + g) it loads the
[2^K, groups] predecessor costs, takes the min over hi (recorded in the best-history, which the backtrack reads),
and writes best + (codebook[s] - x_t)^2 for the [groups, 2^K] states of those groups. Costs ping-pong between two
64K-float buffers per tile in global memory (L2-resident on a big GPU), with a CTA barrier between steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from converter_worker.quant.viterbi import (
    DEFAULT_WRAP_CONTEXT,
    STATES,
    decode_to_tiles,
    tail_biting_search,
    tiles_to_sequences,
)
from kernels.hadamard import check_device

CHUNK = 4096  # states updated per inner iteration (groups * 2^K)
HISTORY_BYTES = 8 * 1024**3  # best-history budget per batch of tiles


@triton.jit
def _viterbi_forward_kernel(
    x_ptr,  # float32 [T, n] targets
    table_ptr,  # float32 [65536] codebook values
    cost_ptr,  # float32 [T, 2, 65536]: buffer 0 holds the initial costs
    best_ptr,  # float32 [n, T, 65536 >> K] per-step group minima
    n_steps: tl.constexpr,  # 256, or twice the wrap context: few distinct values, each compiled once
    n_tiles,
    K: tl.constexpr,
    GROUPS: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)  # offsets into the history pass 2^31 on big batches
    FAN: tl.constexpr = 1 << K
    LOW: tl.constexpr = 65536 >> K
    cost_base = cost_ptr + tile * 2 * 65536
    hi = tl.arange(0, FAN)
    lane = tl.arange(0, GROUPS)
    for t in range(n_steps):
        x = tl.load(x_ptr + tile * n_steps + t)
        src = cost_base + (t % 2) * 65536
        dst = cost_base + ((t + 1) % 2) * 65536
        best_row = best_ptr + (t * n_tiles + tile) * LOW
        for g0 in range(0, LOW, GROUPS):
            g = g0 + lane
            prev = tl.load(src + hi[:, None] * LOW + g[None, :])  # [FAN, GROUPS]
            best = tl.min(prev, axis=0)
            tl.store(best_row + g, best)
            s = g[:, None] * FAN + hi[None, :]  # [GROUPS, FAN]
            d = tl.load(table_ptr + s) - x
            tl.store(dst + s, best[:, None] + d * d)
        tl.debug_barrier()  # every state's new cost is written before any is read as the previous one


@triton.jit
def _viterbi_backtrack_kernel(
    x_ptr,  # float32 [T, n]
    table_ptr,  # float32 [65536]
    best_ptr,  # float32 [n, T, 65536 >> K]
    end_ptr,  # int64 [T]
    states_ptr,  # int64 [T, n] output
    n_steps: tl.constexpr,
    n_tiles,
    K: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    FAN: tl.constexpr = 1 << K
    LOW: tl.constexpr = 65536 >> K
    hi = tl.arange(0, FAN)
    state = tl.load(end_ptr + tile)
    for i in range(n_steps - 1):
        t = n_steps - 1 - i
        tl.store(states_ptr + tile * n_steps + t, state)
        preds = hi * LOW + (state >> K)  # the states that can precede it
        d = tl.load(table_ptr + preds) - tl.load(x_ptr + tile * n_steps + t - 1)
        cost = tl.load(best_ptr + ((t - 1) * n_tiles + tile) * LOW + (preds >> K)) + d * d
        state = tl.sum(tl.where(hi == tl.argmin(cost, axis=0), preds, 0), axis=0)
    tl.store(states_ptr + tile * n_steps, state)


def backtrack_triton(
    best: torch.Tensor, x: torch.Tensor, K: int, table: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """``Backtrack`` with one program per tile (a torch backtrack costs hundreds of tiny launches per call)."""
    tiles, n = x.shape
    states = torch.empty(tiles, n, dtype=torch.int64, device=x.device)
    end = end.to(torch.int64).contiguous()
    _viterbi_backtrack_kernel[(tiles,)](x, table.contiguous(), best, end, states, n_steps=n, n_tiles=tiles, K=K)
    return states


def forward_triton(
    x: torch.Tensor, K: int, table: torch.Tensor, start: torch.Tensor | None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ForwardPass`` on the GPU (or under TRITON_INTERPRET=1 on the CPU): (best history, free-end argmin state)."""
    check_device(x, table)
    tiles, n = x.shape
    low = STATES >> K
    cost = torch.empty(tiles, 2, STATES, device=x.device, dtype=torch.float32)
    if start is None:
        cost[:, 0].zero_()
    else:
        cost[:, 0].fill_(float("inf"))
        cost[torch.arange(tiles, device=x.device), 0, start.long()] = 0.0
    best = torch.empty(n, tiles, low, device=x.device, dtype=torch.float32)
    groups = max(1, min(low, (chunk or CHUNK) >> K))
    _viterbi_forward_kernel[(tiles,)](x, table.contiguous(), cost, best, n_steps=n, n_tiles=tiles, K=K, GROUPS=groups)
    final = cost[:, n % 2]
    return best, final.argmin(dim=-1)


def viterbi_states_triton(
    targets: torch.Tensor, K: int, codebook: str, wrap_context: int = DEFAULT_WRAP_CONTEXT
) -> torch.Tensor:
    """Same contract as ``converter_worker.quant.viterbi.viterbi_states``, with the Triton forward pass."""
    return tail_biting_search(targets, K, codebook, forward_triton, wrap_context, HISTORY_BYTES, backtrack_triton)


def quantize_tiles_triton(
    tiles: torch.Tensor, K: int, codebook: str, wrap_context: int = DEFAULT_WRAP_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``converter_worker.quant.viterbi.quantize_tiles``, with the Triton forward pass."""
    states = viterbi_states_triton(tiles_to_sequences(tiles), K, codebook, wrap_context)
    return states, decode_to_tiles(states, codebook)
