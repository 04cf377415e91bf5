"""The fused RMSNorm and rotary kernels on CUDA against the torch modules, at Llama sizes, and a model routed through
them inside captured decode graphs (run with ``pytest -m gpu tests/gpu``). The CPU suite runs the same comparisons in
Triton's interpreter (tests/test_kernels_norm_rope.py)."""

from __future__ import annotations

import pytest
import torch

from inference_worker.batch import Chunk, build_batch
from inference_worker.cuda_graphs import DecodeGraphs
from inference_worker.kv_cache import PagedKVCache
from inference_worker.layers import RMSNorm, RotaryEmbedding, apply_rotary
from inference_worker.loader import load_model
from inference_worker.models.decoder import use_fused_kernels
from kernels.norm_rope import rms_norm, rotary
from shared.exl3_synth import synth_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PAGE = 16


@pytest.mark.parametrize(("shape", "dtype"), [((77, 4096), torch.bfloat16), ((5, 8192), torch.bfloat16),
                                              ((33, 32, 128), torch.bfloat16), ((9, 576), torch.float16)])  # fmt: skip
def test_rms_norm_on_cuda_rounds_as_the_torch_module_does(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=gen, device="cuda")).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=gen, device="cuda")).to(dtype)
    got, want = rms_norm(x, weight, 1e-5), RMSNorm(weight, 1e-5)(x)
    apart = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert int(apart.max()) <= 1 and float((apart == 0).float().mean()) > 0.95


@pytest.mark.parametrize(("heads", "dim"), [(32, 128), (8, 128), (9, 64)])
def test_rotary_on_cuda_equals_apply_rotary(heads: int, dim: int) -> None:
    positions = torch.arange(0, 131072, 997, device="cuda")
    cos, sin = RotaryEmbedding(dim, 500_000.0).to("cuda")(positions, torch.bfloat16)
    x = torch.randn(len(positions), heads, dim, device="cuda").bfloat16()
    assert torch.equal(rotary(x, cos, sin), apply_rotary(x, cos, sin))


def test_a_fused_model_replayed_from_decode_graphs_matches_the_plain_forward(tmp_path_factory) -> None:
    model, config = load_model(synth_model("smollm2-135m", 4, tmp_path_factory.mktemp("synth")), "cuda", torch.bfloat16)

    def cache() -> PagedKVCache:
        return PagedKVCache(config.num_hidden_layers, 9, PAGE, config.num_key_value_heads, config.head_dim,
                            torch.bfloat16, "cuda")  # fmt: skip

    prompts = [[100 + 7 * i + j for j in range(5 + 9 * i)] for i in range(3)]
    prefill = build_batch([Chunk(p, list(range(len(p))), [2 * i * PAGE + j for j in range(len(p))], [2 * i, 2 * i + 1])
                           for i, p in enumerate(prompts)], torch.device("cuda"))  # fmt: skip
    decode = build_batch([Chunk([7], [len(p)], [2 * i * PAGE + len(p)], [2 * i, 2 * i + 1])
                          for i, p in enumerate(prompts)], torch.device("cuda"))  # fmt: skip
    plain_cache, fused_cache = cache(), cache()
    with torch.inference_mode():
        want_prefill = model.forward(prefill, plain_cache)
        want = model.forward(decode, plain_cache)
        use_fused_kernels(model)
        got_prefill = model.forward(prefill, fused_cache)
    graphs = DecodeGraphs(model, fused_cache, max_batch=4, max_context=1024, scratch_page=8,
                          num_heads=config.num_attention_heads)  # fmt: skip
    got = graphs.forward(decode).clone()
    use_fused_kernels(model, enabled=False)
    for g, w in ((got_prefill, want_prefill), (got, want)):
        assert torch.isfinite(g).all()
        assert float((g - w).norm() / w.norm()) < 1e-2
