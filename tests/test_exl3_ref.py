"""The EXL3 torch reference against independently computed facts (numpy bit manipulation, plain Python loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.exl3_ref import (
    codebook_table,
    decode_states,
    decode_trellis,
    exl3_matmul_ref,
    hadamard_128,
    pack_codes,
    reconstruct_weight,
    tile_positions,
    unpack_states,
)

SAMPLE_STATES = [0, 1, 2, 0x00FF, 0x1234, 0x7FFF, 0x8000, 0xABCD, 0xC0DE, 0xFFFE, 0xFFFF]


def _half_from_bits(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _expected_lop3_sum(x: int) -> np.float16:
    x = (x & 0x8FFF8FFF) ^ 0x3B603B60
    # Both halves have exponents in 2^-3..2^0, so the float64 sum is exact and np.float16() rounds it once.
    return np.float16(_half_from_bits(x & 0xFFFF) + _half_from_bits(x >> 16))


def _expected(state: int, codebook: str) -> np.float16:
    if codebook == "3inst":
        return _expected_lop3_sum((state * 89226354 + 64248484) % 2**32)
    if codebook == "mcg":
        return _expected_lop3_sum((state * 0xCBAC1FED) % 2**32)
    x = (state * 0x83DCD12D) % 2**32
    c = sum((x >> shift) & 0xFF for shift in (0, 8, 16, 24))
    return np.float16(float(1024 + c) * _half_from_bits(0x1EEE) + _half_from_bits(0xC931))


@pytest.mark.parametrize("codebook", ["3inst", "mcg", "mul1"])
def test_decode_matches_hand_computed_fp16_bits(codebook: str) -> None:
    got = decode_states(torch.tensor(SAMPLE_STATES), codebook)
    want = np.array([_expected(s, codebook) for s in SAMPLE_STATES], dtype=np.float16)
    assert got.dtype == torch.float16
    assert got.view(torch.int16).numpy().tolist() == want.view(np.int16).tolist()


def test_decode_3inst_state_zero_by_hand() -> None:
    # 64248484 = 0x03D45AA4 -> & 0x8FFF8FFF = 0x03D40AA4 -> ^ 0x3B603B60 = 0x38B431C4
    lo, hi = (1 + 0x1C4 / 1024) / 8, (1 + 0xB4 / 1024) / 2  # 0x31C4 and 0x38B4 as fp16
    assert decode_states(torch.tensor([0]), "3inst").item() == float(np.float16(lo + hi))


@pytest.mark.parametrize(("codebook", "rms"), [("3inst", 1.2437), ("mcg", 1.2437), ("mul1", 1.0)])
def test_codebook_rms_over_all_states(codebook: str, rms: float) -> None:
    values = decode_states(torch.arange(65536), codebook).double()
    assert values.pow(2).mean().sqrt().item() == pytest.approx(rms, abs=2e-3)
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("codebook", ["3inst", "mcg", "mul1"])
def test_codebook_table_equals_direct_decode(codebook: str) -> None:
    states = torch.arange(65536)
    assert torch.equal(codebook_table(codebook).view(torch.int16), decode_states(states, codebook).view(torch.int16))


def _states_from_codes(codes: torch.Tensor, K: int) -> torch.Tensor:
    """Tail-biting walk written the slow way: state_t collects codes t, t-1, ... (wrapping) from the bottom up."""
    flat = codes.reshape(-1, 256).tolist()
    out = []
    for tile in flat:
        states = []
        for t in range(256):
            state = 0
            for j in range(-(-16 // K)):
                state |= tile[(t - j) % 256] << (j * K)
            states.append(state & 0xFFFF)
        out.append(states)
    return torch.tensor(out).reshape(codes.shape)


@pytest.mark.parametrize("K", range(1, 9))
def test_pack_unpack_round_trip_for_every_k(K: int) -> None:
    gen = torch.Generator().manual_seed(K)
    codes = torch.randint(0, 1 << K, (2, 3, 256), generator=gen)
    packed = pack_codes(codes, K)
    assert packed.dtype == torch.int16 and packed.shape == (2, 3, 16 * K)
    states = unpack_states(packed, K)
    assert torch.equal(states.long(), _states_from_codes(codes, K))
    # states carry their code in the low K bits, so packing states reproduces the same words
    assert torch.equal(pack_codes(states, K), packed)


def test_packed_words_are_msb_first_and_pairwise_swapped() -> None:
    K = 4
    codes = torch.zeros(256, dtype=torch.long)
    codes[0], codes[1], codes[2], codes[3] = 0x1, 0x2, 0x3, 0x4  # logical word 0 = 0x1234
    codes[4] = 0xA  # logical word 1 starts with 0xA
    words = pack_codes(codes, K).to(torch.int32) & 0xFFFF
    assert words[1].item() == 0x1234  # stored index 1 holds logical word 0
    assert words[0].item() == 0xA000  # stored index 0 holds logical word 1
    # state 0 wraps: its top bits come from the ring's last codes (all zero), its low 4 bits are code 0
    assert unpack_states(pack_codes(codes, K), K)[3].item() == 0x1234


def test_tile_positions_follow_the_fragment_order() -> None:
    pos = tile_positions().tolist()
    assert sorted(pos) == list(range(256))
    rc = [(p // 16, p % 16) for p in pos]
    assert rc[:8] == [(0, 0), (1, 0), (8, 0), (9, 0), (0, 8), (1, 8), (8, 8), (9, 8)]
    assert rc[8] == (2, 0)  # lane 1: r0 = 2
    assert rc[32] == (0, 1)  # lane 4: c0 = 1
    assert rc[255] == (15, 15)  # lane 31: r0 = 6, c0 = 7, j = 7


def test_decode_trellis_places_tiles_as_a_slow_loop_would() -> None:
    K, gen = 3, torch.Generator().manual_seed(1)
    trellis = pack_codes(torch.randint(0, 1 << K, (2, 3, 256), generator=gen), K)
    w = decode_trellis(trellis, K, "mcg")
    assert w.shape == (32, 48) and w.dtype == torch.float16
    states, pos = unpack_states(trellis, K), tile_positions().tolist()
    values = decode_states(states, "mcg")
    for i in range(2):
        for j in range(3):
            for s in range(256):
                r, c = divmod(pos[s], 16)
                assert w[16 * i + r, 16 * j + c].item() == values[i, j, s].item()


def test_hadamard_is_sylvester_orthogonal_and_scaled() -> None:
    h = hadamard_128(torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    signs = [[(-1) ** bin(j & k).count("1") for k in range(128)] for j in range(128)]
    assert torch.equal(torch.sign(h), torch.tensor(signs, dtype=torch.float64))
    assert torch.allclose(h.abs(), torch.full_like(h, 128**-0.5))


def _random_layer(k: int, n: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    trellis = pack_codes(torch.randint(0, 1 << K, (k // 16, n // 16, 256), generator=gen), K)
    suh = (torch.randn(k, generator=gen).sign() * 0.05).half()
    svh = (torch.randn(n, generator=gen).sign() * 0.05).half()
    return trellis, suh, svh


def test_reconstruct_equals_dense_formula_with_block_diagonal_hadamard() -> None:
    trellis, suh, svh = _random_layer(256, 384, 4, seed=2)
    w_hat = decode_trellis(trellis, 4, "3inst").double()
    h = hadamard_128(torch.float64)
    h_in, h_out = torch.block_diag(h, h), torch.block_diag(h, h, h)
    want = torch.diag(suh.double()) @ h_in @ w_hat @ h_out @ torch.diag(svh.double())
    got = reconstruct_weight(trellis, suh, svh, "3inst")
    assert got.dtype == torch.float16 and got.shape == (256, 384)
    assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("codebook", ["3inst", "mcg", "mul1"])
def test_matmul_reference_agrees_with_reconstructed_weight(codebook: str) -> None:
    trellis, suh, svh = _random_layer(256, 128, 2, seed=3)
    bias = torch.randn(128).half()
    x = torch.randn(5, 256)
    y = exl3_matmul_ref(x, trellis, suh, svh, codebook, bias=bias)
    w = reconstruct_weight(trellis, suh, svh, codebook).float()
    assert torch.allclose(y, x @ w + bias.float(), rtol=1e-2, atol=1e-3)


def test_matmul_reference_zero_pads_narrow_inputs() -> None:
    trellis, suh, svh = _random_layer(640, 256, 3, seed=4)  # a 576 -> 192 layer, stored padded
    x = torch.randn(3, 576)
    y = exl3_matmul_ref(x, trellis, suh, svh, "mul1")
    y_padded = exl3_matmul_ref(torch.nn.functional.pad(x, (0, 64)), trellis, suh, svh, "mul1")
    assert y.shape == (3, 256)
    assert torch.equal(y, y_padded)


def test_bad_inputs_are_named() -> None:
    trellis, suh, svh = _random_layer(128, 128, 2, seed=5)
    with pytest.raises(ValueError, match="K must be an integer in 1..8"):
        unpack_states(trellis, 9)
    with pytest.raises(ValueError, match="16\\*K = 48"):
        unpack_states(trellis, 3)
    with pytest.raises(TypeError, match="int16"):
        unpack_states(trellis.int(), 2)
    with pytest.raises(ValueError, match="unknown codebook 'e8p'"):
        decode_states(torch.tensor([1]), "e8p")
    with pytest.raises(ValueError, match="suh must have shape \\(128,\\)"):
        reconstruct_weight(trellis, suh[:64], svh, "mcg")
    with pytest.raises(ValueError, match="256 input features"):
        exl3_matmul_ref(torch.randn(1, 256), trellis, suh, svh, "mcg")
