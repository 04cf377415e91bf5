"""EXL3 tensors and model directories: write -> safetensors -> read, every malformed input, synth and the CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels.exl3_ref import exl3_matmul_ref, pack_codes, reconstruct_weight
from shared.exl3_cli import cli_dequant, cli_inspect, cli_synth, open_tensors
from shared.exl3_format import (
    Exl3FormatError,
    Exl3Tensors,
    exl3_tensors_to_dict,
    padded,
    quantized_prefixes,
    read_exl3_linear,
    read_quantization_config,
    tensor_storage,
)
from shared.exl3_synth import synth_model

KEY = "model.layers.0.self_attn.k_proj"


def _layer(in_f: int, out_f: int, K: int, codebook: str, bias: bool = False, seed: int = 0) -> Exl3Tensors:
    gen = torch.Generator().manual_seed(seed)
    k, n = padded(in_f), padded(out_f)
    trellis = pack_codes(torch.randint(0, 1 << K, (k // 16, n // 16, 256), generator=gen), K)
    suh = torch.randn(k, generator=gen).half()
    svh = torch.randn(n, generator=gen).half()
    b = torch.randn(out_f, generator=gen).half() if bias else None
    return Exl3Tensors(trellis, suh, svh, codebook, b, in_f, out_f)


def _through_file(tensors: dict[str, torch.Tensor], tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "layer.safetensors"
    save_file(tensors, str(path))
    return load_file(str(path))


def test_padding_rule_for_a_576_to_192_projection() -> None:
    assert (padded(576), padded(192), padded(128), padded(1)) == (640, 256, 128, 128)
    t = _layer(576, 192, 4, "mul1")
    stored = exl3_tensors_to_dict(KEY, t)
    assert stored[f"{KEY}.trellis"].shape == (40, 16, 64)
    assert stored[f"{KEY}.suh"].shape == (640,) and stored[f"{KEY}.svh"].shape == (256,)


@pytest.mark.parametrize("codebook", ["3inst", "mcg", "mul1"])
def test_write_read_round_trip_through_safetensors(codebook: str, tmp_path: Path) -> None:
    t = _layer(576, 192, 3, codebook, bias=True)
    loaded = _through_file(exl3_tensors_to_dict(KEY, t), tmp_path)
    back = read_exl3_linear(loaded, KEY, 576, 192)
    assert back.codebook == codebook and back.K == 3
    assert (back.in_features, back.out_features, back.in_padded, back.out_padded) == (576, 192, 640, 256)
    assert torch.equal(back.trellis, t.trellis) and torch.equal(back.suh, t.suh) and torch.equal(back.svh, t.svh)
    assert torch.equal(back.bias, t.bias)
    markers = {name.rsplit(".", 1)[1] for name in loaded} & {"mcg", "mul1"}
    assert markers == ({codebook} if codebook != "3inst" else set())


def test_codebook_markers_hold_exllamav3_multipliers_as_int32_scalars() -> None:
    mcg = exl3_tensors_to_dict(KEY, _layer(128, 128, 2, "mcg"))[f"{KEY}.mcg"]
    mul1 = exl3_tensors_to_dict(KEY, _layer(128, 128, 2, "mul1"))[f"{KEY}.mul1"]
    assert mcg.dtype == torch.int32 and mcg.shape == ()
    assert mcg.item() & 0xFFFFFFFF == 0xCBAC1FED
    assert mul1.item() & 0xFFFFFFFF == 0x83DCD12D


def test_features_default_to_the_stored_padded_sizes() -> None:
    back = read_exl3_linear(exl3_tensors_to_dict(KEY, _layer(576, 192, 2, "mcg")), KEY)
    assert (back.in_features, back.out_features) == (640, 256)


def test_old_packed_sign_vectors_are_unpacked() -> None:
    t = _layer(128, 128, 2, "3inst")
    stored = exl3_tensors_to_dict(KEY, t)
    del stored[f"{KEY}.suh"]
    negative = [i % 3 == 0 for i in range(128)]
    words = [sum(1 << b for b in range(16) if negative[16 * w + b]) for w in range(8)]
    stored[f"{KEY}.su"] = torch.tensor([w - 65536 if w >= 32768 else w for w in words], dtype=torch.int16)
    back = read_exl3_linear(stored, KEY)
    assert back.suh.tolist() == [-1.0 if neg else 1.0 for neg in negative]


def _malformed(change: str) -> dict[str, torch.Tensor]:
    d = exl3_tensors_to_dict(KEY, _layer(576, 192, 4, "mul1", bias=True))
    tr, suh = f"{KEY}.trellis", f"{KEY}.suh"
    if change == "no trellis":
        del d[tr]
    elif change == "trellis int32":
        d[tr] = d[tr].int()
    elif change == "trellis 2-D":
        d[tr] = d[tr].reshape(40 * 16, 64)
    elif change == "K 9":
        d[tr] = torch.zeros(40, 16, 144, dtype=torch.int16)
    elif change == "half-integer K":
        d[tr] = torch.zeros(40, 16, 72, dtype=torch.int16)
    elif change == "words not 16*K":
        d[tr] = torch.zeros(40, 16, 20, dtype=torch.int16)
    elif change == "not a Hadamard multiple":
        d[tr] = torch.zeros(36, 16, 64, dtype=torch.int16)
    elif change == "no suh":
        del d[suh]
    elif change == "suh float32":
        d[suh] = d[suh].float()
    elif change == "suh short":
        d[suh] = d[suh][:576]
    elif change == "svh long":
        d[f"{KEY}.svh"] = torch.zeros(384, dtype=torch.float16)
    elif change == "both markers":
        d[f"{KEY}.mcg"] = torch.tensor(0, dtype=torch.int32)
    elif change == "marker float":
        d[f"{KEY}.mul1"] = torch.tensor(1.0)
    elif change == "bias wrong length":
        d[f"{KEY}.bias"] = torch.zeros(100, dtype=torch.float16)
    return d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no trellis", f"{KEY}.trellis: missing"),
        ("trellis int32", "trellis: expected dtype int16, got torch.int32"),
        ("trellis 2-D", "trellis: expected 3 dims"),
        ("K 9", "last dim 144 is not 16\\*K with K an integer in 1..8"),
        ("half-integer K", "half-integer bitrate K = 4.5"),
        ("words not 16*K", "last dim 20 is not 16\\*K"),
        ("not a Hadamard multiple", "must be multiples of 128"),
        ("no suh", f"{KEY}.suh: missing"),
        ("suh float32", "suh: expected dtype float16, got torch.float32"),
        ("suh short", "suh: expected shape \\(640,\\)"),
        ("svh long", "svh: expected shape \\(256,\\)"),
        ("both markers", "both codebook markers"),
        ("marker float", "mul1: codebook marker must be an int32 scalar"),
        ("bias wrong length", "bias: expected shape \\(192,\\)"),
    ],
)
def test_malformed_layer_errors_name_the_tensor(change: str, message: str) -> None:
    tensors = _malformed(change)
    expected_in = 576 if change != "not a Hadamard multiple" else None
    with pytest.raises(Exl3FormatError, match=message):
        read_exl3_linear(tensors, KEY, expected_in, 192)


def test_features_that_do_not_match_the_stored_padding_are_rejected() -> None:
    stored = exl3_tensors_to_dict(KEY, _layer(576, 192, 2, "mcg"))
    with pytest.raises(Exl3FormatError, match="in_features 700 is stored padded to 768, but the trellis holds 640"):
        read_exl3_linear(stored, KEY, 700, 192)
    with pytest.raises(Exl3FormatError, match="out_features 64 is stored padded to 128, but the trellis holds 256"):
        read_exl3_linear(stored, KEY, 576, 64)


def test_writing_an_unknown_codebook_is_rejected() -> None:
    t = _layer(128, 128, 2, "mul1")
    t.codebook = "e8p"
    with pytest.raises(Exl3FormatError, match="unknown codebook 'e8p'"):
        exl3_tensors_to_dict(KEY, t)


def test_tensor_storage_lists_modules_like_exllamav3() -> None:
    tensors = exl3_tensors_to_dict(KEY, _layer(576, 192, 5, "mul1"))
    tensors["model.norm.weight"] = torch.ones(576, dtype=torch.float16)
    storage = tensor_storage(tensors)
    entry = storage[KEY]
    assert entry["quant_format"] == "exl3" and entry["bits_per_weight"] == 5
    assert entry["mul1_multiplier"] == 0x83DCD12D
    assert entry["stored_tensors"][f"{KEY}.trellis"] == {
        "shape": [40, 16, 80],
        "n_bytes": 102400,
        "dtype": "torch.int16",
    }
    assert storage["model.norm"] == {
        "stored_tensors": {"model.norm.weight": {"shape": [576], "n_bytes": 1152, "dtype": "torch.float16"}}
    }


def _write_config(d: Path, config: dict | str, extra: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if extra is not None:
        (d / "quantization_config.json").write_text(json.dumps(extra))
    return d


def test_quantization_config_merges_both_files(tmp_path: Path) -> None:
    qcfg = {"quant_method": "exl3", "version": "0.0.6", "bits": 4.25, "head_bits": 6, "codebook": "mcg"}
    d = _write_config(tmp_path / "m", {"quantization_config": qcfg}, qcfg | {"tensor_storage": {"lm_head": {}}})
    got = read_quantization_config(d)
    assert got["bits"] == 4.25 and got["codebook"] == "mcg" and got["tensor_storage"] == {"lm_head": {}}


def test_quantization_config_is_none_for_a_dense_model(tmp_path: Path) -> None:
    assert read_quantization_config(_write_config(tmp_path / "dense", {"model_type": "llama"})) is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method is 'gptq', expected 'exl3'"),
        ("{not json", "config.json: not valid JSON"),
        ({"quantization_config": [1, 2]}, "quantization_config must be an object"),
    ],
)
def test_bad_quantization_configs_are_named(tmp_path: Path, config: dict | str, message: str) -> None:
    with pytest.raises(Exl3FormatError, match=message):
        read_quantization_config(_write_config(tmp_path / "bad", config))


def test_missing_config_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(Exl3FormatError, match="config.json: missing"):
        read_quantization_config(tmp_path)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's shapes at 2 bits, sharded small so the index and shard rules are exercised."""
    return synth_model("smollm2-135m", 2, tmp_path_factory.mktemp("synth") / "m", codebook="mul1", max_shard_mb=40)


