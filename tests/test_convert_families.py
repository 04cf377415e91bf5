"""`trellis convert` for every family besides Llama (tests/test_convert.py covers Llama): tiny random models built by
transformers' own classes, converted on the CPU, loaded by the serving loader and compared with the original; the
calibration blocks against transformers; MoE capture that reaches every expert; bit groups across experts. Every
conversion is stopped after its first block and resumed, so resuming is exercised for every family at no extra cost
(tests/test_convert.py checks that a resumed Llama conversion is byte-identical to an uninterrupted one)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
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

from converter_worker.convert import ConversionCancelled, ConversionError, Converter, ConvertOptions, convert
from converter_worker.quant.bits import LinearShape, allocate_bits, average_bits
from converter_worker.quant.block import build_calibration_block
from converter_worker.quant.layout import experts_in_layer, quantized_linears, routing_linears
from converter_worker.quant.moe_capture import routed_output
from inference_worker.exl3_linear import Exl3Linear
from inference_worker.layers import DenseLinear, RMSNorm, RotaryEmbedding
from inference_worker.loader import load_model
from inference_worker.models import ARCHITECTURES, find_spec
from inference_worker.models.decoder import MLP, DecoderConfig
from inference_worker.moe import SparseMoe
from shared.exl3_format import read_quantization_config
from shared.model_dir import TensorSource, load_config
from tests.test_llama_model import PagedRun

VOCAB = 128  # small, so the 6-bit head is one 128 x 128 block
LAYERS = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2)
# Per family: transformers' classes and a config exercising what the family adds. 4 experts per MoE layer; hidden
# sizes are not multiples of 128, and Qwen2's 72 is not even a multiple of 16, so every linear is stored padded.
FAMILIES: dict[str, tuple[type, type[PreTrainedModel], dict]] = {
    "mistral": (  # a window shorter than the calibration rows
        MistralConfig,
        MistralForCausalLM,
        dict(hidden_size=64, intermediate_size=96, sliding_window=16, **LAYERS),
    ),
    "qwen2": (  # q/k/v biases, tied head, a window from layer 1 on
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            hidden_size=72,
            intermediate_size=96,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            **LAYERS,
        ),
    ),
    "qwen3": (  # per-head q/k norms, head_dim 24 != hidden / heads
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(hidden_size=64, intermediate_size=96, head_dim=24, **LAYERS),
    ),
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(hidden_size=64, intermediate_size=48, num_local_experts=4, **MOE, **LAYERS),
    ),
    "qwen2_moe": (  # a gated shared expert, raw (not renormalised) top-k weights, and a dense second layer
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(
            hidden_size=48,
            intermediate_size=80,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=56,
            num_experts=4,
            norm_topk_prob=False,
            mlp_only_layers=[1],
            **MOE,
            **LAYERS,
        ),
    ),
    "qwen3_moe": (  # the second layer dense (mlp_only_layers), Mixtral has every layer sparse
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            hidden_size=64,
            intermediate_size=96,
            head_dim=24,
            moe_intermediate_size=40,
            num_experts=4,
            mlp_only_layers=[1],
            **MOE,
            **LAYERS,
        ),
    ),
}
LLAMA3_ROPE = (  # calibration-block check only: Llama 3 rope scaling that matters within 64 tokens
    LlamaConfig,
    LlamaForCausalLM,
    dict(
        hidden_size=64,
        intermediate_size=96,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
        **LAYERS,
    ),
)
CONVERT = dict(bits=4.0, cal_rows=6, cal_cols=64, checkpoint_seconds=0.0)
# The head is the same for every family and test_convert.py quantizes Llama's; here only Qwen2's tied head is
# quantized (6 bits), the others stay 16-bit: the trellis search on a CPU is what the module's time goes to.
HEAD_BITS = {"qwen2": 6}
EVAL_TEXT = (Path(__file__).resolve().parent / "data" / "eval" / "britannica-11th-slice.txt").read_text(
    encoding="utf-8"
)


def byte_level_tokenizer() -> Tokenizer:
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


def save_family_model(out: Path, config_cls: type, model_cls: type[PreTrainedModel], kwargs: dict) -> Path:
    """A random model saved by transformers (float32 safetensors) with a byte-level tokenizer. Norms and biases are
    randomised too (transformers starts them at one and zero, which would hide one applied wrongly)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=VOCAB, initializer_range=0.2, **kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.save_pretrained(out)
    byte_level_tokenizer().save(str(out / "tokenizer.json"))
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert_family(family: str, root: Path) -> tuple[Path, bool]:
    """Build and convert one family (in a worker process), stopping after block 0 and resuming as `trellis convert
    -r` does: (output directory, whether the resume kept block 0 as the first run wrote it)."""
    here = root / family
    source = save_family_model(here / "source", *FAMILIES[family])
    opts = ConvertOptions(source, here / "out", here / "work", head_bits=HEAD_BITS.get(family, 16), **CONVERT)
    asked = iter([False, True])  # asked before each block: go on with block 0, stop before block 1
    with pytest.raises(ConversionCancelled, match="stopped before block 1"):
        convert(opts, stop=lambda: next(asked, True))
    first_block = opts.work_dir / "blocks" / "block-0000.safetensors"
    written = _sha256(first_block)
    convert(opts, resume=True)
    return opts.output, _sha256(first_block) == written


