"""GGUF import: the default model's directory against transformers' own GGUF readers, and small GGUFs we write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from shared.default_model import cli_import_gguf, locate_default_gguf
from shared.gguf_import import import_gguf
from shared.model_dir import WEIGHTS_INDEX_FILE, TensorSource, load_config

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\tand\n\nblank lines\r\n   trailing   ",
    "It's 2024-06-01; pi is 3.14159 and 1,000,000 > 999999.",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, العربية, עברית",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "Emoji 🤗🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, symbols ∑∫√∞ ≠ ≤",
    "Special tokens inline: <|im_start|>user\nhi<|im_end|>\n<|endoftext|> and <|im_start|> again",
    "<|im_start|><|im_end|><repo_name>trellis<file_sep>README.md",
    "",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return locate_default_gguf()


@pytest.fixture(scope="module")
def oracle_tokenizer(gguf_path: Path):
    """transformers' conversion of the GGUF's tokenizer: the reference our tokenizer.json must agree with."""
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def our_tokenizer(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))


def test_import_writes_a_complete_model_directory(default_model_dir: Path, gguf_path: Path) -> None:
    for name in MODEL_FILES:
        assert (default_model_dir / name).is_file(), name
    assert not list(default_model_dir.parent.glob(f".{default_model_dir.name}.importing-*"))
    with TensorSource(default_model_dir) as source:
        assert len(source) == len(gguf.GGUFReader(gguf_path).tensors)
        assert all(source.get(name).dtype == torch.bfloat16 for name in source.keys())
    assert load_config(default_model_dir)["torch_dtype"] == "bfloat16"


def test_imported_weights_equal_transformers_gguf_dequantization(default_model_dir: Path, gguf_path: Path) -> None:
    # transformers dequantizes and un-permutes q/k itself; our bf16 tensors must be exactly its values in bf16.
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    theirs = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)["tensors"]
    with TensorSource(default_model_dir) as source:
        assert set(source.keys()) == set(theirs)
        for name in source.keys():
            assert torch.equal(source.get(name), theirs[name].to(torch.bfloat16)), name


def test_config_matches_gguf_metadata(default_model_dir: Path, gguf_path: Path) -> None:
    ours = load_config(default_model_dir)
    theirs = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert "rope_scaling" not in ours  # the GGUF has no rope scaling keys
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (ours["bos_token_id"], ours["eos_token_id"])


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_tokenizer_encodes_exactly_like_the_gguf_tokenizer(text: str, our_tokenizer: Tokenizer, oracle_tokenizer):
    ids = our_tokenizer.encode(text).ids
    assert ids == oracle_tokenizer.encode(text)
    assert our_tokenizer.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_special_tokens_are_single_ids_named_in_tokenizer_config(default_model_dir: Path, our_tokenizer: Tokenizer):
    tokenizer_config = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    config = load_config(default_model_dir)
    assert our_tokenizer.token_to_id(tokenizer_config["bos_token"]) == config["bos_token_id"]
    assert our_tokenizer.token_to_id(tokenizer_config["eos_token"]) == config["eos_token_id"]
    for token_id, entry in tokenizer_config["added_tokens_decoder"].items():
        assert our_tokenizer.encode(entry["content"]).ids == [int(token_id)]
    # specials vanish when decoding for display
    im_start = our_tokenizer.encode("<|im_start|>assistant").ids
    assert our_tokenizer.decode(im_start, skip_special_tokens=True) == "assistant"


def test_chat_template_renders_and_tokenizes_like_the_gguf(default_model_dir: Path, oracle_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "What is 2+2? Answer with 🤖 style."},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times ten?"},
    ]
    ours = AutoTokenizer.from_pretrained(default_model_dir)
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for m in messages:
        assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert text == oracle_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_file(str(default_model_dir / "tokenizer.json")).encode(text).ids == oracle_tokenizer.encode(
        text
    )


# --- small GGUFs written here ---------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 32, 4, 2, 8, 48


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 byte-level BPE uses for the bytes 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to q_proj/k_proj rows (the inverse of what the importer must undo)."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A one-block llama GGUF with float32 tensors; returns the Hugging Face layout tensors it encodes."""
    rng = np.random.default_rng(0)
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = [*_byte_level_alphabet(), "Ġt", "he", "Ġthe", "<|end|>"]

    def bf16_exact(*shape: int) -> np.ndarray:  # values bf16 holds exactly, so the import must be lossless
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).bfloat16().float().numpy()

    hf = {
        "model.embed_tokens.weight": bf16_exact(len(tokens), HIDDEN),
        "model.norm.weight": bf16_exact(HIDDEN),
        "lm_head.weight": bf16_exact(len(tokens), HIDDEN),
        "model.layers.0.input_layernorm.weight": bf16_exact(HIDDEN),
        "model.layers.0.post_attention_layernorm.weight": bf16_exact(HIDDEN),
        "model.layers.0.self_attn.q_proj.weight": bf16_exact(HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.k_proj.weight": bf16_exact(KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.v_proj.weight": bf16_exact(KV_HEADS * HEAD_DIM, HIDDEN),
        "model.layers.0.self_attn.o_proj.weight": bf16_exact(HIDDEN, HEADS * HEAD_DIM),
        "model.layers.0.mlp.gate_proj.weight": bf16_exact(FFN, HIDDEN),
        "model.layers.0.mlp.up_proj.weight": bf16_exact(FFN, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": bf16_exact(HIDDEN, FFN),
    }
    gguf_tensors = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
        "blk.0.attn_norm.weight": hf["model.layers.0.input_layernorm.weight"],
        "blk.0.ffn_norm.weight": hf["model.layers.0.post_attention_layernorm.weight"],
        "blk.0.attn_q.weight": llama_cpp_permute(hf["model.layers.0.self_attn.q_proj.weight"], HEADS),
        "blk.0.attn_k.weight": llama_cpp_permute(hf["model.layers.0.self_attn.k_proj.weight"], KV_HEADS),
        "blk.0.attn_v.weight": hf["model.layers.0.self_attn.v_proj.weight"],
        "blk.0.attn_output.weight": hf["model.layers.0.self_attn.o_proj.weight"],
        "blk.0.ffn_gate.weight": hf["model.layers.0.mlp.gate_proj.weight"],
        "blk.0.ffn_up.weight": hf["model.layers.0.mlp.up_proj.weight"],
        "blk.0.ffn_down.weight": hf["model.layers.0.mlp.down_proj.weight"],
        **(extra_tensors or {}),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    for name, value in gguf_tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_import_undoes_llama_cpp_rope_permutation_exactly(tmp_path: Path) -> None:
    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny")
    with TensorSource(out) as source:
        assert set(source.keys()) == set(hf)
        for name, expected in hf.items():
            assert torch.equal(source.get(name).float(), torch.from_numpy(expected)), name
    config = load_config(out)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert config["tie_word_embeddings"] is False
    # add_bos_token: the tokenizer puts <|end|> (the bos here) in front; merges apply ("Ġthe" is one token)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokens = tokenizer.encode("he the").tokens
    assert tokens == ["<|end|>", "he", "Ġthe"]


def test_import_shards_weights_beyond_the_shard_size_with_an_index(tmp_path: Path) -> None:
    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "tiny", max_shard_bytes=20_000)
    index = json.loads((out / WEIGHTS_INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    with TensorSource(out) as source:
        for name, expected in hf.items():
            assert torch.equal(source.get(name).float(), torch.from_numpy(expected)), name


def test_failed_import_leaves_nothing_that_looks_like_a_model(tmp_path: Path) -> None:
    # the unknown tensor comes last, so shards were already written when the import fails
    write_tiny_gguf(tmp_path / "bad.gguf", extra_tensors={"blk.0.mystery.weight": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        import_gguf(tmp_path / "bad.gguf", tmp_path / "models" / "bad", max_shard_bytes=20_000)
    assert list((tmp_path / "models").iterdir()) == []


def test_import_refuses_an_existing_output_directory(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "taken")


def test_import_rejects_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "notes.gguf").write_text("this is not a GGUF file\n" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "notes.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_imports_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    assert cli_import_gguf([str(tmp_path / "tiny.gguf"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert cli_import_gguf([str(tmp_path / "missing.gguf"), str(tmp_path / "out2")]) == 1
    assert "missing.gguf" in capsys.readouterr().err


def test_import_sweeps_staging_left_by_a_killed_import(tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    models = tmp_path / "models"
    dead = models / ".tiny.importing-999999999-0badc0de"  # no such process
    alive = models / f".tiny.importing-{os.getpid()}-0badc0de"  # this process: an import in progress
    dead.mkdir(parents=True)
    alive.mkdir()
    import_gguf(tmp_path / "tiny.gguf", models / "tiny")
    assert sorted(p.name for p in models.iterdir()) == [alive.name, "tiny"]
