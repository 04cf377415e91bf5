"""EXL3 Triton kernels against the torch reference at Llama-3-8B sizes on CUDA (run with ``pytest -m gpu tests/gpu``).

The compiled kernels use inline PTX (lop3, dp4a) for the codebooks, which the CPU interpreter cannot run: these tests
are what holds that path to the reference, bit for bit on W-hat.
"""

from __future__ import annotations

import pytest
import torch

from kernels import exl3_ref as ref
from kernels.exl3_matmul import GemvConfig, exl3_gemv, exl3_matmul
from kernels.exl3_reconstruct import decode_trellis, reconstruct_weight
from kernels.hadamard import hadamard_transform

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LLAMA3_8B = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]


def random_layer(k: int, n: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, 16 * K), dtype=torch.int16, generator=gen, device="cuda")
    suh = torch.randn(k, generator=gen, device="cuda").sign().half()
    svh = (torch.randn(n, generator=gen, device="cuda") * 0.02).half()
    return trellis, suh, svh


def poison_allocator(numel: int) -> None:
    """Leave NaN in memory the next allocations will reuse, so an output element nobody wrote cannot pass."""
    torch.full((numel,), float("nan"), dtype=torch.float32, device="cuda")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "kernel output has non-finite values (an element left unwritten?)"
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("codebook", ref.CODEBOOKS)
@pytest.mark.parametrize("K", range(1, 9))
def test_decoded_w_hat_is_bit_exact_for_every_K_and_codebook(K: int, codebook: str) -> None:
    trellis, _, _ = random_layer(2048, 4096, K, seed=K)
    poison_allocator(2048 * 4096)
    got = decode_trellis(trellis, codebook)
    assert torch.equal(got.view(torch.int16), ref.decode_trellis(trellis, K, codebook).view(torch.int16))


@pytest.mark.parametrize(("k", "n"), LLAMA3_8B)
@pytest.mark.parametrize(("K", "codebook"), [(2, "3inst"), (4, "mul1"), (5, "mcg"), (8, "mul1")])
def test_fused_matmul_matches_reference_on_llama_shapes(k: int, n: int, K: int, codebook: str) -> None:
    trellis, suh, svh = random_layer(k, n, K, seed=k + n + K)
    bias = torch.randn(n, device="cuda").half()
    for rows in (1, 7, 16, 32):
        x = torch.randn(rows, k, device="cuda").bfloat16()
        poison_allocator(64 * rows * n)
        got = exl3_gemv(x, trellis, suh, svh, codebook, bias)
        want = ref.exl3_matmul_ref(x.float(), trellis, suh, svh, codebook, bias)
        assert relative_error(got, want) < 5e-3  # bf16 output rounding dominates


@pytest.mark.parametrize(
    ("k", "n", "config"),
    [
        (14336, 4096, GemvConfig(splits=112)),  # 4 chunks of slices in the finish kernel, the last one ragged
        (14336, 4096, GemvConfig(splits=14, num_stages=2)),
        (4096, 1024, GemvConfig(splits=4, num_warps=4, finish_warps=8, finish_chunk=2)),
        (4096, 1024, GemvConfig()),  # a small layer's input Hadamard in its own launch (its default is in-kernel)
        (14336, 4096, GemvConfig(num_warps=4, input_hadamard="butterfly")),  # ... and a large one's in the kernel
    ],
)
def test_fused_matmul_matches_reference_for_launch_configs(k: int, n: int, config: GemvConfig) -> None:
    trellis, suh, svh = random_layer(k, n, 4, seed=k + 3 * n)
    bias = torch.randn(n, device="cuda").half()
    for rows in (1, 16):
        x = torch.randn(rows, k - 96, device="cuda").bfloat16()  # narrower than the layer: zero padding
        poison_allocator(256 * rows * n)
        got = exl3_gemv(x, trellis, suh, svh, "mul1", bias, config)
        want = ref.exl3_matmul_ref(x.float(), trellis, suh, svh, "mul1", bias)
        assert relative_error(got, want) < 5e-3


def test_a_row_gets_the_same_bits_alone_as_inside_a_batch() -> None:
    trellis, suh, svh = random_layer(4096, 4096, 4, seed=1)
    bias = torch.randn(4096, device="cuda").half()
    x = torch.randn(16, 4096, device="cuda").half()
    batch = exl3_gemv(x, trellis, suh, svh, "mul1", bias)
    for i in (0, 7, 15):
        assert torch.equal(exl3_gemv(x[i : i + 1], trellis, suh, svh, "mul1", bias)[0], batch[i])
    assert torch.equal(exl3_gemv(x[2:11], trellis, suh, svh, "mul1", bias), batch[2:11])


@pytest.mark.parametrize(("k", "n"), LLAMA3_8B)
def test_reconstructed_weight_matches_reference_within_fp16_rounding(k: int, n: int) -> None:
    trellis, suh, svh = random_layer(k, n, 4, seed=k * 3 + n)
    poison_allocator(k * n)
    got = reconstruct_weight(trellis, suh, svh, "mul1")
    want = ref.reconstruct_weight(trellis, suh, svh, "mul1").float()
    assert relative_error(got, want) < 1e-3
    assert float((got.float() - want).abs().max()) <= 2**-9 * float(want.abs().max())


def test_prefill_path_matches_reference() -> None:
    trellis, suh, svh = random_layer(4096, 14336, 3, seed=7)
    x = torch.randn(2048, 4096, device="cuda").bfloat16()
    got = exl3_matmul(x, trellis, suh, svh, "3inst")
    assert relative_error(got, ref.exl3_matmul_ref(x.float(), trellis, suh, svh, "3inst")) < 5e-3


def test_hadamard_transform_matches_reference() -> None:
    x = torch.randn(300, 4000, device="cuda")
    scale = torch.randn(4096, device="cuda").half()
    got = hadamard_transform(x, scale_in=scale, out_features=4096)
    want = ref._had_last(torch.nn.functional.pad(x, (0, 96)) * scale.float())
    assert relative_error(got, want) < 1e-3
