"""Convert a model of any supported family (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE) to EXL3,
block by block, resumably.

For each decoder block: run the calibration rows through it with its original weights, capturing the Hessian of
every linear's input (MoE experts each see every row: quant/moe_capture.py); quantize its linears (attention, MLP,
every expert and shared expert; bits per the allocation plan, seeds derived from the tensor names); save the block's
tensors to the work dir (norms, and the MoE router and shared-expert gate unquantized); run the rows through the
*quantized* block, with the model's real routing, to make the next block's inputs. Then the output head, then the
output directory, assembled beside its final name and renamed into place last, so a directory under that name is
always complete.

The work dir is plain files anyone can ``ls``:
    args.json                the arguments that shape the result (a resume must repeat them)
    plan.json                the bits of every linear, fixed before the first block (measured: quant/sensitivity.py)
    source/                  the imported model, when the input is a GGUF file
    blocks/block-NNNN.safetensors   each finished block (quantized linears, norms, router; stats in the metadata)
    checkpoint.pt            next block and the calibration state (hidden states), written atomically
    head.safetensors         the finished output head
    finished.json            written once the output directory is in place

Every file is written to a temporary name and renamed, so ``kill -9`` at any moment leaves either the old or the
new file. Blocks are a pure function of the checkpointed state and the arguments, so a resumed run recomputes
exactly what an uninterrupted one would have: the output files are byte-identical.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from converter_worker.quant.bits import (
    UNQUANTIZED_HEAD_BITS,
    LinearShape,
    allocate_bits,
    allocate_bits_by_sensitivity,
    average_bits,
    check_bits,
    check_head_bits,
)
from converter_worker.quant.block import CalibrationBlock, build_calibration_block
from converter_worker.quant.calibration import calibration_rows
from converter_worker.quant.hessian import HessianAccumulator
from converter_worker.quant.layout import norm_tensors, quantized_linears, routing_linears
from converter_worker.quant.ldlq import TileQuantizer
from converter_worker.quant.linear import QUANTIZER_REVISION, LinearSpec, quantize_linears
from converter_worker.quant.sensitivity import CODE_ERROR, SENSITIVITY_COLS, SENSITIVITY_ROWS, measure_sensitivity
from converter_worker.quant.viterbi import quantize_tiles
from inference_worker.layers import DenseLinear, Linear, RMSNorm, RotaryEmbedding
from inference_worker.models import ARCHITECTURES, find_spec
from inference_worker.models.decoder import DecoderConfig
from kernels.exl3_ref import CODEBOOKS, reconstruct_weight
from shared.calibration import calibration_text, text_digest
from shared.exl3_format import QUANT_CONFIG_FILE, QUANT_METHOD, exl3_tensors_to_dict, read_exl3_linear, tensor_storage
from shared.exl3_synth import WRITER_VERSION
from shared.model_dir import CONFIG_FILE, WEIGHTS_INDEX_FILE, TensorSource, load_config
from shared.wire import CONVERSION_ALLOCATIONS

ARGS_FILE = "args.json"
PLAN_FILE = "plan.json"
CHECKPOINT_FILE = "checkpoint.pt"
HEAD_FILE = "head.safetensors"
FINISHED_FILE = "finished.json"
BLOCKS_DIR = "blocks"
SOURCE_DIR = "source"
# fixed once started; the calibration text by its digest (the same words, wherever the file lives)
RESULT_ARGS = (
    "input",
    "bits",
    "head_bits",
    "codebook",
    "cal_rows",
    "cal_cols",
    "seed",
    "allocation",
    "cal_text_sha256",
    "quantizer_revision",
)
_NOT_COPIED = {CONFIG_FILE, WEIGHTS_INDEX_FILE, QUANT_CONFIG_FILE}
_WEIGHT_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt"}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


class ConversionError(Exception):
    """A conversion that cannot go on; the message says why and what to do. The work dir stays resumable."""


class ConversionCancelled(ConversionError):
    """The caller's stop() asked to stop between blocks; the work dir stays resumable."""


