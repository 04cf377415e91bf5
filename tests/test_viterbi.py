"""The torch reference trellis search: exact on encodable targets, near rate-distortion on Gaussian tiles."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorators: the kernel then runs on the CPU
if "kernels.viterbi" in sys.modules:  # imported earlier in this process without the interpreter: decorate again
    importlib.reload(sys.modules["kernels.viterbi"])

import pytest  # noqa: E402
import torch  # noqa: E402

from converter_worker.quant.viterbi import backtrack, forward_torch, quantize_tiles, viterbi_states  # noqa: E402
from kernels import viterbi as triton_viterbi  # noqa: E402
from kernels.exl3_ref import (  # noqa: E402
    CODEBOOKS,
    codebook_table,
    decode_trellis,
    pack_codes,
    tile_positions,
    unpack_states,
)

# Upper bounds on tile MSE / codebook variance for K = 1..8 (the bar).
MSE_BOUNDS = {1: 0.3, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1, 6: 0.07, 7: 0.05, 8: 0.04}


def _codebook_rms(codebook: str) -> float:
    return codebook_table(codebook).float().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("K", [1, 3, 4, 8])
def test_random_tail_biting_encoding_requantizes_with_zero_error(codebook: str, K: int) -> None:
    gen = torch.Generator().manual_seed(100 * K + CODEBOOKS.index(codebook))
    codes = torch.randint(0, 1 << K, (2, 256), generator=gen)
    states = unpack_states(pack_codes(codes, K), K)  # the valid tail-biting walk those codes spell
    table = codebook_table(codebook).float()
    targets = table[states.long()]

    found = viterbi_states(targets, K, codebook)

    assert torch.equal(table[found.long()], targets)
    # and what it found is itself a valid tail-biting walk: packing and unpacking its codes gives it back
    assert torch.equal(unpack_states(pack_codes(found, K), K), found)


@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("K", list(MSE_BOUNDS))
def test_gaussian_tile_error_is_within_the_bound_for_each_bitrate(codebook: str, K: int) -> None:
    gen = torch.Generator().manual_seed(7 * K + CODEBOOKS.index(codebook))
    rms = _codebook_rms(codebook)
    targets = torch.randn(8, 256, generator=gen) * rms  # unit Gaussian scaled to the codebook's RMS

    states = viterbi_states(targets, K, codebook)

    mse = (codebook_table(codebook).float()[states.long()] - targets).pow(2).mean().item()
    assert mse / rms**2 < MSE_BOUNDS[K], f"K={K} {codebook}: relative MSE {mse / rms**2:.4f}"


def test_error_falls_as_bits_rise() -> None:
    gen = torch.Generator().manual_seed(3)
    targets = torch.randn(4, 256, generator=gen)
    table = codebook_table("mul1").float()
    errors = [(table[viterbi_states(targets, K, "mul1").long()] - targets).pow(2).mean().item() for K in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[3] < errors[0] / 20, errors


def test_quantize_tiles_places_values_where_the_decoder_reads_them() -> None:
    gen = torch.Generator().manual_seed(11)
    tiles = torch.randn(2, 3, 16, 16, generator=gen)  # a 32 x 48 block of weights as [in/16, out/16] tiles
    states, decoded = quantize_tiles(tiles.reshape(-1, 16, 16), 4, "mcg")
    trellis = pack_codes(states, 4).reshape(2, 3, 64)

    dense = decode_trellis(trellis, 4, "mcg").float()  # rows = input features, as stored

    expected = decoded.reshape(2, 3, 16, 16).permute(0, 2, 1, 3).reshape(32, 48)
    assert torch.equal(dense, expected)
    assert (dense - tiles.permute(0, 2, 1, 3).reshape(32, 48)).pow(2).mean() < 0.02


def test_search_follows_the_tile_sequence_order() -> None:
    # a target that is exactly encodable only in sequence order: permuting it by the tile layout must still match
    states = unpack_states(pack_codes(torch.arange(256) % 16, 4), 4).unsqueeze(0)
    table = codebook_table("3inst").float()
    tile = torch.empty(256)
    tile[tile_positions()] = table[states[0].long()]
    _, decoded = quantize_tiles(tile.view(1, 16, 16), 4, "3inst")
    assert torch.equal(decoded.flatten(), tile)


@pytest.mark.parametrize(
    ("targets", "K", "message"),
    [
        (torch.zeros(2, 255), 2, "shape"),
        (torch.zeros(2, 256), 0, "integer in 1..8"),
        (torch.zeros(2, 256), 9, "integer in 1..8"),
        (torch.full((1, 256), float("nan")), 2, "NaN"),
        (torch.zeros(2, 256, dtype=torch.int32), 2, "float"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(targets: torch.Tensor, K: int, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        viterbi_states(targets, K, "mul1")


def test_unknown_codebook_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown codebook"):
        viterbi_states(torch.zeros(1, 256), 2, "e8p")


@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("constrained", [False, True])
def test_triton_forward_and_backtrack_match_the_torch_reference(K: int, constrained: bool) -> None:
    gen = torch.Generator().manual_seed(20 + K)
    x = torch.randn(2, 6, generator=gen)  # a few steps of two tiles: the interpreter is slow
    table = codebook_table("mcg").float()
    start = torch.randint(0, 65536, (2,), generator=gen) if constrained else None

    best_ref, last_ref = forward_torch(x, K, table, start)
    best, last = triton_viterbi.forward_triton(x, K, table, start, chunk=16384)

    assert torch.allclose(best, best_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(last, last_ref)
    assert torch.equal(triton_viterbi.backtrack_triton(best, x, K, table, last), backtrack(best, x, K, table, last))


def test_triton_search_finds_the_reference_solution_for_a_whole_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_viterbi, "CHUNK", 16384)
    gen = torch.Generator().manual_seed(30)
    targets = torch.randn(1, 256, generator=gen)
    table = codebook_table("mul1").float()

    found = triton_viterbi.viterbi_states_triton(targets, 4, "mul1")
    expected = viterbi_states(targets, 4, "mul1")

    assert torch.equal(unpack_states(pack_codes(found, 4), 4), found)  # a valid tail-biting walk
    err, err_ref = ((table[s.long()] - targets).pow(2).mean().item() for s in (found, expected))
    assert err == pytest.approx(err_ref, rel=1e-5)
