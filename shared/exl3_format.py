"""EXL3 tensors of one quantized linear, and the quantization config of a model directory: read, validate, write.

The layout is ExLlamaV3's (docs EXL3_FORMAT.md): ``{key}.trellis`` int16 (in_pad/16, out_pad/16, 16*K),
``{key}.suh`` / ``{key}.svh`` float16 (in_pad,) / (out_pad,), an int32 scalar ``{key}.mcg`` or ``{key}.mul1`` naming
the codebook (neither: 3INST), optional ``{key}.bias``. Sizes are padded up to multiples of 128 (the Hadamard
block); ExLlamaV3's own models are always multiples already, so padding only shows on models Trellis writes.
Older ExLlamaV3 files store the sign vectors packed (``su`` / ``sv``, int16 bitfields); those are read too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from kernels.exl3_ref import CODEBOOKS, HAD_BLOCK, MCG_MULT, MUL1_MULT

QUANT_METHOD = "exl3"
CODEBOOK_MARKERS = {"mcg": MCG_MULT, "mul1": MUL1_MULT}  # marker tensor name -> the multiplier ExLlamaV3 stores
QUANT_CONFIG_FILE = "quantization_config.json"


class Exl3FormatError(ValueError):
    """A quantized layer or config that does not follow the EXL3 format; the message names the tensor."""


class TensorSource(Protocol):
    """What the reader needs from a tensor store (shared.model_dir.TensorSource; a plain dict also fits)."""

    def keys(self) -> Iterable[str]: ...

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> torch.Tensor | None: ...


def padded(n: int) -> int:
    """Features rounded up to the Hadamard block (128): the stored size of a layer with n features."""
    return -(-n // HAD_BLOCK) * HAD_BLOCK


@dataclass
class Exl3Tensors:
    """One quantized linear as stored: padded trellis and scales; in/out_features are the real (unpadded) sizes."""

    trellis: torch.Tensor  # int16 (in_pad/16, out_pad/16, 16*K)
    suh: torch.Tensor  # float16 (in_pad,)
    svh: torch.Tensor  # float16 (out_pad,)
    codebook: str  # "3inst" | "mcg" | "mul1"
    bias: torch.Tensor | None  # float16 (out_features,)
    in_features: int
    out_features: int

    @property
    def K(self) -> int:  # noqa: N802 - K is the format's own name for bits per weight
        return int(self.trellis.shape[-1]) // 16

    @property
    def in_padded(self) -> int:
        return int(self.trellis.shape[0]) * 16

    @property
    def out_padded(self) -> int:
        return int(self.trellis.shape[1]) * 16

    def to(self, device: torch.device | str) -> Exl3Tensors:
        bias = None if self.bias is None else self.bias.to(device)
        return Exl3Tensors(
            self.trellis.to(device),
            self.suh.to(device),
            self.svh.to(device),
            self.codebook,
            bias,
            self.in_features,
            self.out_features,
        )


def quantized_prefixes(names: Iterable[str]) -> list[str]:
    """Keys of every EXL3 linear among tensor names (those with a ``.trellis``), sorted."""
    return sorted(n[: -len(".trellis")] for n in names if n.endswith(".trellis"))


def _fetch(source: TensorSource, name: str) -> torch.Tensor | None:
    return source.get(name) if name in source else None


def _unpack_signs(bits: torch.Tensor, name: str) -> torch.Tensor:
    """Old-style packed sign vector: bit i of word w is element 16*w + i, set meaning -1."""
    if bits.dtype != torch.int16 or bits.dim() != 1:
        raise Exl3FormatError(f"{name}: packed signs must be a 1-D int16 tensor, got {bits.dtype} {tuple(bits.shape)}")
    words = bits.to(torch.int32) & 0xFFFF
    set_bits = (words.unsqueeze(-1) >> torch.arange(16, dtype=torch.int32)) & 1
    return (1 - 2 * set_bits).flatten().to(torch.float16)


def _scales(source: TensorSource, prefix: str, side: str, size: int) -> torch.Tensor:
    name = f"{prefix}.{side}h"
    t = _fetch(source, name)
    if t is None:
        packed = _fetch(source, f"{prefix}.{side}")
        if packed is None:
            raise Exl3FormatError(f"{name}: missing (neither {name} nor packed {prefix}.{side} is stored)")
        t = _unpack_signs(packed, f"{prefix}.{side}")
    elif t.dtype != torch.float16:
        raise Exl3FormatError(f"{name}: expected dtype float16, got {t.dtype}")
    if tuple(t.shape) != (size,):
        raise Exl3FormatError(f"{name}: expected shape ({size},) to match {prefix}.trellis, got {tuple(t.shape)}")
    return t


def _codebook(source: TensorSource, prefix: str) -> str:
    present = [m for m in CODEBOOK_MARKERS if f"{prefix}.{m}" in source]
    if len(present) > 1:
        raise Exl3FormatError(f"{prefix}: both codebook markers {prefix}.mcg and {prefix}.mul1 are stored; keep one")
    if not present:
        return "3inst"
    name = f"{prefix}.{present[0]}"
    marker = source.get(name)
    if marker is None or marker.dtype != torch.int32 or marker.numel() != 1:
        got = "nothing" if marker is None else f"{marker.dtype} {tuple(marker.shape)}"
        raise Exl3FormatError(f"{name}: codebook marker must be an int32 scalar, got {got}")
    return present[0]


def _features(given: int | None, stored: int, what: str, prefix: str) -> int:
    if given is None:
        return stored
    if given < 1 or padded(given) != stored:
        raise Exl3FormatError(
            f"{prefix}.trellis: {what} {given} is stored padded to {padded(given)}, but the trellis holds {stored}"
        )
    return given


def read_exl3_linear(
    source: TensorSource,
    prefix: str,
    in_features: int | None = None,
    out_features: int | None = None,
) -> Exl3Tensors:
    """Read and validate the EXL3 tensors stored under ``prefix``; features default to the stored (padded) sizes."""
    name = f"{prefix}.trellis"
    trellis = _fetch(source, name)
    if trellis is None:
        raise Exl3FormatError(f"{name}: missing; {prefix} is not an EXL3 linear")
    if trellis.dtype != torch.int16:
        raise Exl3FormatError(f"{name}: expected dtype int16, got {trellis.dtype}")
    if trellis.dim() != 3:
        raise Exl3FormatError(f"{name}: expected 3 dims (in/16, out/16, 16*K), got shape {tuple(trellis.shape)}")
    words = int(trellis.shape[-1])
    if words % 16 == 8:
        raise Exl3FormatError(f"{name}: half-integer bitrate K = {words / 16} (16*K + 8 words) is not supported")
    if words % 16 or not 1 <= words // 16 <= 8:
        raise Exl3FormatError(f"{name}: last dim {words} is not 16*K with K an integer in 1..8")
    in_pad, out_pad = int(trellis.shape[0]) * 16, int(trellis.shape[1]) * 16
    if in_pad % HAD_BLOCK or out_pad % HAD_BLOCK:
        raise Exl3FormatError(
            f"{name}: shape {tuple(trellis.shape)} gives ({in_pad}, {out_pad}); both must be multiples of {HAD_BLOCK}"
        )
    in_f = _features(in_features, in_pad, "in_features", prefix)
    out_f = _features(out_features, out_pad, "out_features", prefix)
    suh = _scales(source, prefix, "su", in_pad)
    svh = _scales(source, prefix, "sv", out_pad)
    codebook = _codebook(source, prefix)
    bias = _fetch(source, f"{prefix}.bias")
    if bias is not None:
        if not bias.dtype.is_floating_point:
            raise Exl3FormatError(f"{prefix}.bias: expected a float dtype, got {bias.dtype}")
        if tuple(bias.shape) not in ((out_f,), (out_pad,)):
            raise Exl3FormatError(f"{prefix}.bias: expected shape ({out_f},), got {tuple(bias.shape)}")
        bias = bias[:out_f].to(torch.float16)
    return Exl3Tensors(trellis, suh, svh, codebook, bias, in_f, out_f)


def exl3_tensors_to_dict(prefix: str, t: Exl3Tensors) -> dict[str, torch.Tensor]:
    """The tensors to store for one linear, named as ExLlamaV3 names them (markers hold the multiplier)."""
    if t.codebook not in CODEBOOKS:
        raise Exl3FormatError(f"{prefix}: unknown codebook {t.codebook!r}; expected one of {', '.join(CODEBOOKS)}")
    out = {
        f"{prefix}.trellis": t.trellis.contiguous(),
        f"{prefix}.suh": t.suh.to(torch.float16).contiguous(),
        f"{prefix}.svh": t.svh.to(torch.float16).contiguous(),
    }
    if t.codebook in CODEBOOK_MARKERS:
        # ExLlamaV3 stores the uint32 multiplier reinterpreted as int32; the value is never read, only presence
        mult = CODEBOOK_MARKERS[t.codebook]
        out[f"{prefix}.{t.codebook}"] = torch.tensor(mult - (1 << 32) if mult >= 1 << 31 else mult, dtype=torch.int32)
    if t.bias is not None:
        out[f"{prefix}.bias"] = t.bias.to(torch.float16).contiguous()
    return out


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise Exl3FormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise Exl3FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_quantization_config(model_dir: str | Path) -> dict | None:
    """The model's EXL3 quantization_config (config.json's, plus quantization_config.json's ``tensor_storage``).

    None for a model that is not quantized; an error for a quantization method other than exl3.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise Exl3FormatError(f"{config_path}: missing; {model_dir} is not a model directory")
    config = _load_json(config_path)
    qcfg = config.get("quantization_config")
    if qcfg is None and isinstance(config.get("text_config"), dict):
        qcfg = config["text_config"].get("quantization_config")
    extra_path = model_dir / QUANT_CONFIG_FILE
    extra = _load_json(extra_path) if extra_path.is_file() else None
    if qcfg is None:
        qcfg = extra
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise Exl3FormatError(f"{config_path}: quantization_config must be an object, got {type(qcfg).__name__}")
    method = qcfg.get("quant_method")
    if method != QUANT_METHOD:
        raise Exl3FormatError(f"{config_path}: quantization_config.quant_method is {method!r}, expected 'exl3'")
    merged = dict(qcfg)
    if extra is not None and "tensor_storage" in extra:
        merged["tensor_storage"] = extra["tensor_storage"]
    return merged


