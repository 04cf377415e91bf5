"""Torch reference trellis search: the K-bit codes of 16x16 tiles that best reproduce target values.

A tile is one walk of 256 steps over 16-bit states, ``state_t = ((state_{t-1} << K) | code_t) & 0xFFFF``, and each
step emits ``codebook[state_t]``. Viterbi keeps, for every one of the 65536 states, the cheapest walk that ends in
it; a state's predecessors are the 2^K states that share its top 16-K bits as their low bits, so one step is a
min-reduction of the cost vector viewed as [2^K, 2^(16-K)] followed by adding each state's squared error.

The walk must be tail-biting (its first state is built from the last codes of the same tile). As in QTIP and
ExLlamaV3 this takes two passes: a free search over the steps around the wrap point (the last ``wrap_context``
positions, then the first ``wrap_context``) picks the wrap state; the full search then starts and ends in it.

Vectorized over tiles and states; runs on any device (the CPU path for tests, and the oracle for the Triton kernel
in kernels/viterbi.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kernels.exl3_ref import codebook_table, tile_positions

STATES = 1 << 16
STEPS = 256
DEFAULT_WRAP_CONTEXT = 64  # steps of look-back and look-ahead when choosing the wrap state
# tiles are searched in batches whose per-step minima fit in this much memory (a GPU has room for big batches)
_HISTORY_BYTES = 256 * 1024**2
_DEVICE_HISTORY_BYTES = 8 * 1024**3


@contextmanager
def _cpu_single_threaded(device: torch.device) -> Iterator[None]:
    """The search is thousands of small ops; on a CPU, splitting each over threads costs more than it gains (and
    collapses when the cores are shared), so it runs on one thread."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check(targets: torch.Tensor, K: int) -> None:
    if not isinstance(K, int) or not 1 <= K <= 8:
        raise ValueError(f"bits per weight K must be an integer in 1..8, got {K!r}")
    if targets.dim() != 2 or targets.shape[-1] != STEPS:
        raise ValueError(f"targets must have shape [tiles, {STEPS}] (sequence order), got {tuple(targets.shape)}")
    if not targets.dtype.is_floating_point:
        raise TypeError(f"targets must be a float tensor, got {targets.dtype}")
    if not torch.isfinite(targets).all():
        raise ValueError("targets contain NaN or infinity; the weights or their scales are broken")


def _min_over_predecessors(cost: torch.Tensor, out: torch.Tensor) -> None:
    """out[T, g] = min over hi of cost[T, g & mask, hi, g >> K] (cost viewed [T, 2^K, 2^K, 2^(16-2K)])."""
    tiles, fan, _, rest = cost.shape
    strided_out = out.view(tiles, rest, fan).transpose(1, 2)
    if fan == 2:  # two elementwise minima beat a reduction plus a transposing copy
        torch.minimum(cost[:, :, 0], cost[:, :, 1], out=strided_out)
    else:
        strided_out.copy_(cost.amin(dim=2))


# A forward pass: (targets x [T, n], K, codebook table, start state [T] or None for a free start) ->
# (best [n, T, 2^(16-K)]: each step's cheapest cost into every group of states, the free-end argmin state [T]).
ForwardPass = Callable[[torch.Tensor, int, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]
# A backtrack: (best history, targets x [T, n], K, table, end state [T]) -> states [T, n] (any int dtype).
Backtrack = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]