def _load_all(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(model_dir / shard)))
    return tensors, index["weight_map"]


def test_synth_model_is_a_valid_sharded_exl3_directory(synth_dir: Path) -> None:
    config = json.loads((synth_dir / "config.json").read_text())
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is False  # the head is stored quantized on its own, as ExLlamaV3 does
    qcfg = read_quantization_config(synth_dir)
    assert (qcfg["bits"], qcfg["head_bits"], qcfg["codebook"]) == (2.0, 6, "mul1")
    tensors, weight_map = _load_all(synth_dir)
    assert set(weight_map) == set(tensors)
    prefixes = quantized_prefixes(tensors)
    assert len(prefixes) == 30 * 7 + 1
    for prefix in prefixes:  # a module never straddles two shards
        assert len({f for name, f in weight_map.items() if name.startswith(prefix + ".")}) == 1
    assert set(qcfg["tensor_storage"]) >= set(prefixes)
    assert qcfg["tensor_storage"]["lm_head"]["bits_per_weight"] == 6


def test_synth_layers_load_and_give_unit_scale_outputs(synth_dir: Path) -> None:
    tensors, _ = _load_all(synth_dir)
    k_proj = read_exl3_linear(tensors, KEY, 576, 192)
    assert k_proj.K == 2 and k_proj.codebook == "mul1" and k_proj.trellis.shape == (40, 16, 32)
    head = read_exl3_linear(tensors, "lm_head", 576, 49152)
    assert head.K == 6
    x = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    y = exl3_matmul_ref(x, k_proj.trellis, k_proj.suh, k_proj.svh, k_proj.codebook)
    assert 0.5 < y[:, :192].pow(2).mean().sqrt().item() < 2.0
    assert torch.equal(y[:, 192:], torch.zeros_like(y[:, 192:]))  # padded outputs carry zero scales
    w = reconstruct_weight(k_proj.trellis, k_proj.suh, k_proj.svh, k_proj.codebook)
    assert torch.equal(w[576:], torch.zeros_like(w[576:]))  # padded inputs too


