"""What a quantized KV cache costs in quality on the default model: KL divergence and top-1 agreement against the same
model with an unquantized cache, for K in {2,3,4,6,8} x V in {2,4,8} bits, with and without key centering (offsets
and per-channel scales, inference_worker/key_centering.py). Device-independent figures (float32 forward); runs on
the CPU.

    python bench/kv_quality.py [--windows 4] [--ctx 512] [--json OUT.json]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="default: the default model (imported if needed)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    model_dir = args.model_dir or ensure_default_model(Path(load_settings().models_dir))
    text = TEXT.read_text(encoding="utf-8")
    rows = []
    start = time.monotonic()
    for k in KEY_BITS:
        for v in VALUE_BITS:
            row: dict = {"k_bits": k, "v_bits": v}
            for centering in (True, False):
                r = evaluate(model_dir, text, None, args.windows, args.ctx, args.device, (k, v), centering)
                tag = "centered" if centering else "plain"
                row[f"kl_{tag}"], row[f"top1_{tag}"] = r.kl_divergence, r.top1_agreement
                row["tokens"] = r.tokens
            rows.append(row)
            print(
                f"K{k}/V{v}: KL {row['kl_centered']:.4f} centered, {row['kl_plain']:.4f} plain; "
                f"top-1 {row['top1_centered']:.3f} / {row['top1_plain']:.3f}  [{time.monotonic() - start:.0f} s]",
                flush=True,
            )
    print(f"\n== KL divergence from the fp cache ({rows[0]['tokens']} tokens): centered keys (plain keys) ==")
    print("| K \\\\ V | " + " | ".join(f"V{v}" for v in VALUE_BITS) + " |")
    print("|---|" + "---|" * len(VALUE_BITS))
    for k in KEY_BITS:
        cells = [f"{r['kl_centered']:.4f} ({r['kl_plain']:.4f})" for r in rows if r["k_bits"] == k]
        print(f"| K{k} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"model": str(model_dir), "windows": args.windows, "ctx": args.ctx, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