@dataclass(frozen=True)
class ConvertOptions:
    input: Path
    output: Path
    work_dir: Path
    bits: float
    head_bits: int = 6
    codebook: str = "mul1"
    cal_rows: int = 250
    cal_cols: int = 2048
    seed: int = 0
    # how the bits are spread over the linears: "plain" promotes whole groups in a fixed order (quant/bits.py);
    # "measured" spends them where each linear's measured damage is largest (quant/sensitivity.py; a few per cent
    # lower KL on the CPU proxy, not yet measured with the trellis search on a GPU: BENCHMARKS.md)
    allocation: str = CONVERSION_ALLOCATIONS[0]
    cal_text: Path | None = None  # a .txt file or a folder of them; None: the text that ships with Trellis
    device: str = "auto"
    checkpoint_seconds: float = 60.0  # least time between checkpoints (the last block always checkpoints)
    max_shard_bytes: int = 4 * 1024**3

    def result_args(self, cal_text_sha256: str) -> dict[str, Any]:
        values = asdict(self)
        values["input"] = str(Path(self.input).resolve())
        values["cal_text_sha256"] = cal_text_sha256
        values["quantizer_revision"] = QUANTIZER_REVISION
        return {name: values[name] for name in RESULT_ARGS}


@dataclass
class Progress:
    """One progress report: ``done`` of ``total`` steps (blocks, then the head, then writing the output)."""

    stage: str  # "block" | "head" | "write" | "done"
    done: int
    total: int
    elapsed: float
    eta: float | None
    message: str
    # for a finished block: its index, seconds, and per-linear bits and proxy error (what GET /v1/conversions shows)
    figures: dict[str, Any] | None = None


@dataclass
class TensorStats:
    name: str
    bits: int
    proxy_error: float | None  # None for tensors kept unquantized
    seconds: float  # the time of the step that produced it (a block's linears share one)


@dataclass
class ConvertResult:
    output: Path
    bits: float
    tensors: list[TensorStats] = field(default_factory=list)
    seconds: float = 0.0


# --- small file helpers ------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over ``path``; a full disk becomes a ConversionError that says how to go on."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ConversionError(
                f"no space left on the device while writing {path}; free some space and resume with -r "
                f"(the work dir keeps every finished block)"
            ) from exc
        raise ConversionError(f"cannot write {path}: {exc}") from exc


def _write_json(path: Path, value: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    meta = {"format": "pt", **(metadata or {})}
    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), meta))


def _stored_dtype(t: torch.Tensor) -> torch.Tensor:
    """Unquantized tensors are stored in float16 unless the source already uses a 16-bit float type."""
    return t if t.dtype in (torch.float16, torch.bfloat16) else t.to(torch.float16)


