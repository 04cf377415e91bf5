"""Which calibration text serves the quantizer best, measured on the CPU in minutes instead of GPU conversions.

For each calibration text: capture every decoder linear's input Hessian on the unquantized default model (calibration
rows exactly as ``trellis convert`` builds them), run the converter's own regularization and LDLQ with a uniform
scalar quantizer standing in for the trellis search (the Hessian feedback is the same; only the per-tile search is
cheaper), then score the result as ``bench/quantize.py`` does: 16 windows of 512 Britannica tokens, KL divergence
from the unquantized model. The evaluation text itself can be added as a calibration (``eval=@eval``): an oracle
that shows how much a text closer to the evaluation could still gain, and ``NAME=@heldout`` the same slice past the
scored windows (never shipped either: it tells the text's kind from the very words scored). The head stays
unquantized.

    python bench/calibration_proxy.py --bits 3 --text old=DIR --text shipped= --text eval=@eval [--rows 64 --cols 512]

``--allocation measured`` spreads the bits (an average, e.g. 4.0 or 3.5) as ``trellis convert --allocation measured``
does: each linear's K from the converter's own plan (quant/sensitivity.py), within 2..6 bits here.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import converter_worker.quant.bits as bits_module  # noqa: E402
import converter_worker.quant.calibration as calibration_module  # noqa: E402
import converter_worker.quant.linear as linear_module  # noqa: E402
import converter_worker.quant.regularize as regularize_module  # noqa: E402
from converter_worker.convert import Converter, ConvertOptions  # noqa: E402
from converter_worker.eval import evaluate  # noqa: E402
from converter_worker.quant.calibration import calibration_rows  # noqa: E402
from converter_worker.quant.capture import InputCapture  # noqa: E402
from converter_worker.quant.layout import quantized_linears  # noqa: E402
from converter_worker.quant.ldlq import ldlq_many  # noqa: E402
from converter_worker.quant.linear import LinearSpec, dense_from_parts, prepare_linear, stored_scales  # noqa: E402
from converter_worker.quant.refit import REFIT_ROUNDS  # noqa: E402
from inference_worker.models import find_spec  # noqa: E402
from inference_worker.models.decoder import DecoderConfig  # noqa: E402
from shared.calibration import calibration_text  # noqa: E402
from shared.model_dir import load_config  # noqa: E402

EVAL_TEXT = REPO / "tests" / "data" / "eval" / "britannica-11th-slice.txt"
# step of the mean-squared-error-optimal uniform quantizer of a unit Gaussian, by bits (Max, 1960)
HELDOUT_FROM = 31_000
GAUSSIAN_STEP = {2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def uniform_tiles(tiles: torch.Tensor, K: int, codebook: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The trellis search's interface with a uniform midrise quantizer: (dummy states, decoded tiles)."""
    rms = regularize_module.codebook_rms(codebook)
    step = GAUSSIAN_STEP[K] * rms
    top = (2**K - 1) / 2
    decoded = (torch.floor(tiles / step) + 0.5).clamp(-top, top) * step
    return torch.zeros(tiles.shape[0], 256, dtype=torch.int32, device=tiles.device), decoded


def capture_hessians(model: torch.nn.Module, rows: torch.Tensor, source: Path) -> dict[str, torch.Tensor]:
    """X^T X / n of every decoder linear's inputs, grouped as the converter groups them (quant/layout.py)."""
    raw = load_config(source)
    spec = find_spec(raw)
    config = DecoderConfig.from_hf(raw, spec)
    linears = [q for layer in range(config.num_hidden_layers) for q in quantized_linears(spec, config, layer)]
    modules = dict(model.named_modules())
    capture = InputCapture({q.name: modules[q.name] for q in linears}, {q.name: q.input_group for q in linears}, "cpu")
    with capture.recording(), torch.inference_mode():
        for row in rows:
            model(row[None])
    return capture.hessians()


def quantize_dense(
    name: str, weight: torch.Tensor, hessian: torch.Tensor, K: int, seed: int, refit_rounds: int
) -> torch.Tensor:
    """The converter's regularize + LDLQ + scale refit for one linear, uniform tiles inside; the dense [out, in]."""
    p = prepare_linear(LinearSpec(name, weight, K, seed, hessian), "mul1", torch.device("cpu"), uniform_tiles)
    ldlq_many([p.job], "mul1", uniform_tiles)
    suh, svh, _ = stored_scales(p, refit_rounds)
    out_f, in_f = weight.shape
    return dense_from_parts(p.job.quantized, suh, svh)[:in_f, :out_f].T.contiguous()


