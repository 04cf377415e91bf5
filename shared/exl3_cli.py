"""`trellis inspect`, `trellis dequant`, `trellis synth`: look into, unpack, or fabricate EXL3 models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.exl3_ref import reconstruct_weight
from shared.exl3_format import (
    CODEBOOK_MARKERS,
    Exl3FormatError,
    TensorSource,
    quantized_prefixes,
    read_exl3_linear,
    read_quantization_config,
    stored_features,
)


class _SafetensorsFile:
    """A single .safetensors file as a TensorSource (model directories go through shared.model_dir)."""

    def __init__(self, path: Path) -> None:
        self._file = safe_open(str(path), framework="pt")
        self._names = set(self._file.keys())

    def keys(self) -> list[str]:
        return sorted(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)


def open_tensors(path: str | Path) -> TensorSource:
    """A lazy tensor source for a model directory or a single .safetensors file."""
    path = Path(path)
    if path.is_file():
        return _SafetensorsFile(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    from shared.model_dir import TensorSource as DirectorySource

    return DirectorySource(path)


def _size(n_bytes: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n_bytes >= 1024 and i < len(units) - 1:
        n_bytes /= 1024
        i += 1
    return f"{n_bytes:.0f} B" if i == 0 else f"{n_bytes:.2f} {units[i]}"


def _natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts model.layers.10 after model.layers.9."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def inspect_model(model_dir: str | Path) -> str:
    """A human-readable description of a model directory: architecture, every tensor, bits and sizes."""
    model_dir = Path(model_dir)
    qcfg = read_quantization_config(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    source = open_tensors(model_dir)
    names = list(source.keys())
    quantized = quantized_prefixes(names)
    owned = {f"{p}.{s}" for p in quantized for s in ("trellis", "suh", "svh", "su", "sv", "bias", *CODEBOOK_MARKERS)}

    arch = ", ".join(config.get("architectures", [])) or config.get("model_type", "unknown")
    lines = [f"model: {model_dir}", f"architecture: {arch} (model_type {config.get('model_type', '?')})"]
    dims = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    lines.append("  " + ", ".join(f"{d} {config[d]}" for d in dims if d in config))
    if qcfg is None:
        lines.append("quantization: none (dense model)")
    else:
        shown = {k: v for k, v in qcfg.items() if k != "tensor_storage"}
        lines.append("quantization: " + ", ".join(f"{k} {v}" for k, v in shown.items()))

    lines.append("")
    lines.append(f"{'tensor':<48} {'format':<14} {'shape (in x out)':<26} {'size':>11}")
    q_bits = q_weights = q_real = q_bytes = dense_bytes = 0
    for prefix in sorted(quantized, key=_natural):
        t = read_exl3_linear(source, prefix, *stored_features(qcfg, prefix))
        n_bytes = sum(_nbytes(x) for x in (t.trellis, t.suh, t.svh) + ((t.bias,) if t.bias is not None else ()))
        q_bits += t.trellis.numel() * 16
        q_weights += t.in_padded * t.out_padded
        q_real += t.in_features * t.out_features
        q_bytes += n_bytes
        fmt = f"exl3 {t.K}b {t.codebook}"
        shape = f"{t.in_features} x {t.out_features}"
        if (t.in_features, t.out_features) != (t.in_padded, t.out_padded):
            shape += f" ({t.in_padded} x {t.out_padded})"
        lines.append(f"{prefix:<48} {fmt:<14} {shape:<26} {_size(n_bytes):>11}")
    for name in sorted(set(names) - owned, key=_natural):
        t = source.get(name)
        dense_bytes += _nbytes(t)
        shape = " x ".join(str(s) for s in t.shape) or "scalar"
        dtype = str(t.dtype).removeprefix("torch.")
        lines.append(f"{name:<48} {dtype:<14} {shape:<26} {_size(_nbytes(t)):>11}")

    lines.append("")
    if q_weights:
        lines.append(
            f"quantized linears: {len(quantized)}, average {q_bits / q_weights:.2f} bits per stored weight, "
            f"{q_bits / q_real:.2f} per real weight (padding counted)"
        )
    lines.append(f"sizes: quantized {_size(q_bytes)}, dense {_size(dense_bytes)}, total {_size(q_bytes + dense_bytes)}")
    return "\n".join(lines)


def _fail(prog: str, exc: Exception) -> int:
    print(f"trellis {prog}: error: {exc}", file=sys.stderr)
    return 2


def cli_inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trellis inspect", description="describe a model directory")
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        print(inspect_model(args.model_dir))
    except (Exl3FormatError, FileNotFoundError, ValueError) as exc:
        return _fail("inspect", exc)
    return 0


def dequant(
    path: str | Path, key: str, in_features: int | None = None, out_features: int | None = None
) -> torch.Tensor:
    """Dense float16 weight (in, out) of the EXL3 linear ``key``, trimmed to its real sizes: those given, else
    those recorded in a model directory's quantization_config.json, else the stored ones."""
    key = key.removesuffix(".trellis")
    path = Path(path)
    if path.is_dir() and in_features is None and out_features is None:
        in_features, out_features = stored_features(read_quantization_config(path), key)
    t = read_exl3_linear(open_tensors(path), key, in_features, out_features)
    w = reconstruct_weight(t.trellis, t.suh, t.svh, t.codebook)
    return w[: t.in_features, : t.out_features].contiguous()


def cli_dequant(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trellis dequant", description="write the dense fp16 weight of one linear")
    parser.add_argument("path", type=Path, help="model directory or .safetensors file")
    parser.add_argument("--key", required=True, help="the linear's key, e.g. model.layers.0.self_attn.q_proj")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors (tensor 'weight')")
    parser.add_argument("--in-features", type=int, help="real input size (default: the stored, padded size)")
    parser.add_argument("--out-features", type=int, help="real output size (default: the stored, padded size)")
    args = parser.parse_args(argv)
    try:
        w = dequant(args.path, args.key, args.in_features, args.out_features)
    except (Exl3FormatError, FileNotFoundError, ValueError) as exc:
        return _fail("dequant", exc)
    save_file({"weight": w}, str(args.output), metadata={"source": str(args.path), "key": args.key})
    print(f"wrote {args.output}: weight {tuple(w.shape)} float16 (in, out)")
    return 0


def cli_synth(argv: list[str]) -> int:
    from shared.exl3_synth import PRESETS, synth_model

    parser = argparse.ArgumentParser(prog="trellis synth", description="write an EXL3 model with random codes")
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("-b", "--bits", type=int, default=4, help="bits per weight of every layer (1..8)")
    parser.add_argument("--head-bits", type=int, default=6)
    parser.add_argument("--codebook", default="mul1", choices=["3inst", "mcg", "mul1"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", type=Path, help="copy tokenizer and template files from this model dir")
    parser.add_argument("--shard-mb", type=int, default=8192, help="largest shard size in MiB")
    args = parser.parse_args(argv)
    try:
        out = synth_model(
            args.preset,
            args.bits,
            args.output,
            codebook=args.codebook,
            head_bits=args.head_bits,
            seed=args.seed,
            tokenizer_dir=args.tokenizer_from,
            max_shard_mb=args.shard_mb,
        )
    except ValueError as exc:
        return _fail("synth", exc)
    print(f"wrote {out}")
    return 0