def _weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape, from the safetensors headers alone (no weight is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


def linear_seed(seed: int, name: str) -> int:
    """Per-tensor seed: the same name and run seed give the same random signs, whatever ran before."""
    return zlib.crc32(f"{seed}:{name}".encode())


def tile_quantizer(device: torch.device) -> TileQuantizer:
    """The Triton trellis search on CUDA (11-12K tiles/s on the H200 against the torch reference's 3.2-3.6K, warm),
    else the torch reference; ``TRELLIS_VITERBI=torch`` forces the reference on CUDA too."""
    if device.type == "cuda" and os.environ.get("TRELLIS_VITERBI", "triton") == "triton":
        from kernels.viterbi import quantize_tiles_triton

        return quantize_tiles_triton
    return quantize_tiles


# --- the conversion ----------------------------------------------------------------------------------------------


class Converter:
    """One conversion; ``run()`` does (or resumes) it. See the module docstring for the work-dir layout."""

    def __init__(
        self,
        opts: ConvertOptions,
        resume: bool = False,
        progress: Callable[[Progress], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        check_bits(opts.bits)
        check_head_bits(opts.head_bits)
        if opts.codebook not in CODEBOOKS:
            raise ConversionError(f"unknown codebook {opts.codebook!r}; expected one of {', '.join(CODEBOOKS)}")
        if opts.allocation not in CONVERSION_ALLOCATIONS:
            choices = " or ".join(CONVERSION_ALLOCATIONS)
            raise ConversionError(f"unknown bit allocation {opts.allocation!r}; expected {choices}")
        if opts.cal_rows < 1 or opts.cal_cols < 2:
            raise ConversionError(f"calibration needs at least 1 row of 2 tokens, got {opts.cal_rows}x{opts.cal_cols}")
        try:
            self.calibration_text = calibration_text(opts.cal_text)  # read once: hashed for resumes, then tokenized
        except (OSError, ValueError) as exc:
            raise ConversionError(f"cannot read the calibration text: {exc}") from exc
        self.opts, self.resume = opts, resume
        self.work = Path(opts.work_dir)
        self.progress = progress or (lambda _event: None)
        self.stop = stop or (lambda: False)
        self.device = self._pick_device(opts.device)
        self.started = time.monotonic()

    @staticmethod
    def _pick_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConversionError(f"device {name} was asked for but CUDA is not available here")
        return device

    # work dir and source ------------------------------------------------------------------------------------------

    def _prepare_work_dir(self) -> None:
        args_path = self.work / ARGS_FILE
        wanted = self.opts.result_args(text_digest(self.calibration_text))
        if args_path.is_file():
            if not self.resume:
                raise ConversionError(
                    f"{self.work} already holds a conversion; pass -r to resume it, or use an empty work dir"
                )
            saved = json.loads(args_path.read_text())
            for name in RESULT_ARGS:
                if saved.get(name) == wanted[name]:
                    continue
                if name == "cal_text_sha256":
                    raise ConversionError(
                        f"cannot resume: the calibration text differs from the one the conversion in {self.work} "
                        "started with, and changing it would change the result"
                    )
                if name == "quantizer_revision":
                    raise ConversionError(
                        f"cannot resume: the conversion in {self.work} was started by another version of the "
                        f"quantizer (revision {saved.get(name)!r}, this one is {wanted[name]!r}); start it again "
                        "in an empty work dir"
                    )
                raise ConversionError(
                    f"cannot resume with {name}={wanted[name]!r}: the conversion in {self.work} was started "
                    f"with {name}={saved.get(name)!r}, and changing it would change the result"
                )
            return
        if self.work.exists() and any(p.name != SOURCE_DIR for p in self.work.iterdir()):
            raise ConversionError(f"work dir {self.work} is not empty and holds no conversion ({ARGS_FILE} is missing)")
        try:
            (self.work / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConversionError(f"cannot create the work dir {self.work}: {exc}") from exc
        _write_json(args_path, wanted)

    def _source_dir(self) -> Path:
        src = Path(self.opts.input)
        if src.is_dir():
            return src
        if src.is_file() and src.suffix.lower() == ".gguf":
            imported = self.work / SOURCE_DIR
            if not (imported / CONFIG_FILE).is_file():
                from shared.gguf_import import import_gguf

                self.progress(Progress("import", 0, 1, self._elapsed(), None, f"importing {src.name}"))
                try:
                    import_gguf(src, imported)
                except (OSError, ValueError) as exc:
                    raise ConversionError(f"cannot import {src}: {exc}") from exc
            return imported
        if not src.exists():
            raise ConversionError(f"input {src} does not exist")
        raise ConversionError(f"input {src} is neither a model directory nor a .gguf file")

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    # model description ----------------------------------------------------------------------------------------------

    def _load_model_description(self, source_dir: Path) -> None:
        try:
            raw = load_config(source_dir)
        except (OSError, ValueError) as exc:
            raise ConversionError(str(exc)) from exc
        try:
            self.spec = find_spec(raw, source_dir)
        except ValueError:
            names = raw.get("architectures") or [f"model_type {raw.get('model_type')!r}"]
            declared = " / ".join(str(n) for n in (names if isinstance(names, list) else [names]))
            raise ConversionError(
                f"{source_dir} holds a {declared} model, which the converter cannot convert "
                f"(supported: {', '.join(ARCHITECTURES)})"
            ) from None
        if raw.get("quantization_config"):
            raise ConversionError(f"{source_dir} is already quantized; convert from the original weights")
        try:
            self.config = DecoderConfig.from_hf(raw, self.spec)
        except ValueError as exc:
            raise ConversionError(f"{source_dir}/config.json: {exc}") from exc
        self.raw_config = raw
        self.source_dir = source_dir
        try:
            self.source = TensorSource(source_dir)
        except Exception as exc:  # safetensors raises its own error type on a damaged header
            raise ConversionError(f"cannot read the weights of {source_dir}: {exc}") from exc
        stored = _weight_shapes(source_dir)
        shapes = []
        for layer in range(self.config.num_hidden_layers):
            for q in quantized_linears(self.spec, self.config, layer):
                weight = f"{q.name}.weight"
                if weight not in stored or len(stored[weight]) != 2:
                    raise ConversionError(f"{source_dir} lacks the 2-D tensor {weight}")
                out_features, in_features = stored[weight]
                shapes.append(LinearShape(q.name, layer, q.bit_group, in_features, out_features))
        self.shapes = shapes
        self.features = {s.name: (s.in_features, s.out_features) for s in shapes}
        c = self.config
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling).to(self.device)

    def _measured_plan(self) -> dict[str, int]:
        """Bits weighed by each linear's measured damage per unit of code error, over the first calibration rows."""
        rows = self._calibration_rows()[:SENSITIVITY_ROWS, :SENSITIVITY_COLS]
        state = self._tensor("model.embed_tokens.weight").float()[rows].to(self.device)
        norm = self._rms(self._tensor("model.norm.weight"))
        weight = self._head_weight().to(self.device, torch.float32)
        bias = self._optional("lm_head.bias")
        bias = None if bias is None else bias.to(self.device, torch.float32)

        def head(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(norm(x), weight, bias)

        layers = self.config.num_hidden_layers
        damage = measure_sensitivity(state, layers, self._original_block, head, self.opts.seed)
        return allocate_bits_by_sensitivity(self.shapes, self.opts.bits, layers, damage, CODE_ERROR)

    def _bit_plan(self) -> dict[str, int]:
        """The bits of every linear: made once, before the first block, and kept in the work dir for resumes."""
        path = self.work / PLAN_FILE
        if path.is_file():
            return {name: int(k) for name, k in json.loads(path.read_text()).items()}
        plan = self._make_plan()
        _write_json(path, plan)
        return plan

    def _make_plan(self) -> dict[str, int]:
        if self.opts.allocation == "measured":
            return self._measured_plan()
        return allocate_bits(self.shapes, self.opts.bits, self.config.num_hidden_layers)

    def preview_plan(self) -> dict[str, int]:
        """The bits this conversion gives every linear, made without touching the work dir (benches compare plans)."""
        self._load_model_description(self._source_dir())
        return self._make_plan()

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self.source.get(name)
        except KeyError as exc:
            raise ConversionError(f"{self.source_dir} lacks the tensor {name}") from exc
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise ConversionError(f"cannot read {name} from {self.source_dir}: {exc}") from exc

    def _optional(self, name: str) -> torch.Tensor | None:
        return self._tensor(name) if name in self.source else None

    # calibration state ----------------------------------------------------------------------------------------------

    def _calibration_rows(self) -> torch.Tensor:
        path = self.source_dir / "tokenizer.json"
        if not path.is_file():
            raise ConversionError(f"{self.source_dir} has no tokenizer.json, which calibration needs")
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
        opts = self.opts
        return calibration_rows(
            tokenizer, opts.cal_rows, opts.cal_cols, self.config.vocab_size, opts.seed, self.calibration_text
        )

    def _initial_state(self) -> torch.Tensor:
        embed = self._tensor("model.embed_tokens.weight").float()
        return embed[self._calibration_rows()].to(self.device)

    def _load_checkpoint(self) -> tuple[int, torch.Tensor] | None:
        path = self.work / CHECKPOINT_FILE
        if not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        return int(data["next_block"]), data["state"].to(self.device)

    def _save_checkpoint(self, next_block: int, state: torch.Tensor) -> None:
        payload = {"next_block": next_block, "state": state.cpu()}
        _atomic_write(self.work / CHECKPOINT_FILE, lambda tmp: torch.save(payload, tmp))

    # one block --------------------------------------------------------------------------------------------------------

    def _block_path(self, layer: int) -> Path:
        return self.work / BLOCKS_DIR / f"block-{layer:04d}.safetensors"

    def _rms(self, weight: torch.Tensor) -> RMSNorm:
        return RMSNorm(weight.to(self.device, torch.float32), self.config.rms_norm_eps)

    def _kept_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The block's unquantized tensors: norms in 16 bits, the MoE router and shared-expert gate as the source
        stores them (a rounded router could pick other experts)."""
        kept = {name: _stored_dtype(self._tensor(name)) for name in norm_tensors(self.spec, layer)}
        for prefix in routing_linears(self.spec, self.config, layer):
            kept[f"{prefix}.weight"] = self._tensor(f"{prefix}.weight")
            bias = self._optional(f"{prefix}.bias")
            if bias is not None:
                kept[f"{prefix}.bias"] = bias
        return kept

    def _calibration_block(
        self, layer: int, tensor: Callable[[str], torch.Tensor], linear: Callable[[str], Linear]
    ) -> CalibrationBlock:
        def on_device(name: str) -> torch.Tensor:
            return tensor(name).to(self.device, torch.float32)

        return build_calibration_block(self.config, self.spec, layer, self.rotary, on_device, linear)

    def _original_block(self, layer: int) -> CalibrationBlock:
        def dense(prefix: str) -> Linear:
            bias = self._optional(f"{prefix}.bias")
            weight = self._tensor(f"{prefix}.weight").to(self.device, torch.float32)
            return DenseLinear(weight, None if bias is None else bias.to(self.device, torch.float32))

        return self._calibration_block(layer, self._tensor, dense)

    def _quantize_block(self, layer: int, state: torch.Tensor) -> None:
        t0 = time.monotonic()
        hessians = self._original_block(layer).capture_hessians(state)
        specs = []
        for q in quantized_linears(self.spec, self.config, layer):
            weight, bias = self._tensor(f"{q.name}.weight"), self._optional(f"{q.name}.bias")
            seed = linear_seed(self.opts.seed, q.name)
            specs.append(LinearSpec(q.name, weight, self.plan[q.name], seed, hessians[q.name], bias))
        results = quantize_linears(specs, self.opts.codebook, self.device, tile_quantizer(self.device))
        tensors = self._kept_tensors(layer)
        stats = {}
        for r in results:
            tensors.update(exl3_tensors_to_dict(r.name, r.tensors))
            stats[r.name] = {"bits": r.tensors.K, "proxy_error": r.proxy_error}
        seconds = time.monotonic() - t0
        meta = {"stats": json.dumps(stats), "seconds": f"{seconds:.3f}"}
        _save_tensors(self._block_path(layer), tensors, meta)

    def _block_figures(self, layer: int) -> dict[str, Any]:
        with safe_open(str(self._block_path(layer)), framework="pt") as f:
            meta = f.metadata() or {}
        stats = json.loads(meta.get("stats", "{}"))
        errors = [s["proxy_error"] for s in stats.values() if s.get("proxy_error") is not None]
        return {
            "block": layer,
            "seconds": float(meta.get("seconds", "0")),
            "max_proxy_error": max(errors) if errors else None,
            "tensors": {name.removeprefix(f"model.layers.{layer}."): s for name, s in stats.items()},
        }

    def _quantized_block(self, layer: int) -> CalibrationBlock:
        tensors = load_file(str(self._block_path(layer)))

        def decoded(prefix: str) -> Linear:
            if f"{prefix}.trellis" not in tensors:  # the shared-expert gate, kept dense
                bias = tensors.get(f"{prefix}.bias")
                weight = tensors[f"{prefix}.weight"].to(self.device, torch.float32)
                return DenseLinear(weight, None if bias is None else bias.to(self.device, torch.float32))
            t = read_exl3_linear(tensors, prefix, *self.features[prefix]).to(self.device)
            # the bit-exact decode, in float32 (the serving kernels may round activations to 16 bits)
            w = reconstruct_weight(t.trellis, t.suh, t.svh, t.codebook)[: t.in_features, : t.out_features]
            bias = None if t.bias is None else t.bias.float()
            return DenseLinear(w.t().float().contiguous(), bias)

        return self._calibration_block(layer, tensors.__getitem__, decoded)

    # head -------------------------------------------------------------------------------------------------------------

    def _head_weight(self) -> torch.Tensor:
        if "lm_head.weight" in self.source:
            return self._tensor("lm_head.weight")
        if self.config.tie_word_embeddings:
            return self._tensor("model.embed_tokens.weight")
        raise ConversionError(f"{self.source_dir} has no lm_head.weight and its config does not tie embeddings")

    def _quantize_head(self, state: torch.Tensor) -> None:
        t0 = time.monotonic()
        weight = self._head_weight()
        if self.opts.head_bits == UNQUANTIZED_HEAD_BITS:
            _save_tensors(self.work / HEAD_FILE, {"lm_head.weight": _stored_dtype(weight)}, {"seconds": "0"})
            return
        norm = self._rms(self._tensor("model.norm.weight"))
        acc = HessianAccumulator(self.config.hidden_size, self.device)
        for part in state.split(max(1, 8192 // state.shape[1])):
            acc.add(norm(part))
        bias = self._optional("lm_head.bias")
        spec = LinearSpec(
            "lm_head", weight, self.opts.head_bits, linear_seed(self.opts.seed, "lm_head"), acc.hessian(), bias
        )
        (result,) = quantize_linears([spec], self.opts.codebook, self.device, tile_quantizer(self.device))
        stats = {"lm_head": {"bits": result.tensors.K, "proxy_error": result.proxy_error}}
        meta = {"stats": json.dumps(stats), "seconds": f"{time.monotonic() - t0:.3f}"}
        _save_tensors(self.work / HEAD_FILE, exl3_tensors_to_dict("lm_head", result.tensors), meta)

    # output -----------------------------------------------------------------------------------------------------------

    def _units(self) -> list[tuple[Callable[[], dict[str, torch.Tensor]], int]]:
        """The output's tensors in model order, as (loader, bytes) units that are never split across shards."""

        def from_file(path: Path) -> tuple[Callable[[], dict[str, torch.Tensor]], int]:
            with safe_open(str(path), framework="pt") as f:
                nbytes = 0
                for k in f.keys():
                    sl = f.get_slice(k)
                    nbytes += _DTYPE_BYTES[sl.get_dtype()] * int(torch.tensor(sl.get_shape()).prod().item())
            return (lambda: load_file(str(path))), nbytes

        def from_source(name: str) -> tuple[Callable[[], dict[str, torch.Tensor]], int]:
            t = _stored_dtype(self._tensor(name))
            return (lambda: {name: t}), t.numel() * t.element_size()

        units = [from_source("model.embed_tokens.weight")]
        units += [from_file(self._block_path(i)) for i in range(self.config.num_hidden_layers)]
        units.append(from_source("model.norm.weight"))
        units.append(from_file(self.work / HEAD_FILE))
        return units

    def _write_output(self) -> None:
        out = Path(self.opts.output)
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)  # an earlier run's unfinished attempt
        try:
            staging.mkdir(parents=True)
            self._write_model_files(staging)
            # recorded before the rename: a run killed in between finds the output in place on resume
            _write_json(self.work / FINISHED_FILE, {"output": str(out.resolve())})
            os.replace(staging, out)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise ConversionError(
                    f"no space left on the device while writing {out}; free some space and resume with -r"
                ) from exc
            raise ConversionError(f"cannot write the output {out}: {exc}") from exc

    def _write_model_files(self, staging: Path) -> None:
        units = self._units()
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, nbytes) in enumerate(units):
            if shards[-1] and size + nbytes > self.opts.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        weight_map: dict[str, str] = {}
        meta: dict[str, torch.Tensor] = {}
        for s, members in enumerate(shards):
            filename = "model.safetensors" if len(shards) == 1 else f"model-{s + 1:05}-of-{len(shards):05}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for i in members:
                tensors.update(units[i][0]())
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / filename), {"format": "pt"})
            os.chmod(staging / filename, 0o644)  # safetensors creates files private to their owner
            weight_map.update(dict.fromkeys(tensors, filename))
            meta.update({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()})
            del tensors
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in meta.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

        features = dict(self.features)
        features["lm_head"] = (self.config.hidden_size, self.config.vocab_size)
        qcfg = {
            "quant_method": QUANT_METHOD,
            "version": WRITER_VERSION,
            "bits": round(average_bits(self.shapes, self.plan), 2),
            "head_bits": self.opts.head_bits,
            "calibration": {"rows": self.opts.cal_rows, "cols": self.opts.cal_cols},
            "out_scales": "always",
            "codebook": self.opts.codebook,
        }
        embed_dtype = meta["model.embed_tokens.weight"].dtype
        config = dict(self.raw_config)
        config["tie_word_embeddings"] = False  # the head is always stored as its own lm_head
        config["torch_dtype"] = "bfloat16" if embed_dtype == torch.bfloat16 else "float16"
        config["quantization_config"] = qcfg
        (staging / QUANT_CONFIG_FILE).write_text(
            json.dumps(qcfg | {"tensor_storage": tensor_storage(meta, features)}, indent=2) + "\n"
        )
        for f in sorted(self.source_dir.iterdir()):
            if f.is_file() and f.name not in _NOT_COPIED and f.suffix not in _WEIGHT_SUFFIXES:
                shutil.copyfile(f, staging / f.name)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")  # last: the directory is complete

    # summary ----------------------------------------------------------------------------------------------------------

    def _summary(self) -> ConvertResult:
        rows: list[TensorStats] = []
        files = [self._block_path(i) for i in range(self.config.num_hidden_layers)] + [self.work / HEAD_FILE]
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            seconds = float(meta.get("seconds", "0"))
            for name, s in json.loads(meta.get("stats", "{}")).items():
                rows.append(TensorStats(name, s["bits"], s["proxy_error"], seconds))
            if "stats" not in meta:
                rows.append(TensorStats("lm_head", UNQUANTIZED_HEAD_BITS, None, seconds))
        bits = round(average_bits(self.shapes, self.plan), 2)
        return ConvertResult(Path(self.opts.output), bits, rows, self._elapsed())

    # driver -------------------------------------------------------------------------------------------------------

    def run(self) -> ConvertResult:
        """Convert (or resume); returns the per-tensor summary. Raises ConversionError with a clear message."""
        self._prepare_work_dir()
        out = Path(self.opts.output)
        finished = (self.work / FINISHED_FILE).is_file()
        if out.exists() and not (finished and self.resume):
            raise ConversionError(f"output {out} already exists; remove it or choose another output directory")
        self._load_model_description(self._source_dir())
        self.plan = self._bit_plan()
        if finished and out.exists():
            return self._summary()
        c = self.config
        total = c.num_hidden_layers + 2  # blocks, head, output
        checkpoint = self._load_checkpoint()
        next_block, state = checkpoint if checkpoint is not None else (0, self._initial_state())
        last_checkpoint = time.monotonic()
        run_start, run_blocks = time.monotonic(), 0
        for layer in range(next_block, c.num_hidden_layers):
            if self.stop():
                raise ConversionCancelled(f"stopped before block {layer}; resume with -r")
            if not self._block_path(layer).is_file():
                self._quantize_block(layer, state)
            state = self._quantized_block(layer).forward(state)
            run_blocks += 1
            if time.monotonic() - last_checkpoint >= self.opts.checkpoint_seconds or layer == c.num_hidden_layers - 1:
                self._save_checkpoint(layer + 1, state)
                last_checkpoint = time.monotonic()
            per_block = (time.monotonic() - run_start) / run_blocks
            eta = per_block * (c.num_hidden_layers - layer)  # the blocks left, and the head at about one block
            message = f"block {layer + 1}/{c.num_hidden_layers}"
            figures = self._block_figures(layer)
            self.progress(Progress("block", layer + 1, total, self._elapsed(), eta, message, figures))
        if self.stop():
            raise ConversionCancelled("stopped before the output head; resume with -r")
        if not (self.work / HEAD_FILE).is_file():
            self._quantize_head(state)
        self.progress(Progress("head", total - 1, total, self._elapsed(), None, "output head"))
        self._write_output()
        self.progress(Progress("done", total, total, self._elapsed(), 0.0, f"wrote {out}"))
        self.source.close()
        return self._summary()


def convert(
    opts: ConvertOptions,
    resume: bool = False,
    progress: Callable[[Progress], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> ConvertResult:
    """Convert ``opts.input`` to an EXL3 model at ``opts.output`` (see ``Converter``)."""
    return Converter(opts, resume, progress, stop).run()


def format_summary(result: ConvertResult) -> str:
    """The per-tensor table printed at the end of a conversion."""
    lines = [f"{'tensor':<44} {'bits':>4} {'proxy err':>10} {'time s':>8}"]
    for r in result.tensors:
        err = "-" if r.proxy_error is None else f"{r.proxy_error:.5f}"
        lines.append(f"{r.name:<44} {r.bits:>4} {err:>10} {r.seconds:>8.1f}")
    lines.append(f"average {result.bits:.2f} bits per weight (head excluded); {result.seconds:.1f} s")
    return "\n".join(lines)
