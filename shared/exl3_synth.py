"""Synthetic EXL3 model directories: real shapes, random codes. For benchmarks and loader tests, not for text.

Any 16-bit word pattern is a valid trellis ring, so random int16 words are a valid quantized layer. Scales are
random signs times a magnitude chosen so a unit-RMS input gives a unit-RMS output (o_proj and down_proj are
shrunk so the residual stream stays near unit RMS over the stack). Padded scale entries are zero, so padded
rows and columns of the dense weight are exactly zero.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.exl3_ref import CODEBOOKS
from shared.exl3_format import (
    QUANT_CONFIG_FILE,
    QUANT_METHOD,
    Exl3Tensors,
    exl3_tensors_to_dict,
    padded,
    tensor_storage,
)

WRITER_VERSION = "trellis-0.1.0"
CODEBOOK_RMS = {"3inst": 1.2437, "mcg": 1.2441, "mul1": 1.0003}
_SKIP_COPY = {"config.json", "model.safetensors.index.json", QUANT_CONFIG_FILE}
_WEIGHT_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt"}  # never copied with the tokenizer


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    rope_theta: float
    max_positions: int
    rms_norm_eps: float
    bos: int
    eos: int


PRESETS = {
    "smollm2-135m": Preset(576, 30, 9, 3, 1536, 49152, True, 100000.0, 8192, 1e-5, 1, 2),
    "llama3-8b": Preset(4096, 32, 32, 8, 14336, 128256, False, 500000.0, 8192, 1e-5, 128000, 128001),
    "llama3-70b-layer": Preset(8192, 1, 64, 8, 28672, 128256, False, 500000.0, 8192, 1e-5, 128000, 128001),
}


@dataclass
class _Module:
    """One module's tensors, generated only when its shard is written (an 8B model never sits in memory)."""

    key: str
    n_bytes: int
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]
    meta: dict[str, torch.Tensor]  # same names, shapes and dtypes on the meta device
    features: tuple[int, int] | None = None  # real (in, out) of a quantized linear