@pytest.fixture(scope="module")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bool]]:
    """Every family converted, two processes at a time: the trellis search runs single-threaded on a CPU."""
    root = tmp_path_factory.mktemp("families")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {family: pool.submit(convert_family, family, root) for family in FAMILIES}
        return {family: future.result() for family, future in futures.items()}


@pytest.fixture(scope="module")
def converted(conversions: dict[str, tuple[Path, bool]]) -> dict[str, Path]:
    return {family: out for family, (out, _) in conversions.items()}


def text_sequences(count: int = 4, length: int = 48) -> list[list[int]]:
    """Windows of English text: what the calibration rows were cut from (random ids would reach embedding rows the
    byte-level calibration text never holds, whose directions the Hessians never saw)."""
    ids = [i for i in byte_level_tokenizer().encode(EVAL_TEXT).ids if i < VOCAB]
    return [ids[k * 1000 : k * 1000 + length] for k in range(count)]


def random_sequences(count: int = 3, length: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _ in range(count)]


def serving_logits(model_dir: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    model, config = load_model(model_dir, "cpu", torch.float32)
    run = PagedRun(model, config, num_pages=128)
    return [run.step([(i, ids)], every_row=True)[0] for i, ids in enumerate(sequences)]


# --- conversion --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_model_loads_and_stays_close_to_the_original(family: str, converted: dict[str, Path]) -> None:
    """At 4 bits each linear's output error is ~5e-4 of its energy on the calibration text (the proxy error), but
    these random models (weights of std 0.2) attend almost one-hot and route by small margins, which amplifies it:
    measured on text, mean KL 0.014-0.04 and top-1 agreement 0.81-0.91. The bounds leave about 2x margin; tinier
    than test_convert.py's Llama at 3 bits (KL < 0.05, top-1 > 0.7), where weights are smaller and calmer."""
    out = converted[family]
    ref = torch.cat(serving_logits(out.parent / "source", text_sequences()))
    got = torch.cat(serving_logits(out, text_sequences()))
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert kl < 0.08, kl
    assert agreement >= 0.75, agreement


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_attention_mlp_and_expert_linear_is_exl3_and_the_rest_is_not(
    family: str, converted: dict[str, Path]
) -> None:
    out = converted[family]
    model, config = load_model(out, "cpu", torch.float32)
    assert isinstance(model.head, Exl3Linear if family in HEAD_BITS else DenseLinear)
    assert isinstance(model.norm, RMSNorm)
    for block in model.blocks:
        attn = block.attn
        assert all(isinstance(lin, Exl3Linear) for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        mlps = [block.mlp] if isinstance(block.mlp, MLP) else [*block.mlp.experts]
        if isinstance(block.mlp, SparseMoe) and block.mlp.shared_expert is not None:
            mlps.append(block.mlp.shared_expert)
            assert isinstance(block.mlp.shared_expert_gate, DenseLinear)
        assert all(isinstance(lin, Exl3Linear) for mlp in mlps for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    stored = read_quantization_config(out)["tensor_storage"]
    spec = find_spec(load_config(out))
    expected = {q.name for layer in range(config.num_hidden_layers) for q in quantized_linears(spec, config, layer)}
    head = {"lm_head"} if family in HEAD_BITS else set()
    assert {name for name, entry in stored.items() if entry.get("quant_format") == "exl3"} == expected | head
    assert all(entry["bits_per_weight"] == 4 for name, entry in stored.items() if name in expected)
    # the router and shared-expert gate keep the source's float32; norms and embeddings are plain 16-bit tensors
    routing = [p for layer in range(config.num_hidden_layers) for p in routing_linears(spec, config, layer)]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert all(f.get_slice(f"{p}.weight").get_dtype() == "F32" for p in routing)
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    assert ("mlp.gate" in " ".join(routing)) == (config.moe is not None and spec.moe.block == "mlp")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_stopped_conversion_resumes_from_its_finished_blocks(
    family: str, conversions: dict[str, tuple[Path, bool]]
) -> None:
    out, first_block_kept = conversions[family]
    assert first_block_kept  # the resume started at block 1, from the checkpointed calibration state
    assert (out / "config.json").is_file() and not (out.parent / ".out.partial").exists()


def test_unknown_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path: Path) -> None:
    source = tmp_path / "falcon"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    opts = ConvertOptions(source, tmp_path / "out", tmp_path / "work", bits=4.0)
    with pytest.raises(ConversionError, match="FalconForCausalLM") as err:
        convert(opts)
    assert all(name in str(err.value) for name in ARCHITECTURES)
    assert not (tmp_path / "out").exists()


# --- calibration blocks: the serving block code, run over whole rows ------------------------------------------------


def source_blocks(model_dir: Path) -> tuple[DecoderConfig, list, dict[str, torch.Tensor]]:
    """(config, float32 calibration blocks built from the originals, every source tensor)."""
    raw = load_config(model_dir)
    spec = find_spec(raw)
    config = DecoderConfig.from_hf(raw, spec)
    with TensorSource(model_dir) as source:
        tensors = {name: source.get(name).float() for name in source.keys()}
    rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def dense(prefix: str) -> DenseLinear:
        return DenseLinear(tensors[f"{prefix}.weight"], tensors.get(f"{prefix}.bias"))

    blocks = [
        build_calibration_block(config, spec, layer, rotary, tensors.__getitem__, dense)
        for layer in range(config.num_hidden_layers)
    ]
    return config, blocks, tensors


@pytest.mark.parametrize("family", [*FAMILIES, "llama3_rope"])
def test_calibration_blocks_reproduce_transformers(family: str, tmp_path: Path) -> None:
    """Rows pushed through the calibration blocks (whole-row attention, deterministic MoE mixing) give transformers'
    logits: windows, biases, q/k norms, rope scaling and routing are the family's."""
    config_cls, model_cls, kwargs = LLAMA3_ROPE if family == "llama3_rope" else FAMILIES[family]
    model_dir = save_family_model(tmp_path / family, config_cls, model_cls, kwargs)
    config, blocks, tensors = source_blocks(model_dir)
    rows = torch.tensor(random_sequences(count=3, length=48))
    x = tensors["model.embed_tokens.weight"][rows]
    for block in blocks:
        x = block.forward(x)
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    ours = RMSNorm(tensors["model.norm.weight"], config.rms_norm_eps)(x) @ head.T
    hf = model_cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(rows).logits
    assert (ours - expected).abs().max().item() < 1e-3


def test_moe_capture_gives_every_expert_a_hessian_even_one_the_router_never_picks(tmp_path: Path) -> None:
    """Qwen3-MoE with top-1 routing and a router that can only ever pick expert 0 or 1 (expert 1's row is minus expert
    0's, and 2 and 3 have zero logits, always below the larger of the two): the capture still gives experts 2 and 3
    full Hessians, the same ones it gives whatever the router says, and the block's output follows the real routing."""
    config_cls, model_cls, kwargs = FAMILIES["qwen3_moe"]
    model_dir = save_family_model(tmp_path / "moe", config_cls, model_cls, kwargs | dict(num_experts_per_tok=1))
    config, blocks, tensors = source_blocks(model_dir)
    block = blocks[0]
    moe = block.moe
    assert moe is not None and moe.top_k == 1 and moe.num_experts == 4
    x = tensors["model.embed_tokens.weight"][torch.tensor(random_sequences(count=2, length=32))]

    def down_hessians() -> list[torch.Tensor]:
        hessians = block.capture_hessians(x)
        return [hessians[f"model.layers.0.mlp.experts.{e}.down_proj"] for e in range(4)]

    with torch.no_grad():
        moe.router[2:] = 0
        moe.router[1] = -moe.router[0]
        picked = moe.route(torch.randn(500, config.hidden_size))[1]
    assert set(picked.unique().tolist()) <= {0, 1}
    never_picked = down_hessians()
    for h in never_picked:
        assert h.diagonal().min() > 0  # every intermediate channel of every expert was seen
    with torch.no_grad():
        moe.router[3] = 100 * moe.router[3].new_ones(())  # now expert 3 wins nearly every token instead
    for before, after in zip(never_picked, down_hessians(), strict=True):
        assert torch.equal(before, after)
    hessians = block.capture_hessians(x)
    gate_up = [
        q.name for q in quantized_linears(find_spec(load_config(model_dir)), config, 0) if q.bit_group == "gate_up"
    ]
    assert len(gate_up) == 8 and all(hessians[name] is hessians[gate_up[0]] for name in gate_up)
    h = torch.randn(50, config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(routed_output(moe, h), moe(h), atol=1e-5)


def test_bit_allocation_promotes_every_expert_of_a_layer_together(tmp_path: Path) -> None:
    raw = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 1000,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "mlp_only_layers": [2],
    }
    spec = find_spec(raw)
    config = DecoderConfig.from_hf(raw, spec)
    widths = {"q_proj": (1024, 1024), "k_proj": (1024, 512), "v_proj": (1024, 512), "o_proj": (1024, 1024)}
    shapes = []
    for layer in range(6):
        inner = 512 if experts_in_layer(config, layer) else 3072
        for q in quantized_linears(spec, config, layer):
            short = q.name.rsplit(".", 1)[-1]
            in_f, out_f = widths.get(short, (inner, 1024) if short == "down_proj" else (1024, inner))
            shapes.append(LinearShape(q.name, layer, q.bit_group, in_f, out_f))
    for target in (4.3, 4.6, 4.9):
        plan = allocate_bits(shapes, target, 6)
        promoted_experts = 0
        for layer in range(6):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                experts = [
                    s.name for s in shapes if s.layer == layer and "experts." in s.name and s.name.endswith(projection)
                ]
                assert len({plan[name] for name in experts}) <= 1
                promoted_experts += sum(plan[name] == 5 for name in experts)
        if target == 4.9:
            assert promoted_experts > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_the_measured_plan_reaches_every_expert_and_keeps_a_layers_experts_together(
    family: str, tmp_path: Path
) -> None:
    """--allocation measured backpropagates through the real routing and captures every expert's Hessian (for its
    LDLQ gain); the plan covers every linear, keeps the budget, and moves a layer's experts together."""
    source = save_family_model(tmp_path / "source", *FAMILIES[family])
    opts = ConvertOptions(source, tmp_path / "out", tmp_path / "work", allocation="measured", **CONVERT)
    converter = Converter(opts)
    plan = converter.preview_plan()
    assert set(plan) == {s.name for s in converter.shapes}
    assert set(plan.values()) <= {3, 4, 5} and average_bits(converter.shapes, plan) <= 4.0 + 1e-9
    for layer in range(LAYERS["num_hidden_layers"]):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            experts = [n for n in plan if f"layers.{layer}." in n and "experts." in n and n.endswith(projection)]
            assert len({plan[n] for n in experts}) <= 1
    assert not (tmp_path / "work").exists()  # a preview writes nothing
