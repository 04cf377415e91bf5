"""EXL3 Triton kernels against the torch reference (kernels.exl3_ref), run by Triton's CPU interpreter.

Small, awkward shapes (a 576 -> 192 layer padded to 640 -> 256, odd batch sizes); tests/gpu/ repeats these at
Llama sizes on CUDA, where the inline-PTX codebook path runs instead of the portable one tested here.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorators: kernels then run on CPU tensors
for _name in ("kernels.hadamard", "kernels.exl3_reconstruct", "kernels.exl3_matmul"):
    if _name in sys.modules:  # imported earlier in this process without the interpreter: decorate again
        importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels import exl3_ref as ref  # noqa: E402
from kernels.exl3_matmul import (  # noqa: E402
    DEFAULT_CONFIG,
    GemvConfig,
    default_config,
    exl3_gemv,
    exl3_matmul,
    gemv_launches,
)
from kernels.exl3_reconstruct import decode_trellis, reconstruct_weight  # noqa: E402
from kernels.hadamard import hadamard_transform  # noqa: E402

IN_FEATURES, OUT_FEATURES = 576, 192  # SmolLM2's k_proj: stored padded to 640 -> 256
IN_PAD, OUT_PAD = 640, 256


def random_layer(k: int, n: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random valid layer: any int16 pattern is a valid trellis (every bit string is a walk)."""
    gen = torch.Generator().manual_seed(seed)
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, 16 * K), dtype=torch.int16, generator=gen)
    suh = (torch.randn(k, generator=gen).sign() * (1 + 0.2 * torch.rand(k, generator=gen))).half()
    svh = (torch.randn(n, generator=gen) * 0.05).half()
    return trellis, suh, svh


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "kernel output has non-finite values (an element left unwritten?)"
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("codebook", ref.CODEBOOKS)
@pytest.mark.parametrize("K", range(1, 9))
def test_decoded_w_hat_is_bit_exact_for_every_K_and_codebook(K: int, codebook: str) -> None:
    trellis, _, _ = random_layer(256, 384, K, seed=K)
    got = decode_trellis(trellis, codebook)
    want = ref.decode_trellis(trellis, K, codebook)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize(
    ("K", "codebook", "rows"),
    [(1, "3inst", 1), (2, "mul1", 3), (3, "mcg", 17), (4, "mul1", 1), (5, "mul1", 32), (6, "3inst", 5), (7, "mcg", 2)],
)
def test_fused_matmul_matches_reference_on_a_padded_layer(K: int, codebook: str, rows: int) -> None:
    trellis, suh, svh = random_layer(IN_PAD, OUT_PAD, K, seed=10 + K)
    bias = torch.randn(OUT_FEATURES).half()
    x = torch.randn(rows, IN_FEATURES).half()
    got = exl3_matmul(x, trellis, suh, svh, codebook, bias)
    want = ref.exl3_matmul_ref(x.float(), trellis, suh, svh, codebook, bias)
    assert got.shape == (rows, OUT_PAD) and got.dtype == torch.float16
    assert relative_error(got, want) < 2e-3


@pytest.mark.parametrize(
    ("in_pad", "config"),
    [
        (IN_PAD, GemvConfig(splits=5)),
        (IN_PAD, GemvConfig(splits=1, num_warps=4)),
        (IN_PAD, GemvConfig(splits=5, finish_chunk=2)),  # three chunks, the last one ragged
        (1024, GemvConfig(splits=2, num_stages=2)),
        (1024, GemvConfig(splits=4, finish_chunk=1, finish_warps=8)),
        (1024, GemvConfig(splits=8)),
    ],
)
def test_fused_matmul_gives_the_same_result_for_any_tiling(in_pad: int, config: GemvConfig) -> None:
    trellis, suh, svh = random_layer(in_pad, OUT_PAD, 8, seed=3)
    bias = torch.randn(OUT_FEATURES).half()
    x = torch.randn(4, in_pad - 64)  # narrower than the layer: the kernel zero-pads the missing features
    got = exl3_gemv(x, trellis, suh, svh, "mul1", bias, config=config)
    want = ref.exl3_matmul_ref(x, trellis, suh, svh, "mul1", bias)
    assert relative_error(got, want) < 2e-3