def _linear(key: str, k: int, n: int, K: int, codebook: str, out_rms: float) -> _Module:
    k_pad, n_pad = padded(k), padded(n)

    def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
        trellis = torch.randint(-32768, 32768, (k_pad // 16, n_pad // 16, 16 * K), dtype=torch.int16, generator=gen)
        # channel scales vary a little around the magnitude that maps unit-RMS inputs to out_rms outputs
        jitter_in = torch.exp(0.1 * torch.randn(k, generator=gen))
        jitter_out = torch.exp(0.1 * torch.randn(n, generator=gen))
        suh = torch.zeros(k_pad)
        suh[:k] = torch.randn(k, generator=gen).sign() * jitter_in
        svh = torch.zeros(n_pad)
        svh[:n] = torch.randn(n, generator=gen).sign() * jitter_out * out_rms / (CODEBOOK_RMS[codebook] * math.sqrt(k))
        t = Exl3Tensors(trellis, suh.half(), svh.half(), codebook, None, k, n)
        return exl3_tensors_to_dict(key, t)

    meta = {
        f"{key}.trellis": torch.empty(k_pad // 16, n_pad // 16, 16 * K, dtype=torch.int16, device="meta"),
        f"{key}.suh": torch.empty(k_pad, dtype=torch.float16, device="meta"),
        f"{key}.svh": torch.empty(n_pad, dtype=torch.float16, device="meta"),
    }
    if codebook != "3inst":
        meta[f"{key}.{codebook}"] = torch.empty((), dtype=torch.int32, device="meta")
    return _Module(key, sum(t.numel() * t.element_size() for t in meta.values()), make, meta, (k, n))


def _dense(name: str, shape: tuple[int, ...], fill: float | None, std: float = 0.0) -> _Module:
    def make(gen: torch.Generator) -> dict[str, torch.Tensor]:
        if fill is not None:
            return {name: torch.full(shape, fill, dtype=torch.float16)}
        return {name: (torch.randn(shape, generator=gen) * std).half()}

    meta = {name: torch.empty(shape, dtype=torch.float16, device="meta")}
    return _Module(name.rsplit(".", 1)[0], math.prod(shape) * 2, make, meta)


def _modules(p: Preset, bits: int, head_bits: int, codebook: str) -> list[_Module]:
    head_dim = p.hidden // p.heads
    residual_rms = 1.0 / math.sqrt(2 * p.layers)  # each of 2L residual branches adds this much
    mods = [_dense("model.embed_tokens.weight", (p.vocab, p.hidden), None, std=0.5)]
    for i in range(p.layers):
        pre = f"model.layers.{i}"
        mods.append(_dense(f"{pre}.input_layernorm.weight", (p.hidden,), 1.0))
        mods.append(_linear(f"{pre}.self_attn.q_proj", p.hidden, p.heads * head_dim, bits, codebook, 1.0))
        mods.append(_linear(f"{pre}.self_attn.k_proj", p.hidden, p.kv_heads * head_dim, bits, codebook, 1.0))
        mods.append(_linear(f"{pre}.self_attn.v_proj", p.hidden, p.kv_heads * head_dim, bits, codebook, 1.0))
        mods.append(_linear(f"{pre}.self_attn.o_proj", p.heads * head_dim, p.hidden, bits, codebook, residual_rms))
        mods.append(_dense(f"{pre}.post_attention_layernorm.weight", (p.hidden,), 1.0))
        mods.append(_linear(f"{pre}.mlp.gate_proj", p.hidden, p.intermediate, bits, codebook, 1.0))
        mods.append(_linear(f"{pre}.mlp.up_proj", p.hidden, p.intermediate, bits, codebook, 1.0))
        mods.append(_linear(f"{pre}.mlp.down_proj", p.intermediate, p.hidden, bits, codebook, residual_rms))
    mods.append(_dense("model.norm.weight", (p.hidden,), 1.0))
    # Like ExLlamaV3, the head is always stored as its own quantized lm_head, so tied models come out untied.
    mods.append(_linear("lm_head", p.hidden, p.vocab, head_bits, codebook, 1.0))
    return mods


def _shards(mods: list[_Module], max_shard_bytes: int) -> list[list[_Module]]:
    """Greedy split in model order; a module never straddles two shards."""
    shards: list[list[_Module]] = [[]]
    size = 0
    for m in mods:
        if size + m.n_bytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += m.n_bytes
    return shards


def _hf_config(p: Preset) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.hidden // p.heads,
        "vocab_size": p.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_positions,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": p.bos,
        "eos_token_id": p.eos,
        "torch_dtype": "float16",
    }


def synth_model(
    preset: str,
    bits: int,
    out_dir: str | Path,
    codebook: str = "mul1",
    head_bits: int = 6,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    max_shard_mb: int = 8192,
) -> Path:
    """Write an EXL3 model directory with random codes; returns its path.

    tokenizer_dir: a model directory whose tokenizer/template files are copied in (e.g. the default model's).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if codebook not in CODEBOOKS:
        raise ValueError(f"unknown codebook {codebook!r}; expected one of {', '.join(CODEBOOKS)}")
    for what, k in (("bits", bits), ("head_bits", head_bits)):
        if not isinstance(k, int) or not 1 <= k <= 8:
            raise ValueError(f"{what} must be an integer in 1..8, got {k!r}")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mods = _modules(p, bits, head_bits, codebook)
    shards = _shards(mods, max_shard_mb * 1024**2)

    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05}-of-{len(shards):05}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for m in shard:
            tensors.update(m.make(gen))
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(m.n_bytes for m in mods)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    meta = {name: t for m in mods for name, t in m.meta.items()}
    features = {m.key: m.features for m in mods if m.features is not None}
    body = [m for m in mods if m.key != "lm_head" and f"{m.key}.trellis" in m.meta]
    body_bits = sum(m.meta[f"{m.key}.trellis"].numel() * 16 for m in body)
    body_weights = sum(m.meta[f"{m.key}.trellis"].shape[0] * m.meta[f"{m.key}.trellis"].shape[1] * 256 for m in body)
    qcfg = {
        "quant_method": QUANT_METHOD,
        "version": WRITER_VERSION,
        "bits": round(body_bits / body_weights, 2),
        "head_bits": head_bits,
        "calibration": {"rows": 0, "cols": 0},  # random codes: nothing was calibrated
        "out_scales": "never",
        "codebook": codebook,
        "synthetic": True,
    }
    config = _hf_config(p) | {"quantization_config": qcfg}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / QUANT_CONFIG_FILE).write_text(
        json.dumps(qcfg | {"tensor_storage": tensor_storage(meta, features)}, indent=2)
    )

    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if not src.is_dir():
            raise ValueError(f"tokenizer_dir {src} is not a directory")
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _SKIP_COPY and f.suffix not in _WEIGHT_SUFFIXES:
                shutil.copy2(f, out / f.name)
    return out
