"""Turn a llama.cpp GGUF file into a Hugging Face style model directory (bf16 weights, tokenizer, chat template).

What GGUF changes and we undo:
- tensor names (``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``) and quantization (every
  tensor is dequantized with ``gguf.quants`` and stored as bf16);
- llama.cpp's convert script permutes the rows of q_proj/k_proj from Hugging Face's half-split rotary layout into
  interleaved pairs; ``_unpermute_rope_rows`` is its exact inverse;
- the tokenizer is stored as vocab + merges + token types + a pre-tokenizer *name*; we rebuild a ``tokenizers`` BPE
  with the pre-tokenizer that name stands for.

The directory is written into a temporary sibling and renamed into place at the end, so a crash never leaves a
half-written model under the final name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from shared.model_dir import SINGLE_WEIGHTS_FILE, WEIGHTS_INDEX_FILE

MAX_SHARD_BYTES = 2 * 1024**3  # bounds the memory an import holds: one shard of bf16 tensors at a time

# --- metadata ------------------------------------------------------------------------------------------------------

_MISSING = object()


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path} lacks the GGUF metadata key {key!r}")
            return default
        return field.contents()

    def __contains__(self, key: str) -> bool:
        return key in self._fields


def _short_float(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _config(meta: GGUFMetadata, tensor_names: set[str], vocab_size: int) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM from the GGUF's ``llama.*`` keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{meta.path} is a {arch!r} model; import-gguf supports the 'llama' architecture only")
    heads = int(meta.get("llama.attention.head_count"))
    hidden = int(meta.get("llama.embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(f"{meta.path}: rotary over {rope_dims} of {head_dim} head dims is not a Llama layout")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{meta.path} stores Llama-3.1 style rope factors (rope_freqs), which import-gguf cannot map")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.get("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.get("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _short_float(meta.get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(re.fullmatch(r"blk\.\d+\.attn_[qkv]\.bias", n) for n in tensor_names),
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _short_float(meta.get("llama.rope.scaling.factor"))}
    elif scaling_type != "none":
        raise ValueError(f"{meta.path}: rope scaling type {scaling_type!r} is not supported by import-gguf")
    config.update(_special_token_ids(meta))
    return config


def _special_token_ids(meta: GGUFMetadata) -> dict[str, Any]:
    """bos/eos/pad ids; end-of-turn tokens join eos so generation stops on them too."""
    ids: dict[str, Any] = {}
    if "tokenizer.ggml.bos_token_id" in meta:
        ids["bos_token_id"] = int(meta.get("tokenizer.ggml.bos_token_id"))
    eos = [int(meta.get(key)) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta]
    eos = list(dict.fromkeys(eos))
    if eos:
        ids["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if "tokenizer.ggml.padding_token_id" in meta:
        ids["pad_token_id"] = int(meta.get("tokenizer.ggml.padding_token_id"))
    return ids


# --- tensors -------------------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama GGUF tensor."""
    module, _, kind = gguf_name.rpartition(".")
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", module)
    if block and block.group(2) in _BLOCK_NAMES:
        return f"model.layers.{block.group(1)}.{_BLOCK_NAMES[block.group(2)]}.{kind}"
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert-time permute: per head, rows (pair i, member j) go back to (half j, index i).

    llama.cpp reshapes rows as [heads, 2, head_dim/2] and swaps the last two axes; we reshape as
    [heads, head_dim/2, 2] and swap them back.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _hf_tensors(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, bf16 tensor) for every tensor of the GGUF, dequantized one at a time."""
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        try:
            values = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        except NotImplementedError as exc:
            raise ValueError(f"tensor {t.name} uses {t.tensor_type.name}, which gguf cannot dequantize") from exc
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first; torch wants slowest-first
        values = np.require(values, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])  # copies only read-only F32 views
        tensor = torch.from_numpy(values.reshape(shape)).to(torch.bfloat16)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute_rope_rows(tensor, config["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute_rope_rows(tensor, config["num_key_value_heads"])
        yield name, tensor.contiguous()


def _write_weights(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000X-of-0000N.safetensors plus the index when the weights exceed one shard."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[Path, list[str]]] = []
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = out_dir / f"shard-{len(written)}.partial"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        written.append((path, list(shards[0])))
        shards[0] = {}

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shards[0] and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shards[0][name] = tensor
        shard_bytes += size
        total_bytes += size
    flush()

    if len(written) == 1:
        written[0][0].rename(out_dir / SINGLE_WEIGHTS_FILE)
        return
    weight_map = {}
    for i, (path, names) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# --- tokenizer -----------------------------------------------------------------------------------------------------


def _split_regex(digit_run: str) -> str:
    """The Llama-3 / Qwen2 pre-tokenizer split; they differ only in how many digits one pre-token may hold."""
    alternatives = [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, with one leading non-letter (space, punctuation)
        digit_run,
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation runs
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
    return "|".join(alternatives)


_SPLIT_REGEXES = {"llama-bpe": _split_regex(r"\p{N}{1,3}"), "qwen2": _split_regex(r"\p{N}")}
_SUPPORTED_PRE = ("default", "gpt-2", "smollm", *_SPLIT_REGEXES)


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, BPE ignore_merges) for a tokenizer.ggml.pre name."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt-2"):
        return gpt2, False
    if pre == "smollm":  # every digit is its own pre-token, then the GPT-2 split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), False
    split_regex = _SPLIT_REGEXES.get(pre)
    if split_regex is not None:
        split = pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level]), pre == "llama-bpe"
    raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(_SUPPORTED_PRE)})")


def _added_tokens(tokens: list[str], token_types: list[int]) -> list[tuple[int, AddedToken]]:
    """Tokens matched whole before BPE: control/unknown ones are special, user-defined ones are not."""
    added = []
    for token_id, (content, kind) in enumerate(zip(tokens, token_types, strict=True)):
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
            special = kind != TokenType.USER_DEFINED
            added.append((token_id, AddedToken(content, special=special, normalized=False)))
    return added


def _post_processor(meta: GGUFMetadata, tokens: list[str]) -> processors.PostProcessor:
    """Adds bos/eos around encoded text when the GGUF says so (tokenizer.ggml.add_bos_token / add_eos_token)."""
    ends: dict[str, tuple[str, int]] = {}
    for end in ("bos", "eos"):
        if meta.get(f"tokenizer.ggml.add_{end}_token", False):
            token_id = int(meta.get(f"tokenizer.ggml.{end}_token_id"))
            ends[end] = (tokens[token_id], token_id)
    if not ends:
        return processors.ByteLevel(trim_offsets=False)

    def wrapped(piece: str) -> list[str]:
        return [ends[e][0] for e in ("bos",) if e in ends] + [piece] + [ends[e][0] for e in ("eos",) if e in ends]

    return processors.TemplateProcessing(
        single=wrapped("$A"), pair=wrapped("$A") + wrapped("$B:1"), special_tokens=list(dict.fromkeys(ends.values()))
    )


def build_tokenizer(meta: GGUFMetadata) -> tuple[Tokenizer, list[tuple[int, AddedToken]]]:
    """A ``tokenizers`` BPE equal to the GGUF's byte-level BPE tokenizer, and its added tokens by id."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{meta.path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    token_types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    pre, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    added = _added_tokens(tokens, token_types)
    tokenizer.add_special_tokens([tok for _, tok in added if tok.special])
    tokenizer.add_tokens([tok for _, tok in added if not tok.special])

    tokenizer.post_processor = _post_processor(meta, tokens)
    return tokenizer, added


