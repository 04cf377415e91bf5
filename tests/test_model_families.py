"""Every supported family against transformers' own implementation of it, on tiny random models saved as safetensors:
the same logits for chunked prefill and step-by-step decode through the paged cache, and greedy generation through
the whole suite (gateway -> Redis -> worker) for one dense and one mixture-of-experts family."""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from inference_worker.exl3_linear import Exl3Linear
from inference_worker.layers import DenseLinear
from inference_worker.loader import load_model
from inference_worker.models import find_spec
from inference_worker.models.decoder import MLP, DecoderConfig, build_decoder
from inference_worker.moe import SparseMoe
from kernels.exl3_ref import pack_codes, reconstruct_weight
from shared.exl3_format import QUANT_CONFIG_FILE, QUANT_METHOD, Exl3Tensors, exl3_tensors_to_dict, padded
from shared.exl3_format import tensor_storage as exl3_tensor_storage
from shared.model_dir import SINGLE_WEIGHTS_FILE, TensorSource, load_config
from shared.tokenizer import ModelTokenizer
from tests.suite import running_suite
from tests.test_llama_model import ATOL, PagedRun, assert_logits_match

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# Per family: transformers' classes and a config that exercises what the family adds. Hidden sizes are small and
# none is a multiple of 128 (72 and 56 are not even multiples of 16).
FAMILIES: dict[str, tuple[type, type[PreTrainedModel], dict]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(hidden_size=72, intermediate_size=112, **SMALL)),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(hidden_size=72, intermediate_size=112, sliding_window=7, **SMALL),  # 7: far shorter than the prompts
    ),
    "qwen2": (  # q/k/v biases, tied head
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(hidden_size=64, intermediate_size=96, tie_word_embeddings=True, **SMALL),
    ),
    "qwen3": (  # per-head q/k norms; head_dim (24) is not hidden / heads (20)
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(hidden_size=80, intermediate_size=128, head_dim=24, **SMALL),
    ),
    "mixtral": (  # top 2 of 8, renormalised
        MixtralConfig,
        MixtralForCausalLM,
        dict(hidden_size=56, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, **SMALL),
    ),
    "qwen2_moe": (  # top 2 of 6 without renormalising, a gated shared expert, and a dense middle layer
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            hidden_size=48,
            intermediate_size=80,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=56,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            **(SMALL | dict(num_hidden_layers=3)),
        ),
    ),
    "qwen3_moe": (  # top 3 of 8, renormalised, with q/k norms
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            head_dim=24,
            moe_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            **SMALL,
        ),
    ),
}
ARCHITECTURE_OF = {name: model_cls.__name__ for name, (_, model_cls, _) in FAMILIES.items()}


def save_tiny_model(family: str, out: Path, vocab_size: int = 101, seed: int = 0) -> Path:
    """A random model of the family, built by transformers and saved with its own save_pretrained.

    Weights are big enough (std 0.2) that attention and routing visibly shape the logits, and norms and biases are
    randomised too (transformers starts them at one and zero, which would hide a norm or bias applied wrongly)."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=vocab_size, initializer_range=0.2, **kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def load_transformers(family: str, model_dir: Path) -> PreTrainedModel:
    model_cls = FAMILIES[family][1]
    return model_cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def transformers_logits(hf: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


def run_ragged_batch(model: torch.nn.Module, config: DecoderConfig, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every position of two sequences, computed the way the scheduler feeds them: the first prompt in two
    chunks, the second prompt beside the first one's second chunk, then both decoding one token a step."""
    first, second = seqs
    run = PagedRun(model, config)
    (a1,) = run.step([(0, first[:17])], every_row=True)
    a2, b1 = run.step([(0, first[17:30]), (1, second[:21])], every_row=True)
    a_steps, b_steps = [], []
    for i in range(len(first) - 30):
        a, b = run.step([(0, [first[30 + i]]), (1, [second[21 + i]])])
        a_steps.append(a)
        b_steps.append(b)
    return [torch.cat([a1, a2, *a_steps]), torch.cat([b1, *b_steps])]