def forward_torch(
    x: torch.Tensor, K: int, table: torch.Tensor, start: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference forward pass (see ``ForwardPass``).

    Write a state as s = g * 2^K + c (group g = s >> K, its last code c). All states of group g share the
    predecessors p = hi * 2^(16-K) + g. Costs are kept code-major, cost[c, g], so adding a group's best predecessor
    broadcasts along the outer axis (several times faster on the CPU than broadcasting along the inner one), and a
    predecessor p sits at [g & (2^K-1), hi * 2^(16-2K) + (g >> K)]: the min over hi is a middle-axis reduction.
    Only each step's per-group minima are kept; the backtrack recomputes the 2^K candidate costs of the one state it
    follows, which is far cheaper than recording an argmin at every step.
    """
    tiles, n = x.shape
    low, fan = STATES >> K, 1 << K
    device = x.device
    by_code = table.view(low, fan).t().contiguous().unsqueeze(0)  # [1, c, g] = table[g * fan + c]
    if start is None:
        cost = torch.zeros(tiles, fan, low, device=device)
    else:
        cost = torch.full((tiles, fan, low), float("inf"), device=device)
        cost[torch.arange(tiles, device=device), start.long() & (fan - 1), start.long() >> K] = 0.0
    best = torch.empty(n, tiles, low, device=device)
    diff = torch.empty(tiles, fan, low, device=device)
    for t in range(n):
        _min_over_predecessors(cost.view(tiles, fan, fan, low // fan), best[t])
        torch.sub(by_code, x[:, t].view(tiles, 1, 1), out=diff)
        torch.addcmul(best[t].unsqueeze(1), diff, diff, out=cost)
    flat = cost.view(tiles, STATES).argmin(dim=-1)  # = c * low + g
    return best, (flat % low) * fan + flat // low


def backtrack(best: torch.Tensor, x: torch.Tensor, K: int, table: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The state sequence [T, n] ending in ``end`` [T], following each state's cheapest predecessor."""
    tiles, n = x.shape
    low, fan = STATES >> K, 1 << K
    states = torch.empty(tiles, n, dtype=torch.long, device=x.device)
    hi = torch.arange(fan, device=x.device) * low
    state = end.long()
    for t in range(n - 1, 0, -1):
        states[:, t] = state
        preds = hi + (state >> K).unsqueeze(-1)  # [T, fan]: the states that can precede it
        d = table[preds] - x[:, t - 1 : t]
        pred_cost = torch.addcmul(best[t - 1].gather(1, preds >> K), d, d)
        state = preds.gather(1, pred_cost.argmin(dim=-1, keepdim=True)).squeeze(-1)
    states[:, 0] = state
    return states


def tail_biting_search(
    targets: torch.Tensor,
    K: int,
    codebook: str,
    forward: ForwardPass,
    wrap_context: int = DEFAULT_WRAP_CONTEXT,
    history_bytes: int = _HISTORY_BYTES,
    trace: Backtrack | None = None,
) -> torch.Tensor:
    """The two-pass tail-biting search with any forward pass (and backtrack); int32 states [T, 256]."""
    trace = trace or backtrack
    _check(targets, K)
    if not 1 <= wrap_context <= STEPS // 2:
        raise ValueError(f"wrap_context must be in 1..{STEPS // 2}, got {wrap_context}")
    table = codebook_table(codebook, targets.device).float()
    x = targets.float().contiguous()
    batch = max(1, history_bytes // (4 * STEPS * (STATES >> K)))
    out = []
    for chunk in x.split(batch):
        # free search around the wrap point: the last wrap_context steps, then the first ones
        window = torch.cat([chunk[:, STEPS - wrap_context :], chunk[:, :wrap_context]], dim=1).contiguous()
        best, last = forward(window, K, table, None)
        wrap = trace(best, window, K, table, last)[:, wrap_context - 1]
        del best
        best, _ = forward(chunk, K, table, wrap)
        out.append(trace(best, chunk, K, table, wrap))
    return torch.cat(out).to(torch.int32)


def viterbi_states(
    targets: torch.Tensor, K: int, codebook: str, wrap_context: int = DEFAULT_WRAP_CONTEXT
) -> torch.Tensor:
    """int32 [T, 256] tail-biting trellis states minimizing squared error to ``targets`` [T, 256] (sequence order).

    ``pack_codes(states, K)`` stores them (it keeps the low K bits, which are the codes).
    """
    budget = _HISTORY_BYTES if targets.device.type == "cpu" else _DEVICE_HISTORY_BYTES
    with _cpu_single_threaded(targets.device):
        return tail_biting_search(targets, K, codebook, forward_torch, wrap_context, budget)


def tiles_to_sequences(tiles: torch.Tensor) -> torch.Tensor:
    """[T, 16, 16] tiles (row = input index) -> [T, 256] values in trellis sequence order."""
    if tiles.dim() != 3 or tiles.shape[1:] != (16, 16):
        raise ValueError(f"tiles must have shape [T, 16, 16], got {tuple(tiles.shape)}")
    return tiles.reshape(-1, 256)[:, tile_positions(tiles.device)]


def decode_to_tiles(states: torch.Tensor, codebook: str) -> torch.Tensor:
    """int states [T, 256] -> float32 [T, 16, 16] codebook values in the tiles' row-major layout."""
    values = codebook_table(codebook, states.device).float()[states.long()]
    decoded = torch.empty_like(values)
    decoded[:, tile_positions(states.device)] = values
    return decoded.view(-1, 16, 16)


def quantize_tiles(
    tiles: torch.Tensor, K: int, codebook: str, wrap_context: int = DEFAULT_WRAP_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [T, 16, 16] tiles (row = input index): (states int32 [T, 256] in sequence order, decoded [T, 16, 16]).

    Decoded values are the codebook's float16 values as float32, placed back in the tiles' row-major layout.
    """
    states = viterbi_states(tiles_to_sequences(tiles), K, codebook, wrap_context)
    return states, decode_to_tiles(states, codebook)