def test_synth_rejects_unknown_presets_and_bits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        synth_model("gpt5", 4, tmp_path)
    with pytest.raises(ValueError, match="bits must be an integer in 1..8, got 9"):
        synth_model("smollm2-135m", 9, tmp_path)


def test_synth_copies_tokenizer_files_from_the_default_model(default_model_dir: Path, tmp_path: Path) -> None:
    out = synth_model("smollm2-135m", 1, tmp_path / "m", head_bits=1, tokenizer_dir=default_model_dir)
    copied = {f.name for f in out.iterdir()}
    assert "tokenizer.json" in copied
    assert (out / "tokenizer.json").read_bytes() == (default_model_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "exl3"


def test_cli_synth_then_inspect_prints_bits_and_codebooks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "m"
    assert cli_synth(["smollm2-135m", "-o", str(out), "-b", "3", "--head-bits", "5", "--codebook", "mcg"]) == 0
    capsys.readouterr()
    assert cli_inspect([str(out)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text
    assert "model.layers.29.mlp.down_proj" in text and "exl3 3b mcg" in text
    assert "lm_head" in text and "exl3 5b mcg" in text
    assert "model.embed_tokens.weight" in text and "float16" in text
    # 210 body linears at 3 bits plus a 5-bit head, weighted by their stored (padded) sizes
    body = 30 * (640 * 640 * 2 + 640 * 256 * 2 + 640 * 1536 * 3)
    head = 640 * 49152
    avg = (3 * body + 5 * head) / (body + head)
    assert f"quantized linears: 211, average {avg:.2f} bits per stored weight" in text
    assert "576 x 192 (640 x 256)" in text  # k_proj: real sizes, then the padded stored ones


def test_cli_dequant_writes_the_dense_weight(synth_dir: Path, tmp_path: Path) -> None:
    shard = next(f for f in sorted(synth_dir.glob("model-*.safetensors")) if f"{KEY}.trellis" in load_file(str(f)))
    out = tmp_path / "w.safetensors"
    argv = [str(shard), "--key", KEY, "-o", str(out), "--in-features", "576", "--out-features", "192"]
    assert cli_dequant(argv) == 0
    w = load_file(str(out))["weight"]
    t = read_exl3_linear(load_file(str(shard)), KEY)
    assert w.dtype == torch.float16 and w.shape == (576, 192)
    assert torch.equal(w, reconstruct_weight(t.trellis, t.suh, t.svh, t.codebook)[:576, :192])


def test_cli_dequant_reports_a_missing_key(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_dequant([str(synth_dir), "--key", "model.layers.99.mlp.up_proj", "-o", str(tmp_path / "w.safetensors")])
    assert code == 2
    assert "model.layers.99.mlp.up_proj.trellis: missing" in capsys.readouterr().err


def test_open_tensors_names_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        open_tensors(tmp_path / "nope")


def test_dequant_of_a_model_directory_uses_the_recorded_real_sizes(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    assert cli_dequant([str(synth_dir), "--key", f"{KEY}.trellis", "-o", str(out)]) == 0
    assert load_file(str(out))["weight"].shape == (576, 192)


def test_tensor_storage_records_real_sizes_only_for_padded_layers() -> None:
    tensors = exl3_tensors_to_dict(KEY, _layer(576, 192, 2, "mcg")) | exl3_tensors_to_dict(
        "o", _layer(256, 128, 2, "mcg")
    )
    storage = tensor_storage(tensors, {KEY: (576, 192), "o": (256, 128)})
    assert (storage[KEY]["in_features"], storage[KEY]["out_features"]) == (576, 192)
    assert "in_features" not in storage["o"] and "out_features" not in storage["o"]
