"""What a quantized KV cache costs in quality on the default model: KL divergence and top-1 agreement against the same
model with an unquantized cache, for K in {2,3,4,6,8} x V in {2,4,8} bits, with and without key centering (offsets
and per-channel scales, inference_worker/key_centering.py). Device-independent figures (float32 forward); runs on
the CPU.

    python bench/kv_quality.py [--windows 4] [--ctx 512] [--pairs 4,4 8,4] [--no-plain] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter_worker.eval import evaluate  # noqa: E402
from shared.default_model import ensure_default_model  # noqa: E402
from shared.settings import load_settings  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval" / "britannica-11th-slice.txt"
KEY_BITS = (2, 3, 4, 6, 8)
VALUE_BITS = (2, 4, 8)


def parse_pair(text: str) -> tuple[int, int]:
    k, v = (int(x) for x in text.split(","))
    return k, v


def _both(row: dict, what: str, spec: str, table: bool = False) -> str:
    """The centered figure, and the plain one when it was run."""
    centered = format(row[f"{what}_centered"], spec)
    if f"{what}_plain" not in row:
        return centered
    plain = format(row[f"{what}_plain"], spec)
    return f"{centered} ({plain})" if table else f"{centered} centered, {plain} plain"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="default: the default model (imported if needed)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", nargs="+", metavar="K,V", help="only these pairs (e.g. 4,4 8,4); default: the table")
    ap.add_argument("--no-plain", action="store_true", help="skip the runs without centering (halves the time)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pairs = [parse_pair(p) for p in args.pairs] if args.pairs else [(k, v) for k in KEY_BITS for v in VALUE_BITS]
    variants = (True,) if args.no_plain else (True, False)
    model_dir = args.model_dir or ensure_default_model(Path(load_settings().models_dir))
    text = TEXT.read_text(encoding="utf-8")
    rows = []
    start = time.monotonic()
    for k, v in pairs:
        row: dict = {"k_bits": k, "v_bits": v}
        for centering in variants:
            r = evaluate(model_dir, text, None, args.windows, args.ctx, args.device, (k, v), centering)
            tag = "centered" if centering else "plain"
            row[f"kl_{tag}"], row[f"top1_{tag}"] = r.kl_divergence, r.top1_agreement
            row["tokens"] = r.tokens
        rows.append(row)
        print(
            f"K{k}/V{v}: KL {_both(row, 'kl', '.4f')}; top-1 {_both(row, 'top1', '.3f')}"
            f"  [{time.monotonic() - start:.0f} s]",
            flush=True,
        )
    legend = "centered" if args.no_plain else "centered (plain)"
    print(f"\n== KL divergence from the fp cache ({rows[0]['tokens']} tokens): {legend} ==")
    values = sorted({v for _, v in pairs})
    print("| K \\\\ V | " + " | ".join(f"V{v}" for v in values) + " |")
    print("|---|" + "---|" * len(values))
    for k in sorted({k for k, _ in pairs}):
        by_v = {r["v_bits"]: r for r in rows if r["k_bits"] == k}
        cells = [_both(by_v[v], "kl", ".4f", table=True) if v in by_v else "" for v in values]
        print(f"| K{k} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(model_dir), "windows": args.windows, "ctx": args.ctx, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