def _tokenizer_config(meta: GGUFMetadata, tokens: list[str], added: list[tuple[int, AddedToken]]) -> dict[str, Any]:
    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        return None if token_id is None else tokens[int(token_id)]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length")),
        "added_tokens_decoder": {
            str(token_id): {
                "content": tok.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": tok.special,
            }
            for token_id, tok in added
        },
    }
    template = meta.get("tokenizer.chat_template", None)
    if template is not None:
        config["chat_template"] = template
    return {key: value for key, value in config.items() if value is not None}


# --- the import ----------------------------------------------------------------------------------------------------


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _remove_abandoned_staging(out_dir: Path) -> None:
    """Delete staging folders of earlier imports to out_dir whose process died (killed mid-import)."""
    for staging in out_dir.parent.glob(f".{out_dir.name}.importing-*"):
        match = re.fullmatch(rf"\.{re.escape(out_dir.name)}\.importing-(\d+)-\w+", staging.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def import_gguf(gguf_path: Path, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the model in ``gguf_path`` as a Hugging Face style directory at ``out_dir`` (which must not exist)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output directory")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as exc:  # the reader raises bare ValueErrors/struct errors on non-GGUF input
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {exc}") from exc
    meta = GGUFMetadata(reader, gguf_path)
    tokenizer, added = build_tokenizer(meta)
    tokens = [str(t) for t in meta.get("tokenizer.ggml.tokens")]
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{gguf_path} has no token_embd.weight tensor")
    config = _config(meta, {t.name for t in reader.tensors}, vocab_size=int(embedding.shape[-1]))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.importing-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_weights(_hf_tensors(reader, config), staging, max_shard_bytes)
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(meta, tokens, added))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        _write_json(staging / "generation_config.json", generation)
        for weights in staging.glob("*.safetensors"):  # safetensors writes 0600; give them the usual mode
            shutil.copymode(staging / "tokenizer.json", weights)
        _write_json(staging / "config.json", config)  # written last: its presence means the rest is there
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
