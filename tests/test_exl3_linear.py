"""Exl3Linear on the CPU: same outputs as the torch reference, real-width inputs/outputs for padded layers, and
built through the model's LINEAR_BUILDERS hook from a real (synthetic) EXL3 model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference_worker.batch import ForwardBatch
from inference_worker.exl3_linear import Exl3Linear
from inference_worker.kv_cache import PagedKVCache
from inference_worker.layers import build_linear
from inference_worker.loader import load_model
from kernels.exl3_ref import exl3_matmul_ref, pack_codes
from shared.exl3_format import Exl3Tensors, padded
from shared.exl3_synth import synth_model
from shared.model_dir import TensorSource


def _layer(in_f: int, out_f: int, K: int, codebook: str, bias: bool) -> Exl3Tensors:
    gen = torch.Generator().manual_seed(in_f + out_f + K)
    k, n = padded(in_f), padded(out_f)
    trellis = pack_codes(torch.randint(0, 1 << K, (k // 16, n // 16, 256), generator=gen), K)
    suh = (torch.randn(k, generator=gen).sign() * 0.3).half()
    svh = (torch.randn(n, generator=gen).sign() * 0.1).half()
    b = torch.randn(out_f, generator=gen).half() if bias else None
    return Exl3Tensors(trellis, suh, svh, codebook, b, in_f, out_f)


@pytest.mark.parametrize(("in_f", "out_f", "codebook", "bias"), [(576, 192, "mul1", True), (256, 384, "3inst", False)])
def test_cpu_forward_matches_the_reference_matmul(in_f: int, out_f: int, codebook: str, bias: bool) -> None:
    t = _layer(in_f, out_f, 3, codebook, bias)
    linear = Exl3Linear(t, torch.float32, "cpu")
    assert linear.path == "dense" and (linear.in_features, linear.out_features) == (in_f, out_f)
    x = torch.randn(2, 5, in_f)
    y = linear(x)
    want = exl3_matmul_ref(x, t.trellis, t.suh, t.svh, codebook, bias=t.bias)[..., :out_f]
    assert y.shape == (2, 5, out_f) and y.dtype == torch.float32
    assert torch.allclose(y, want, rtol=1e-2, atol=2e-3)


def test_forward_in_bfloat16_stays_close_to_float32() -> None:
    t = _layer(256, 128, 4, "mcg", True)
    x = torch.randn(3, 256)
    y32 = Exl3Linear(t, torch.float32, "cpu")(x)
    y16 = Exl3Linear(t, torch.bfloat16, "cpu")(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, rtol=5e-2, atol=5e-2)


def test_wrong_input_width_is_named() -> None:
    linear = Exl3Linear(_layer(576, 192, 2, "mul1", False), torch.float32, "cpu")
    with pytest.raises(ValueError, match="expects 576 input features, got 640"):
        linear(torch.randn(1, 640))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("exl3") / "smollm2-exl3"
    return synth_model("smollm2-135m", 3, out, codebook="mul1", head_bits=4, tokenizer_dir=default_model_dir)


def test_build_linear_picks_exl3_and_uses_the_real_sizes(synth_dir: Path) -> None:
    with TensorSource(synth_dir) as source:
        k_proj = build_linear("model.layers.0.self_attn.k_proj", source, torch.float32, "cpu")
        head = build_linear("lm_head", source, torch.float32, "cpu")
    assert isinstance(k_proj, Exl3Linear) and isinstance(head, Exl3Linear)
    assert (k_proj.in_features, k_proj.out_features, k_proj.in_padded, k_proj.out_padded) == (576, 192, 640, 256)
    assert (head.K, head.out_features) == (4, 49152)
    assert k_proj(torch.randn(4, 576)).shape == (4, 192)


def test_synthetic_exl3_model_loads_and_runs_a_prefill(synth_dir: Path) -> None:
    model, config = load_model(synth_dir, "cpu", torch.float32)
    linears = [m for m in model.modules() if isinstance(m, Exl3Linear)]
    assert len(linears) == 30 * 7 + 1
    tokens = 6
    cache = PagedKVCache(
        config.num_hidden_layers, 2, 8, config.num_key_value_heads, config.head_dim, torch.float32, "cpu"
    )
    batch = ForwardBatch(
        input_ids=torch.tensor([1, 504, 3458, 314, 4457, 314]),
        positions=torch.arange(tokens),
        query_lens=[tokens],
        context_lens=[tokens],
        block_tables=torch.tensor([[0, 1]]),
        slot_mapping=torch.arange(tokens),
        logits_indices=torch.tensor([tokens - 1]),
    )
    with torch.no_grad():
        logits = model(batch, cache)
    assert logits.shape == (1, 49152)
    assert torch.isfinite(logits).all()
    assert 0.2 < logits.std().item() < 5.0  # the synth scales keep activations near unit size through 30 layers