@pytest.mark.parametrize(
    ("input_hadamard", "rows", "dtype"),
    [("butterfly", 3, torch.float16), ("dot", 3, torch.float16), ("butterfly", 20, torch.bfloat16),
     ("dot", 1, torch.float32)],
)  # fmt: skip
def test_the_input_hadamard_formed_inside_the_weight_kernel_matches_the_reference(
    input_hadamard: str, rows: int, dtype: torch.dtype
) -> None:
    trellis, suh, svh = random_layer(1024, OUT_PAD, 4, seed=30)
    x = torch.randn(rows, 1024 - 64).to(dtype)  # narrower than the layer: the missing features are zeros
    config = GemvConfig(splits=2, input_hadamard=input_hadamard)
    launches, _ = gemv_launches(x, trellis, suh, svh, "mul1", config=config)
    assert len(launches) == 2  # the weight and finish kernels: no separate Hadamard launch
    got = exl3_gemv(x, trellis, suh, svh, "mul1", config=config)
    plain = exl3_gemv(x, trellis, suh, svh, "mul1", config=GemvConfig(splits=2))
    want = ref.exl3_matmul_ref(x.float(), trellis, suh, svh, "mul1")
    output_rounding = 8e-3 if dtype == torch.bfloat16 else 2e-3  # the output is x's dtype: bf16 keeps 8 bits
    assert relative_error(got, want) < output_rounding
    assert relative_error(got, plain) < output_rounding / 2  # both round xh to fp16 once


def test_an_unknown_input_hadamard_is_refused() -> None:
    trellis, suh, svh = random_layer(IN_PAD, OUT_PAD, 4, seed=31)
    with pytest.raises(ValueError, match="input_hadamard"):
        exl3_gemv(torch.randn(1, IN_PAD), trellis, suh, svh, "mul1", config=GemvConfig(input_hadamard="fused"))


def test_small_layers_form_the_input_hadamard_inside_the_weight_kernel_by_default() -> None:
    trellis, suh, svh = random_layer(1024, OUT_PAD, 4, seed=32)
    launches, _ = gemv_launches(torch.randn(1, 1024), trellis, suh, svh, "mul1")
    assert len(launches) == 2  # no Hadamard launch of its own
    assert default_config(4096, 4096).input_hadamard == "butterfly"  # q/o of an 8B model
    assert default_config(4096, 14336) == default_config(14336, 4096) == DEFAULT_CONFIG  # its MLP: a launch
    assert default_config(4096, 4096, rows=17) == DEFAULT_CONFIG  # 32-row programs
    launches, _ = gemv_launches(torch.randn(20, 1024), trellis, suh, svh, "mul1")
    assert len(launches) == 3


@pytest.mark.parametrize(("K", "codebook"), [(2, "mul1"), (5, "3inst"), (7, "mcg")])  # groups of 8, 4 and 2 states
def test_prefetching_the_next_steps_words_changes_no_bit(K: int, codebook: str) -> None:
    trellis, suh, svh = random_layer(1024, OUT_PAD, K, seed=20 + K)
    x = torch.randn(3, 1024).half()
    plain = exl3_gemv(x, trellis, suh, svh, codebook, config=GemvConfig(splits=2))  # 4 steps a program
    ahead = exl3_gemv(x, trellis, suh, svh, codebook, config=GemvConfig(splits=2, prefetch=True))
    assert torch.equal(ahead, plain)
    assert relative_error(ahead, ref.exl3_matmul_ref(x.float(), trellis, suh, svh, codebook)) < 2e-3


@pytest.mark.parametrize(
    ("width", "dtype", "config"),
    [(IN_PAD, torch.float16, None), (IN_FEATURES, torch.bfloat16, GemvConfig(splits=5, finish_chunk=2))],
)
def test_a_row_gets_the_same_bits_alone_as_inside_a_batch(
    width: int, dtype: torch.dtype, config: GemvConfig | None
) -> None:
    # Speculative decoding verifies k+1 tokens in one batch and must reproduce one-token greedy decoding exactly:
    # tests/gpu asserts identical bits on CUDA. Here tl.dot is numpy's matmul through whatever BLAS the machine has,
    # whose summation order is not ours (CI saw one-ulp differences this machine never shows), so the interpreter
    # is held to one unit in the last place: a row mixed with its neighbours, or a padded row leaking, is far more.
    trellis, suh, svh = random_layer(IN_PAD, OUT_PAD, 4, seed=4)
    gen = torch.Generator().manual_seed(40)
    bias = torch.randn(OUT_FEATURES, generator=gen).to(dtype)
    x = torch.randn(16, width, generator=gen).to(dtype)
    batch = exl3_gemv(x, trellis, suh, svh, "mul1", bias, config=config)
    for i in (0, 4, 8, 15):
        assert_within_one_ulp(exl3_gemv(x[i : i + 1], trellis, suh, svh, "mul1", bias, config=config)[0], batch[i])
    assert_within_one_ulp(exl3_gemv(x[3:12], trellis, suh, svh, "mul1", bias, config=config), batch[3:12])
    x[5] = 1000.0  # a huge neighbour must not move any other row
    louder = exl3_gemv(x, trellis, suh, svh, "mul1", bias, config=config)
    assert_within_one_ulp(torch.cat([louder[:5], louder[6:]]), torch.cat([batch[:5], batch[6:]]))


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = torch.finfo(want.dtype).eps * torch.maximum(got.abs(), want.abs()).float()
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= ulp + torch.finfo(want.dtype).tiny).all()), f"max difference {diff.max().item():.3g}"


