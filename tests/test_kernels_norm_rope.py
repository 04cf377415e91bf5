"""The fused RMSNorm and rotary kernels (kernels/norm_rope.py) against the torch modules they replace, run by
Triton's CPU interpreter; tests/gpu/test_norm_rope_gpu.py repeats them at Llama sizes on CUDA."""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorators: kernels then run on CPU tensors
for _name in ("kernels.hadamard", "kernels.norm_rope"):
    if _name in sys.modules:  # imported earlier in this process without the interpreter: decorate again
        importlib.reload(sys.modules[_name])

import pytest  # noqa: E402
import torch  # noqa: E402

from inference_worker.batch import Chunk, build_batch  # noqa: E402
from inference_worker.kv_cache import PagedKVCache  # noqa: E402
from inference_worker.layers import RMSNorm, RotaryEmbedding, apply_rotary  # noqa: E402
from inference_worker.loader import load_model  # noqa: E402
from inference_worker.models.decoder import use_fused_kernels  # noqa: E402
from kernels.norm_rope import rms_norm, rotary  # noqa: E402
from tests.tiny_models import write_tiny_llama  # noqa: E402


def ulps_apart(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between got and want, elementwise (same signs assumed)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[got.dtype]
    return (got.view(bits).long() - want.view(bits).long()).abs()


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((5, 576), torch.bfloat16), ((3, 4, 64), torch.bfloat16), ((7, 100), torch.float32), ((2, 1000), torch.float16)],
)
def test_rms_norm_rounds_as_the_torch_module_does(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype)
    want = RMSNorm(weight, 1e-5)(x)
    got = rms_norm(x, weight, 1e-5)
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.float32:  # the sum of squares, added in another order, moves the scale by a few ulps
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    apart = ulps_apart(got, want)  # half precision: that rarely reaches the rounded output, and never by more
    assert int(apart.max()) <= 1
    assert float((apart == 0).float().mean()) > 0.95


def test_rms_norm_refuses_a_weight_of_another_size_or_dtype() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize(
    ("heads", "dim", "dtype"), [(3, 64, torch.bfloat16), (2, 24, torch.float16), (4, 32, torch.float32)]
)
def test_rotary_rounds_as_apply_rotary_does(heads: int, dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(dim)
    positions = torch.tensor([0, 1, 2, 7, 100, 4095])
    cos, sin = RotaryEmbedding(dim, 10_000.0)(positions, dtype)
    x = torch.randn(len(positions), heads, dim, generator=gen).to(dtype)
    want = apply_rotary(x, cos, sin)
    got = rotary(x, cos, sin)
    if dtype == torch.float32:  # one fused multiply-add may round once where torch rounds twice
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # each product, then the sum, rounded to the dtype as torch does
        assert torch.equal(got, want)
    strided = torch.randn(len(positions), heads, 2 * dim, generator=gen).to(dtype)[..., :dim]  # rows not contiguous
    torch.testing.assert_close(rotary(strided, cos, sin), apply_rotary(strided, cos, sin), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="cos, sin"):
        rotary(x, cos[:-1], sin[:-1])


def test_a_model_with_fused_norms_and_rotary_gives_the_plain_models_logits(tmp_path) -> None:
    model, config = load_model(write_tiny_llama(tmp_path / "tiny"), "cpu", torch.float32)
    pages = 4

    def cache() -> PagedKVCache:
        return PagedKVCache(config.num_hidden_layers, 8, pages, config.num_key_value_heads, config.head_dim,
                            torch.float32, "cpu")  # fmt: skip

    tokens = [[5, 9, 3, 7, 1, 2], [8, 8, 4]]
    chunks = [Chunk(t, list(range(len(t))), [8 * i + p for p in range(len(t))], [2 * i, 2 * i + 1])
              for i, t in enumerate(tokens)]  # fmt: skip
    batch = build_batch(chunks, "cpu")
    with torch.inference_mode():
        want = model.forward(batch, cache())
        # two norms and the rotary of every layer, and the final norm
        assert use_fused_kernels(model) == 3 * config.num_hidden_layers + 1
        got = model.forward(batch, cache())
        use_fused_kernels(model, enabled=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
