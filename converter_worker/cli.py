"""``trellis convert`` and ``trellis eval``: argument parsing, a progress bar, and the summary table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from converter_worker.convert import (
    ConversionCancelled,
    ConversionError,
    ConvertOptions,
    Progress,
    format_summary,
)
from kernels.exl3_ref import CODEBOOKS
from shared.wire import CONVERSION_ALLOCATIONS

BAR_WIDTH = 30


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02}:{rest % 60:02}" if hours else f"{rest // 60}:{rest % 60:02}"


class ProgressBar:
    """One line per update, redrawn in place on a terminal: bar, step, elapsed and estimated time left."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.inline = stream.isatty()

    def __call__(self, p: Progress) -> None:
        filled = BAR_WIDTH * p.done // max(p.total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"[{bar}] {p.message:<16} elapsed {_clock(p.elapsed)}  left {_clock(p.eta)}"
        end = "\n" if not self.inline or p.stage == "done" else ""
        self.stream.write(("\r" if self.inline else "") + line + end)
        self.stream.flush()


def convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trellis convert",
        description="Quantize a Llama-architecture model (Hugging Face directory or GGUF file) to EXL3.",
    )
    parser.add_argument("-i", "--input", required=True, type=Path, help="source model directory or .gguf file")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output model directory (must not exist)")
    parser.add_argument("-w", "--work-dir", required=True, type=Path, help="work directory (resumable state)")
    parser.add_argument("-b", "--bits", required=True, type=float, help="target bits per weight, 1..8 (e.g. 4.25)")
    parser.add_argument("-hb", "--head-bits", type=int, default=6, help="output head bits, 1..8, or 16 to keep it")
    parser.add_argument("-cb", "--codebook", choices=CODEBOOKS, default="mul1", help="trellis codebook")
    parser.add_argument(
        "--allocation",
        choices=CONVERSION_ALLOCATIONS,
        default=CONVERSION_ALLOCATIONS[0],
        help="spread the bits in the plain fixed order, or by each linear's measured sensitivity (experimental)",
    )
    parser.add_argument("--cal-rows", type=int, default=250, help="calibration rows")
    parser.add_argument("--cal-cols", type=int, default=2048, help="tokens per calibration row")
    parser.add_argument(
        "--cal-text",
        type=Path,
        help="calibration text: a .txt file or a folder of them (default: the public-domain text Trellis ships)",
    )
    parser.add_argument("-r", "--resume", action="store_true", help="resume the conversion in the work directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for signs, sample tiles and random rows")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--checkpoint-seconds", type=float, default=60.0, help="least time between checkpoints")
    return parser


def cli_convert(argv: list[str]) -> int:
    """``trellis convert -i IN -o OUT -w WORK -b BITS [...]``; 0 on success, 1 on a clear error, 130 if stopped."""
    args = convert_parser().parse_args(argv)
    from converter_worker.convert import convert

    opts = ConvertOptions(
        input=args.input,
        output=args.output,
        work_dir=args.work_dir,
        bits=args.bits,
        head_bits=args.head_bits,
        codebook=args.codebook,
        cal_rows=args.cal_rows,
        cal_cols=args.cal_cols,
        seed=args.seed,
        allocation=args.allocation,
        cal_text=args.cal_text,
        device=args.device,
        checkpoint_seconds=args.checkpoint_seconds,
    )
    try:
        result = convert(opts, resume=args.resume, progress=ProgressBar())
    except ConversionCancelled as exc:
        print(f"trellis convert: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ntrellis convert: interrupted; resume with -r -w {args.work_dir}", file=sys.stderr)
        return 130
    except (ConversionError, ValueError) as exc:
        print(f"trellis convert: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(f"wrote {result.output}")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trellis eval",
        description="Perplexity of a model on a text, and KL divergence / top-1 agreement against a reference.",
    )
    parser.add_argument("--model", required=True, type=Path, help="model directory to evaluate")
    parser.add_argument("--reference", type=Path, help="reference model directory (e.g. the unquantized original)")
    parser.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    parser.add_argument("--windows", type=int, default=16, help="number of windows scored")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--kv-bits", default="fp16", help="KV cache of the evaluated model, as TRELLIS_KV_BITS: fp16 or K,V (e.g. 4,4)"
    )
    parser.add_argument("--no-key-centering", action="store_true", help="store quantized keys as they are")
    return parser


def cli_eval(argv: list[str]) -> int:
    """``trellis eval --model DIR [--reference DIR] --text FILE [--windows N --ctx N]``."""
    args = eval_parser().parse_args(argv)
    from converter_worker.eval import evaluate, format_result
    from inference_worker.kv_cache import parse_kv_bits

    try:
        text = args.text.read_text(encoding="utf-8")
        kv_bits = parse_kv_bits(args.kv_bits)
        result = evaluate(
            args.model, text, args.reference, args.windows, args.ctx, args.device, kv_bits, not args.no_key_centering
        )
    except (OSError, ValueError, KeyError) as exc:
        print(f"trellis eval: {exc}", file=sys.stderr)
        return 1
    print(format_result(result))
    return 0