@pytest.mark.parametrize(("K", "codebook"), [(2, "mul1"), (3, "3inst"), (6, "mcg")])
def test_reconstructed_weight_matches_reference_within_fp16_rounding(K: int, codebook: str) -> None:
    trellis, suh, svh = random_layer(IN_PAD, OUT_PAD, K, seed=20 + K)
    got = reconstruct_weight(trellis, suh, svh, codebook)
    want = ref.reconstruct_weight(trellis, suh, svh, codebook).float()
    assert got.shape == (IN_PAD, OUT_PAD) and got.dtype == torch.float16
    assert relative_error(got, want) < 1e-3
    # one extra fp16 rounding inside the Hadamard: a couple of fp16 ulps at the weight's scale, never more
    assert float((got.float() - want).abs().max()) <= 2**-9 * float(want.abs().max())


def test_prefill_batches_take_the_reconstruct_path_and_match_reference() -> None:
    trellis, suh, svh = random_layer(IN_PAD, OUT_PAD, 4, seed=5)
    bias = torch.randn(OUT_FEATURES).half()
    x = torch.randn(2, 20, IN_FEATURES).half()  # 40 rows: more than the fused kernel takes
    got = exl3_matmul(x, trellis, suh, svh, "mul1", bias)
    want = ref.exl3_matmul_ref(x.float(), trellis, suh, svh, "mul1", bias)
    assert got.shape == (2, 20, OUT_PAD)
    assert relative_error(got, want) < 2e-3


def test_hadamard_transform_matches_reference_with_scales_and_padding() -> None:
    x = torch.randn(3, 5, 200)
    scale_in, scale_out = torch.randn(256).half(), torch.randn(256).half()
    got = hadamard_transform(x, scale_in=scale_in, scale_out=scale_out, out_features=256)
    padded = torch.nn.functional.pad(x, (0, 56))
    want = ref._had_last(padded * scale_in.float()) * scale_out.float()
    assert got.shape == (3, 5, 256)
    assert relative_error(got, want) < 1e-3
    twice = hadamard_transform(hadamard_transform(x, out_features=256))
    assert relative_error(twice, padded) < 1e-3  # H is symmetric and orthonormal: applying it twice is the identity


def test_bad_inputs_are_rejected_with_errors_that_name_the_problem() -> None:
    trellis, suh, svh = random_layer(256, 128, 4, seed=6)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="codebook"):
        exl3_matmul(x, trellis, suh, svh, "e8p")
    with pytest.raises(TypeError, match="int16"):
        exl3_matmul(x, trellis.int(), suh, svh, "mul1")
    with pytest.raises(ValueError, match="16\\*K"):
        decode_trellis(trellis[..., :40], "mul1")
    with pytest.raises(ValueError, match="suh/svh"):
        exl3_matmul(x, trellis, suh[:128], svh, "mul1")
    with pytest.raises(ValueError, match="input features"):
        exl3_matmul(torch.randn(2, 384), trellis, suh, svh, "mul1")
    with pytest.raises(ValueError, match="at most 32 rows"):
        exl3_gemv(torch.randn(33, 256), trellis, suh, svh, "mul1")
    with pytest.raises(ValueError, match="splits=3"):
        exl3_gemv(x, trellis, suh, svh, "mul1", config=GemvConfig(splits=3))
    with pytest.raises(ValueError, match="power of two"):
        exl3_gemv(x, trellis, suh, svh, "mul1", config=GemvConfig(finish_chunk=3))
    with pytest.raises(ValueError, match="multiple of 128"):
        hadamard_transform(torch.randn(2, 100))
