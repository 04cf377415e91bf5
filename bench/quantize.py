"""Quantizer benchmark for the GPU machine: trellis search speed, one 8B-shaped layer, and the default model end to end.

    python bench/quantize.py                      # everything: kernel, 8B layer, SmolLM2 at 2/3/4/5 bpw + RTN floor
    python bench/quantize.py --bits 4             # one bitrate
    python bench/quantize.py --skip-model         # kernel and layer only (a minute or two)
    python bench/quantize.py --json out.json      # also write the figures as JSON
    python bench/quantize.py --bits 4 --cal-text shipped= --cal-text mine=texts/   # compare calibration texts
    python bench/quantize.py --bits 4 --refit-rounds 0 --scale-tiles 8   # quantizer knobs (defaults: the converter's)

Sections (each prints its own lines; a summary table comes last):
1. Trellis search: the Triton kernel against the torch reference on the same GPU (tiles/s), and that both find
   equally good codes.
2. One 8B-shaped linear (4096 -> 14336, K=4, calibrated on correlated inputs): weights/s, and the conversion time
   that extrapolates to for Llama-3-8B (~7.0e9 linear weights) and Llama-3-70B (~6.9e10).
3. SmolLM2-135M-Instruct (the default model): `trellis convert` at each bitrate (head 6 bits, mul1, 250 x 2048
   calibration), then `trellis eval` on the first 16 windows of 512 tokens of the Britannica slice against the
   bf16 original in fp32; and the same for plain round-to-nearest group-wise integer quantization (group 128,
   min/max, fp16 scale and zero: K + 0.25 bits) as the floor EXL3 must beat.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import converter_worker.quant.linear as linear_module  # noqa: E402
import converter_worker.quant.regularize as regularize_module  # noqa: E402
from converter_worker.convert import ConvertOptions, convert  # noqa: E402
from converter_worker.eval import evaluate  # noqa: E402
from converter_worker.quant.linear import LinearSpec, quantize_linears  # noqa: E402
from converter_worker.quant.viterbi import viterbi_states  # noqa: E402
from kernels.exl3_ref import codebook_table  # noqa: E402
from shared.model_dir import TensorSource, load_config  # noqa: E402

EVAL_TEXT = REPO / "tests" / "data" / "eval" / "britannica-11th-slice.txt"
LLAMA3_8B_LINEAR_WEIGHTS = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)
LLAMA3_70B_LINEAR_WEIGHTS = 80 * (8192 * (8192 + 1024 + 1024 + 8192) + 3 * 8192 * 28672)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_search(device: torch.device, tiles: int) -> list[dict]:
    rows = []
    table = codebook_table("mul1").float()
    for K in (2, 4):
        x = torch.randn(tiles, 256, device=device)
        entry = {"K": K, "tiles": tiles}
        searches = {"torch": viterbi_states}
        if device.type == "cuda":
            from kernels.viterbi import viterbi_states_triton

            searches["triton"] = viterbi_states_triton
        for name, search in searches.items():
            search(x[:8], K, "mul1")  # compile / warm up
            _sync()
            t0 = time.perf_counter()
            states = search(x, K, "mul1")
            _sync()
            seconds = time.perf_counter() - t0
            mse = (table.to(device)[states.long()] - x).pow(2).mean().item()
            entry[f"{name}_tiles_per_s"] = tiles / seconds
            entry[f"{name}_mse"] = mse
            print(f"search K={K} {name:>6}: {tiles / seconds:10.1f} tiles/s  mse {mse:.5f}", flush=True)
        rows.append(entry)
    return rows


def bench_layer(device: torch.device, K: int = 4) -> dict:
    gen = torch.Generator().manual_seed(0)
    in_f, out_f = 4096, 14336
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    mix = torch.randn(in_f, 64, generator=gen)
    x = (torch.randn(4096, 64, generator=gen) @ mix.T + 0.3 * torch.randn(4096, in_f, generator=gen)).to(device)
    h = (x.T.double() @ x.double() / x.shape[0]).cpu()
    from converter_worker.convert import tile_quantizer

    _sync()
    t0 = time.perf_counter()
    (result,) = quantize_linears([LinearSpec("gate_proj", w, K, 1, h)], "mul1", device, tile_quantizer(device))
    _sync()
    seconds = time.perf_counter() - t0
    rate = in_f * out_f / seconds
    out = {
        "shape": [in_f, out_f],
        "K": K,
        "seconds": seconds,
        "weights_per_s": rate,
        "proxy_error": result.proxy_error,
        "llama3_8b_minutes": LLAMA3_8B_LINEAR_WEIGHTS / rate / 60,
        "llama3_70b_hours": LLAMA3_70B_LINEAR_WEIGHTS / rate / 3600,
    }
    print(
        f"8B-shaped layer {in_f}x{out_f} K={K}: {seconds:.1f} s, {rate / 1e6:.2f} M weights/s, proxy "
        f"{result.proxy_error:.5f} -> 8B ~{out['llama3_8b_minutes']:.1f} min, 70B ~{out['llama3_70b_hours']:.2f} h",
        flush=True,
    )
    return out


def _rtn(weight: torch.Tensor, bits: int, group: int = 128) -> torch.Tensor:
    """Round-to-nearest, asymmetric min/max per group of ``group`` inputs; returns the dequantized weight."""
    out_f, in_f = weight.shape
    pad = (-in_f) % group
    w = torch.nn.functional.pad(weight.float(), (0, pad)).view(out_f, -1, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8).half().float()
    zero = lo.half().float()
    q = ((w - zero) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + zero).view(out_f, -1)[:, :in_f]


def write_rtn_model(source: Path, out: Path, bits: int, head_bits: int = 6) -> Path:
    out.mkdir(parents=True)
    src = TensorSource(source)
    tensors = {}
    for name in src.keys():
        t = src.get(name)
        is_linear = name.endswith("_proj.weight") and ".layers." in name
        tensors[name] = (_rtn(t, bits) if is_linear else t.float()).to(torch.bfloat16)
    config = load_config(source)
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    if head_bits < 16:  # 16: the head stays bf16, as `trellis convert -hb 16` keeps it
        tensors["lm_head.weight"] = _rtn(tensors["lm_head.weight"], head_bits).to(torch.bfloat16)
    config["tie_word_embeddings"] = False
    save_file(tensors, str(out / "model.safetensors"), {"format": "pt"})
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copyfile(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def calibration_variants(specs: list[str]) -> list[tuple[str, Path | None]]:
    """``--cal-text NAME=PATH`` arguments as (name, path); none given: the shipped text alone, named "shipped"."""
    variants: list[tuple[str, Path | None]] = []
    for spec in specs or ["shipped="]:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--cal-text wants NAME=PATH (a .txt file or folder; empty: shipped text): {spec}")
        variants.append((name, Path(path) if path else None))
    return variants


def bench_model(
    device: torch.device,
    bits_list: list[float],
    workdir: Path,
    cal_rows: int,
    cal_cols: int,
    variants: list[tuple[str, Path | None]],
    head_bits: int = 6,
    allocations: tuple[str, ...] = ("measured",),
) -> list[dict]:
    from shared.default_model import ensure_default_model

    source = ensure_default_model(workdir / "models")
    text = EVAL_TEXT.read_text(encoding="utf-8")
    rows = []
    for bits in bits_list:
        rtn_model = write_rtn_model(source, workdir / f"rtn-{bits}", int(bits), head_bits)
        rtn = evaluate(rtn_model, text, source, 16, 512, str(device))
        for (name, cal_text), allocation in ((v, a) for v in variants for a in allocations):
            out, work = workdir / f"exl3-{bits}-{name}-{allocation}", workdir / f"work-{bits}-{name}-{allocation}"
            opts = ConvertOptions(
                source,
                out,
                work,
                bits,
                head_bits=head_bits,
                codebook="mul1",
                cal_rows=cal_rows,
                cal_cols=cal_cols,
                cal_text=cal_text,
                allocation=allocation,
                device=str(device),
            )
            _sync()
            t0 = time.perf_counter()
            convert(opts)
            _sync()
            seconds = time.perf_counter() - t0
            q = evaluate(out, text, reference_dir=source, windows=16, ctx=512, device=str(device))
            row = {
                "bits": bits,
                "calibration": name,
                "allocation": allocation,
                "head_bits": head_bits,
                "refit_rounds": linear_module.REFIT_ROUNDS,
                "scale_tiles": regularize_module.SCALE_SAMPLE_TILES,
                "scale_factors": list(regularize_module.SCALE_FACTORS),
                "convert_seconds": seconds,
                "tokens": q.tokens,
                "ppl": q.perplexity,
                "kl": q.kl_divergence,
                "top1": q.top1_agreement,
                "ref_ppl": q.reference_perplexity,
                "rtn_ppl": rtn.perplexity,
                "rtn_kl": rtn.kl_divergence,
                "rtn_top1": rtn.top1_agreement,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="2,3,4,5", help="comma-separated bitrates for the model section")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--tiles", type=int, default=1024, help="tiles in the search benchmark")
    parser.add_argument("--cal-rows", type=int, default=250)
    parser.add_argument("--cal-cols", type=int, default=2048)
    parser.add_argument(
        "--cal-text",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="calibration text to convert with (a .txt file or folder; NAME= alone: the shipped text); repeat to "
        "compare several in one run",
    )
    parser.add_argument("--head-bits", type=int, default=6, help="the issue's protocol: 6 (16 keeps the head bf16)")
    parser.add_argument("--refit-rounds", type=int, default=linear_module.REFIT_ROUNDS, help="scale refit rounds")
    parser.add_argument("--scale-tiles", type=int, default=regularize_module.SCALE_SAMPLE_TILES,
                        help="tiles sampled by the global scale search")  # fmt: skip
    parser.add_argument("--scale-factors", default=",".join(map(str, regularize_module.SCALE_FACTORS)),
                        help="global scale candidates (times RMS matching), ascending")  # fmt: skip
    parser.add_argument("--allocation", default="measured", help="comma-separated: measured, plain (each is converted)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # benchmark-only knobs: the converter reads these module settings at each linear
    linear_module.REFIT_ROUNDS = args.refit_rounds
    regularize_module.SCALE_SAMPLE_TILES = args.scale_tiles
    regularize_module.SCALE_FACTORS = tuple(float(f) for f in args.scale_factors.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", flush=True)
    results: dict = {"search": bench_search(device, args.tiles if device.type == "cuda" else 8)}
    if not args.skip_layer:
        results["layer"] = bench_layer(device)
    if not args.skip_model:
        with tempfile.TemporaryDirectory() as tmp:
            bits = [float(b) for b in args.bits.split(",")]
            variants = calibration_variants(args.cal_text)
            results["model"] = bench_model(
                device, bits, Path(tmp), args.cal_rows, args.cal_cols, variants, args.head_bits,
                tuple(args.allocation.split(",")),
            )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))

    print("\n== trellis search (tiles/s) ==")
    print(f"{'K':>2} {'torch':>10} {'triton':>10} {'mse torch':>10} {'mse triton':>10}")
    for r in results["search"]:
        print(
            f"{r['K']:>2} {r['torch_tiles_per_s']:>10.1f} {r.get('triton_tiles_per_s', float('nan')):>10.1f} "
            f"{r['torch_mse']:>10.5f} {r.get('triton_mse', float('nan')):>10.5f}"
        )
    if "layer" in results:
        r = results["layer"]
        print("\n== 8B-shaped layer ==")
        print(
            f"{r['weights_per_s'] / 1e6:.2f} M weights/s; Llama-3-8B ~{r['llama3_8b_minutes']:.1f} min; "
            f"Llama-3-70B ~{r['llama3_70b_hours']:.2f} h"
        )
    if "model" in results:
        print("\n== SmolLM2-135M-Instruct, 16 x 512 Britannica tokens, vs bf16 (EXL3 | RTN g128) ==")
        print(
            f"{'bpw':>4} {'calibration':>12} {'allocation':>10} {'convert s':>9} {'ppl':>8} {'KL':>8} {'top1':>6} | "
            f"{'ppl':>8} {'KL':>8} {'top1':>6}"
        )
        for r in results["model"]:
            print(
                f"{r['bits']:>4} {r['calibration']:>12} {r['allocation']:>10} {r['convert_seconds']:>9.1f} "
                f"{r['ppl']:>8.2f} {r['kl']:>8.4f} "
                f"{r['top1']:>6.3f} | "
                f"{r['rtn_ppl']:>8.2f} {r['rtn_kl']:>8.4f} {r['rtn_top1']:>6.3f}"
            )
        print(f"bf16 reference perplexity: {results['model'][0]['ref_ppl']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