def bit_plan(source: Path, args: argparse.Namespace, text: str) -> dict[str, int]:
    """Every linear's K as the converter plans it, on these calibration rows' arguments."""
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "calibration.txt"
        text_file.write_text(text, encoding="utf-8")
        opts = ConvertOptions(
            input=source, output=Path(tmp) / "out", work_dir=Path(tmp) / "work", bits=args.bits,
            allocation=args.allocation, cal_rows=args.rows, cal_cols=args.cols, seed=args.seed, cal_text=text_file,
            device="cpu",
        )  # fmt: skip
        plan = Converter(opts).preview_plan()
    if not set(plan.values()) <= set(GAUSSIAN_STEP):
        used, known = sorted(set(plan.values())), sorted(GAUSSIAN_STEP)
        raise SystemExit(f"the plan uses bits {used}; the proxy's uniform quantizer knows {known}")
    return plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="default: the default model (imported if needed)")
    ap.add_argument("--bits", type=float, default=3, help="bits per weight (an average with --allocation)")
    ap.add_argument("--allocation", choices=("plain", "measured"), default="plain")
    ap.add_argument("--spread", default="1,1", help="measured allocation: bits below,above floor(target)")
    ap.add_argument("--text", action="append", default=[], metavar="NAME=PATH", help="PATH empty: the shipped text; "
                    "@eval: the evaluation text (an oracle, never shipped)")  # fmt: skip
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="calibration rows' seed (another sample of the same text)")
    ap.add_argument("--random-fraction", type=float, default=calibration_module.RANDOM_ROW_FRACTION)
    ap.add_argument("--damping", type=float, default=linear_module.DEFAULT_DAMPING, help="times mean(diag H)")
    ap.add_argument("--refit-rounds", type=int, default=REFIT_ROUNDS, help="0: keep the regularization's scales")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    calibration_module.RANDOM_ROW_FRACTION = args.random_fraction
    bits_module.ALLOCATION_SPREAD = tuple(int(v) for v in args.spread.split(","))
    linear_module.DEFAULT_DAMPING = args.damping  # padded_hessian's damping of the real and the padded inputs
    import tokenizers
    from transformers import AutoModelForCausalLM

    from shared.default_model import ensure_default_model
    from shared.settings import load_settings

    source = args.model_dir or ensure_default_model(Path(load_settings().models_dir))
    tokenizer = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    weights = load_file(source / "model.safetensors")
    eval_text = EVAL_TEXT.read_text(encoding="utf-8")
    results = []
    for spec in args.text or ["shipped="]:
        name, _, path = spec.partition("=")
        if path == "@eval":
            text = eval_text
        elif path == "@heldout":  # the slice's text past the scored windows (which end near character 30,500)
            text = eval_text[HELDOUT_FROM:]
        else:
            text = calibration_text(Path(path) if path else None)
        t0 = time.perf_counter()
        rows = calibration_rows(tokenizer, args.rows, args.cols, model.config.vocab_size, args.seed, text)
        hessians = capture_hessians(model, rows, source)
        plan = bit_plan(source, args, text)
        quantized = dict(weights)
        for i, key in enumerate(sorted(hessians)):
            wkey = f"{key}.weight"
            dense = quantize_dense(key, weights[wkey], hessians[key], plan[key], seed=i, refit_rounds=args.refit_rounds)
            quantized[wkey] = dense.to(weights[wkey].dtype)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model"
            shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.safetensors"))
            save_file(quantized, out / "model.safetensors", metadata={"format": "pt"})
            r = evaluate(out, eval_text, reference_dir=source, windows=16, ctx=512, device="cpu")
        row = {
            "text": name,
            "bits": args.bits,
            "allocation": args.allocation,
            "spread": args.spread,
            "plan": sorted(collections.Counter(plan.values()).items()),
            "random_fraction": args.random_fraction,
            "seed": args.seed,
            "damping": args.damping,
            "refit_rounds": args.refit_rounds,
            "kl": r.kl_divergence,
            "ppl": r.perplexity,
            "top1": r.top1_agreement,
            "seconds": time.perf_counter() - t0,
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