def random_sequences(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in (38, 29)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_and_paged_decode_match_transformers(family: str, tiny_dirs: dict[str, Path]) -> None:
    model, config = load_model(tiny_dirs[family], "cpu", torch.float32)
    hf = load_transformers(family, tiny_dirs[family])
    seqs = random_sequences(config.vocab_size)
    for ours, ids in zip(run_ragged_batch(model, config, seqs), seqs, strict=True):
        assert_logits_match(ours, transformers_logits(hf, ids))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_detected_and_declares_every_tensor_it_stores(family: str, tiny_dirs: dict[str, Path]) -> None:
    raw = load_config(tiny_dirs[family])
    spec = find_spec(raw)
    assert spec.architectures[0] == ARCHITECTURE_OF[family]
    config = DecoderConfig.from_hf(raw, spec)
    declared = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        declared.add("lm_head.weight")
    for layer in range(config.num_hidden_layers):
        p = spec.layer_prefix(layer)
        declared |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        if spec.qk_norm:
            declared |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
        sparse = config.moe is not None and layer in config.moe.sparse_layers
        for group in spec.linear_groups(layer, config.moe.num_experts if sparse else 0):
            declared |= {f"{linear}.weight" for linear in group}
        if sparse:
            declared.add(f"{spec.moe.router(p)}.weight")
            if spec.moe.shared_expert:
                declared.add(f"{spec.moe.shared_gate(p)}.weight")
    with TensorSource(tiny_dirs[family]) as source:
        stored = set(source.keys())
    assert {name for name in stored if not name.endswith(".bias")} == declared
    assert all(name[: -len(".bias")] + ".weight" in declared for name in stored if name.endswith(".bias"))


def test_moe_layers_route_as_their_config_says(tiny_dirs: dict[str, Path]) -> None:
    mixtral, _ = load_model(tiny_dirs["mixtral"], "cpu", torch.float32)
    assert all(isinstance(b.mlp, SparseMoe) and b.mlp.top_k == 2 and b.mlp.norm_topk_prob for b in mixtral.blocks)
    qwen2_moe, _ = load_model(tiny_dirs["qwen2_moe"], "cpu", torch.float32)
    kinds = [type(b.mlp) for b in qwen2_moe.blocks]
    assert kinds == [SparseMoe, MLP, SparseMoe]  # mlp_only_layers=[1]
    moe = qwen2_moe.blocks[0].mlp
    assert moe.num_experts == 6 and not moe.norm_topk_prob and moe.shared_expert_gate is not None
    assert isinstance(moe.router, torch.nn.Parameter) and moe.router.dtype == torch.float32  # never quantized
    # top-k weights as routed: renormalised ones sum to one, Qwen2-MoE's raw softmax ones do not
    x = torch.randn(5, 48)
    assert not torch.allclose(moe.route(x)[0].sum(-1), torch.ones(5))
    qwen3_moe, _ = load_model(tiny_dirs["qwen3_moe"], "cpu", torch.float32)
    weights, experts = qwen3_moe.blocks[0].mlp.route(torch.randn(5, 64))
    assert torch.allclose(weights.sum(-1), torch.ones(5)) and experts.shape == (5, 3)


def test_mistral_window_is_what_separates_it_from_full_attention(tiny_dirs: dict[str, Path]) -> None:
    model_dir = tiny_dirs["mistral"]
    model, config = load_model(model_dir, "cpu", torch.float32)
    assert config.sliding_windows == (7, 7)
    (ids, _) = random_sequences(config.vocab_size)
    expected = transformers_logits(load_transformers("mistral", model_dir), ids)
    full_config = dataclasses.replace(config, sliding_windows=())
    with TensorSource(model_dir) as source:
        full = build_decoder(full_config, find_spec(load_config(model_dir)), source, torch.float32, "cpu")
    (windowed_logits,) = PagedRun(model, config).step([(0, ids)], every_row=True)
    (full_logits,) = PagedRun(full, full_config).step([(0, ids)], every_row=True)
    assert_logits_match(windowed_logits, expected)
    # inside the window the two agree; past it, attending to everything gives clearly different logits
    assert (full_logits[:7] - expected[:7]).abs().max().item() < ATOL
    assert (full_logits[7:] - expected[7:]).abs().max().item() > 100 * ATOL


def _random_exl3(in_f: int, out_f: int, gen: torch.Generator) -> Exl3Tensors:
    k, n = padded(in_f), padded(out_f)
    trellis = pack_codes(torch.randint(0, 1 << 3, (k // 16, n // 16, 256), generator=gen), 3)
    suh = torch.zeros(k, dtype=torch.float16)
    svh = torch.zeros(n, dtype=torch.float16)
    suh[:in_f] = torch.randn(in_f, generator=gen).sign() * 0.5
    svh[:out_f] = torch.randn(out_f, generator=gen).sign() * 0.5
    return Exl3Tensors(trellis, suh, svh, "mul1", None, in_f, out_f)


def test_exl3_experts_load_as_separate_quantized_linears_beside_a_dense_router(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Mixtral with every expert stored as EXL3 (random 3-bit codes, padded 56 -> 128 wide) runs like the same model
    with those experts stored dense, as their reconstructed weights."""
    source_dir = tiny_dirs["mixtral"]
    tensors = load_file(source_dir / SINGLE_WEIGHTS_FILE)
    spec = find_spec(load_config(source_dir))
    quant_dir, dense_dir = tmp_path / "exl3", tmp_path / "dense"
    quantized, dense, features = dict(tensors), dict(tensors), {}
    gen = torch.Generator().manual_seed(2)
    for layer in range(2):
        for expert in range(8):
            for prefix in spec.moe.expert(spec.layer_prefix(layer), expert):
                out_f, in_f = tensors[f"{prefix}.weight"].shape
                t = _random_exl3(in_f, out_f, gen)
                del quantized[f"{prefix}.weight"]
                quantized |= exl3_tensors_to_dict(prefix, t)
                features[prefix] = (in_f, out_f)
                w = reconstruct_weight(t.trellis, t.suh, t.svh, t.codebook)[:in_f, :out_f]
                dense[f"{prefix}.weight"] = w.t().float().contiguous()
    for out, weights in ((quant_dir, quantized), (dense_dir, dense)):
        out.mkdir()
        shutil.copy(source_dir / "config.json", out / "config.json")
        save_file(weights, str(out / SINGLE_WEIGHTS_FILE))
    storage = exl3_tensor_storage(quantized, features)
    (quant_dir / QUANT_CONFIG_FILE).write_text(json.dumps({"quant_method": QUANT_METHOD, "tensor_storage": storage}))

    model, config = load_model(quant_dir, "cpu", torch.float32)
    moe = model.blocks[0].mlp
    assert all(isinstance(linear, Exl3Linear) for expert in moe.experts for linear in expert.children())
    assert isinstance(model.blocks[0].attn.q_proj, DenseLinear)
    reference, _ = load_model(dense_dir, "cpu", torch.float32)
    seqs = random_sequences(config.vocab_size)
    for ours, theirs in zip(
        run_ragged_batch(model, config, seqs), run_ragged_batch(reference, config, seqs), strict=True
    ):
        assert_logits_match(ours, theirs)


def test_unknown_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(ValueError, match="FalconForCausalLM") as err:
        load_model(tmp_path, "cpu", torch.float32)
    for name in ARCHITECTURE_OF.values():
        assert name in str(err.value)


def test_family_falls_back_to_model_type_when_architectures_names_nothing_known() -> None:
    assert find_spec({"model_type": "qwen3_moe"}).name == "qwen3_moe"
    assert find_spec({"architectures": ["Qwen2ForCausalLMCustom"], "model_type": "qwen2"}).name == "qwen2"
    with pytest.raises(ValueError, match="neither 'architectures' nor 'model_type'"):
        find_spec({})


def test_moe_config_with_more_experts_per_token_than_experts_is_refused(tiny_dirs: dict[str, Path]) -> None:
    raw = load_config(tiny_dirs["qwen3_moe"])
    raw["num_experts_per_tok"] = 9
    with pytest.raises(ValueError, match="num_experts_per_tok 9"):
        DecoderConfig.from_hf(raw, find_spec(raw))


# --- the whole suite: gateway -> Redis -> worker, greedy, for one dense and one MoE family ----------------------------


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "qwen2_moe"])
def test_greedy_generation_through_the_suite_matches_transformers(
    family: str, redis_url: str, default_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = ModelTokenizer.from_dir(default_model_dir)
    model_id = f"tiny-{family.replace('_', '-')}"
    model_dir = save_tiny_model(family, tmp_path / "models" / model_id, vocab_size=tokenizer.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, model_dir / name)
    prompt = tokenizer.encode("The capital of France is")
    new_tokens = 12

    hf = load_transformers(family, model_dir)
    ids, expected_logprobs = list(prompt), []
    for _ in range(new_tokens):
        logprobs = transformers_logits(hf, ids)[-1].log_softmax(-1)
        ids.append(int(logprobs.argmax()))
        expected_logprobs.append(float(logprobs.max()))
    expected_text = tokenizer.decode(ids[len(prompt) :])

    logs = tmp_path / "logs"
    logs.mkdir()
    with running_suite(redis_url, tmp_path / "models", model_id, logs) as url:
        body = {"model": model_id, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "logprobs": 0}
        resp = _post_json(f"{url}/v1/completions", body | {"ignore_eos": True})
    choice = resp["choices"][0]
    assert resp["usage"]["completion_tokens"] == new_tokens
    assert choice["text"] == expected_text
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == new_tokens
    assert max(abs(a - b) for a, b in zip(got, expected_logprobs, strict=True)) < 1e-3
