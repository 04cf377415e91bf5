"""Tiny random models with real files (safetensors, config.json, tokenizer.json) for converter and service tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from converter_worker.quant.bits import LinearShape

HIDDEN, INTERMEDIATE = 64, 96  # neither a multiple of 128: every linear is stored padded


def write_tiny_llama(out: Path, seed: int = 0, layers: int = 2, noise: float = 0.0) -> Path:
    """A random Llama (hidden 64, 2 heads sharing 1 kv head, bf16) with a byte-level tokenizer of 256 tokens.

    ``noise`` > 0 perturbs every weight of the seed's model by that relative amount (a stand-in for a quantized copy).
    """
    out.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out / "tokenizer.json"))
    heads, kv_heads, head_dim = 2, 1, HIDDEN // 2
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1000)

    def rand(*shape: int, std: float) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen) * std
        return (t * (1 + noise * torch.randn(*shape, generator=noise_gen))).to(torch.bfloat16)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rand(len(vocab), HIDDEN, std=0.15), "model.norm.weight": norm()}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = norm()
        tensors[f"{p}.post_attention_layernorm.weight"] = norm()
        tensors[f"{p}.self_attn.q_proj.weight"] = rand(heads * head_dim, HIDDEN, std=HIDDEN**-0.5)
        tensors[f"{p}.self_attn.k_proj.weight"] = rand(kv_heads * head_dim, HIDDEN, std=HIDDEN**-0.5)
        tensors[f"{p}.self_attn.v_proj.weight"] = rand(kv_heads * head_dim, HIDDEN, std=HIDDEN**-0.5)
        tensors[f"{p}.self_attn.o_proj.weight"] = rand(HIDDEN, heads * head_dim, std=HIDDEN**-0.5)
        tensors[f"{p}.mlp.gate_proj.weight"] = rand(INTERMEDIATE, HIDDEN, std=HIDDEN**-0.5)
        tensors[f"{p}.mlp.up_proj.weight"] = rand(INTERMEDIATE, HIDDEN, std=HIDDEN**-0.5)
        tensors[f"{p}.mlp.down_proj.weight"] = rand(HIDDEN, INTERMEDIATE, std=INTERMEDIATE**-0.5)
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": len(vocab),
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def smollm2_linear_shapes(layers: int = 30) -> list[LinearShape]:
    """The default model's linears (hidden 576, kv 192, MLP 1536) for bit-allocation tests, named l{layer}.{q|k|...}."""
    widths = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576)}
    widths |= {"gate": (576, 1536), "up": (576, 1536), "down": (1536, 576)}
    groups = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
    return [LinearShape(f"l{i}.{n}", i, groups[n], *widths[n]) for i in range(layers) for n in widths]