def tensor_storage(
    tensors: dict[str, torch.Tensor], features: dict[str, tuple[int, int]] | None = None
) -> dict[str, dict]:
    """quantization_config.json's ``tensor_storage``: per leaf module, its stored tensors, and for EXL3 linears
    the format, bits per weight and codebook multiplier (the same fields ExLlamaV3 writes).

    features: EXL3 key -> real (in_features, out_features). Trellis records them (``in_features`` /
    ``out_features``) for layers stored padded, the only place the unpadded sizes are kept; ExLlamaV3 ignores them.
    """
    modules: dict[str, dict] = {}
    for name, t in tensors.items():
        module = name.rsplit(".", 1)[0]
        entry = modules.setdefault(module, {"stored_tensors": {}})
        entry["stored_tensors"][name] = {
            "shape": list(t.shape),
            "n_bytes": t.numel() * t.element_size(),
            "dtype": str(t.dtype),
        }
    for module, entry in modules.items():
        trellis = tensors.get(f"{module}.trellis")
        if trellis is None:
            continue
        entry["quant_format"] = QUANT_METHOD
        entry["bits_per_weight"] = int(trellis.shape[-1]) // 16
        for marker, mult in CODEBOOK_MARKERS.items():
            if f"{module}.{marker}" in tensors:
                entry[f"{marker}_multiplier"] = mult
        in_f, out_f = (features or {}).get(module, (None, None))
        if in_f is not None and (in_f, out_f) != (int(trellis.shape[0]) * 16, int(trellis.shape[1]) * 16):
            entry["in_features"], entry["out_features"] = in_f, out_f
    return modules


def stored_features(qcfg: dict | None, prefix: str) -> tuple[int | None, int | None]:
    """The real (in_features, out_features) recorded for a padded EXL3 layer, else (None, None)."""
    entry = ((qcfg or {}).get("tensor_storage") or {}).get(prefix) or {}
    return entry.get("in_features"), entry.get("out_features")
