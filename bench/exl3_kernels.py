"""Check and time the EXL3 Triton kernels on one CUDA GPU, against bf16 torch.matmul measured in the same run.

    python bench/exl3_kernels.py [--sweep] [--quick] [--out DIR]

1. Ceilings: device-to-device copy bandwidth (bytes read + written) and a large bf16 matmul.
2. Correctness at real sizes (fresh random trellises): W-hat bit-exact for every K and codebook, the fused matmul
   and the reconstruction against ``kernels.exl3_ref`` in fp32; outputs come from memory poisoned with NaN first.
3. With --sweep: launch configs (GemvConfig: warps, waves, prefetch, finish warps) timed at K=4, batch 1, each
   first checked against the reference (a config that computes wrong sums is reported, not timed); the best one is
   used from then on.
4. Per-launch breakdown at K=4, batch 1: the fused path's three launches each timed alone, next to
   the whole call and an empty kernel (what one launch costs inside a graph).
5. Decode timings on Llama-3-8B shapes: every K at batch 1, K=2/4 at batch 16, bf16 torch.matmul baseline. Each
   timing replays a CUDA graph of calls rotating over enough weight copies to overflow L2, median of do_bench.
6. Prefill (2048 rows): reconstruct + matmul against bf16 matmul.
Full results go to $OUT/exl3_kernels.json (or --out); a short table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import exl3_matmul  # noqa: E402
from kernels import exl3_ref as ref  # noqa: E402
from kernels.exl3_matmul import GemvConfig, exl3_gemv, gemv_launches  # noqa: E402
from kernels.exl3_reconstruct import decode_trellis, reconstruct_weight  # noqa: E402
from kernels.hadamard import hadamard_transform  # noqa: E402

SHAPES = {  # Llama-3-8B linears, (in, out)
    "q/o 4096x4096": (4096, 4096),
    "gate/up 4096x14336": (4096, 14336),
    "down 14336x4096": (14336, 4096),
    "k/v 4096x1024": (4096, 1024),
}
ROTATE_BYTES = 256 << 20  # weight copies per timing: together several times the 60 MB L2


def rand_layer(k: int, n: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, 16 * K), dtype=torch.int16, generator=gen, device="cuda")
    suh = (torch.randn(k, generator=gen, device="cuda").sign() * (1 + 0.1 * torch.rand(k, device="cuda"))).half()
    svh = (torch.randn(n, generator=gen, device="cuda") * 0.02).half()
    return trellis, suh, svh


def poison(numel: int, dtype: torch.dtype = torch.float32) -> None:
    """Fill soon-to-be-reused allocator memory with NaN so an output element nobody wrote cannot pass."""
    torch.full((numel * 2,), float("nan"), dtype=dtype, device="cuda")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else float("inf")


def graph_us(calls: list) -> float:
    """Median microseconds per call: one CUDA graph replays all calls (rotating weights), timed by do_bench."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return do_bench(g.replay, warmup=25, rep=150, return_mode="median") * 1000 / len(calls)


def copies(nbytes: int) -> int:
    return max(4, min(256, math.ceil(ROTATE_BYTES / max(1, nbytes))))


def ceilings(res: dict) -> None:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    res["copy_GBps"] = 2 * n / ms / 1e6
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: x @ y, warmup=25, rep=200, return_mode="median")
    res["bf16_8192_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    print(f"copy {res['copy_GBps']:.0f} GB/s, bf16 matmul {res['bf16_8192_TFLOPs']:.0f} TFLOP/s", flush=True)


def check_correctness(res: dict, gen: torch.Generator) -> None:
    out = res.setdefault("correctness", {})
    for K in range(1, 9):
        for cb in ref.CODEBOOKS:
            tr, _, _ = rand_layer(1024, 2048, K, gen)
            poison(1024 * 2048, torch.float16)
            ok = torch.equal(decode_trellis(tr, cb).view(torch.int16), ref.decode_trellis(tr, K, cb).view(torch.int16))
            out[f"what_bitexact_K{K}_{cb}"] = ok
            if not ok:
                print(f"FAIL W-hat K={K} {cb}", flush=True)
    for name, (k, n) in SHAPES.items():
        for K, cb in ((4, "mul1"), (2, "3inst"), (5, "mcg")):
            tr, suh, svh = rand_layer(k, n, K, gen)
            bias = torch.randn(n, device="cuda").half()
            for m in (1, 16, 32):
                x = torch.randn(m, k, device="cuda").half()
                out[f"gemv_relerr_{name}_K{K}_{cb}_m{m}"] = gemv_error(x, (tr, suh, svh), cb, bias, None)
            poison(k * n, torch.float16)
            w = reconstruct_weight(tr, suh, svh, cb)
            out[f"reconstruct_relerr_{name}_K{K}_{cb}"] = rel_err(w, ref.reconstruct_weight(tr, suh, svh, cb).float())
        x = torch.randn(2048, k, device="cuda").bfloat16()
        y = exl3_matmul.exl3_matmul(x, tr, suh, svh, cb, bias)
        out[f"prefill_relerr_{name}"] = rel_err(y, ref.exl3_matmul_ref(x.float(), tr, suh, svh, cb, bias))
    x = torch.randn(64, 4000, device="cuda")
    s = torch.randn(4096, device="cuda").half()
    out["hadamard_relerr"] = rel_err(
        hadamard_transform(x, scale_in=s, out_features=4096),
        ref._had_last(torch.nn.functional.pad(x, (0, 96)) * s.float()),
    )
    bad = [k for k, v in out.items() if (v is False) or (isinstance(v, float) and not v < 5e-3)]
    res["correct"] = not bad
    print("correctness:", "all passed" if not bad else f"FAILED {bad}", flush=True)


def time_gemv(k: int, n: int, K: int, m: int, gen: torch.Generator, cfg: GemvConfig | None, cb: str = "mul1") -> float:
    sets = [rand_layer(k, n, K, gen) for _ in range(copies(k * n * K // 8))]
    x = torch.randn(m, k, device="cuda").bfloat16()
    return graph_us([lambda s=s: exl3_gemv(x, s[0], s[1], s[2], cb, None, cfg) for s in sets])


def time_bf16(k: int, n: int, m: int) -> float:
    ws = [torch.randn(k, n, device="cuda").bfloat16() for _ in range(copies(k * n * 2))]
    x = torch.randn(m, k, device="cuda").bfloat16()
    return graph_us([lambda w=w: torch.matmul(x, w) for w in ws])


def sweep_configs(
    base: GemvConfig, input_hadamards: tuple[str, ...] = ("butterfly", "dot"), waves: tuple[int, ...] = (1, 2, 4)
) -> list[GemvConfig]:
    # prefetch was timed on an H100 (2026-12-07): faster only at one wave; it stays out of the grid
    grid = [replace(base, waves=wv, num_warps=w) for w in (8, 4) for wv in waves]
    fused = [replace(base, waves=wv, num_warps=w, input_hadamard=h)
             for h in input_hadamards for w in (8, 4) for wv in waves]  # fmt: skip
    # last: a form that faults poisons the CUDA context for everything after it in this process
    return grid + [replace(base, finish_warps=8), replace(base, finish_warps=2)] + fused


def cfg_key(c: GemvConfig) -> str:
    prefetch = "/prefetch" if c.prefetch else ""
    hadamard = "" if c.input_hadamard == "launch" else f"/in-{c.input_hadamard}"
    return f"warps{c.num_warps}/waves{c.waves}/stages{c.num_stages}/finish{c.finish_warps}{prefetch}{hadamard}"


def gemv_error(x: torch.Tensor, layer: tuple, cb: str, bias: torch.Tensor | None, cfg: GemvConfig | None) -> float:
    """The fused matmul's relative error against the fp32 reference, its output drawn from NaN-poisoned memory."""
    poison(x.shape[0] * layer[2].shape[0] * 64)
    y = exl3_gemv(x, *layer, cb, bias, cfg)
    return rel_err(y, ref.exl3_matmul_ref(x.float(), *layer, cb, bias))


def config_error(cfg: GemvConfig, gen: torch.Generator) -> float:
    """The worst relative error against the fp32 reference over the four shapes at 1 and 16 rows (K4, mul1)."""
    worst = 0.0
    for k, n in SHAPES.values():
        layer = rand_layer(k, n, 4, gen)
        for m in (1, 16):
            worst = max(worst, gemv_error(torch.randn(m, k, device="cuda").bfloat16(), layer, "mul1", None, cfg))
    return worst


@triton.jit
def _empty_kernel(ptr):
    tl.store(ptr + tl.program_id(0), 0.0)


def launch_breakdown(res: dict, gen: torch.Generator, cfg: GemvConfig | None) -> None:
    """K=4, batch 1: each launch of the fused path timed alone (same graph method), the whole call, an empty kernel."""
    rows = res.setdefault("breakdown", [])
    res["breakdown_config"] = cfg_key(cfg) if cfg else "each shape's default_config"
    sink = torch.empty(1, device="cuda")
    empty_us = graph_us([lambda: _empty_kernel[(1,)](sink)] * 32)
    res["empty_launch_us"] = empty_us
    for name, (k, n) in SHAPES.items():
        sets = [rand_layer(k, n, 4, gen) for _ in range(copies(k * n * 4 // 8))]
        x = torch.randn(1, k, device="cuda").bfloat16()
        plans = [gemv_launches(x, *s, "mul1", None, cfg)[0] for s in sets]
        row = {
            "shape": name,
            "K": 4,
            "launches": len(plans[0]),
            "total_us": graph_us([lambda p=p: [launch() for launch in p] for p in plans]),
            "hadamard_us": graph_us([p[0] for p in plans]) if len(plans[0]) == 3 else 0.0,
            "weight_us": graph_us([p[-2] for p in plans]),
            "finish_us": graph_us([p[-1] for p in plans]),
            "empty_launch_us": empty_us,
        }
        row["launch_sum_us"] = row["hadamard_us"] + row["weight_us"] + row["finish_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)


def sweep(res: dict, gen: torch.Generator, input_hadamards: tuple[str, ...], waves: tuple[int, ...]) -> GemvConfig:
    """Time every config of the grid at K=4, batch 1 (each first checked against the reference); the best one."""
    rows = res.setdefault("sweep", [])
    totals: dict[str, float] = {}
    configs = sweep_configs(exl3_matmul.DEFAULT_CONFIG, input_hadamards, waves)
    for cfg in configs:
        try:
            err = config_error(cfg, gen)
            if not err < 5e-3:
                raise ValueError(f"wrong results: relative error {err:.3g}")
            us = {name: time_gemv(k, n, 4, 1, gen, cfg) for name, (k, n) in SHAPES.items()}
        except Exception as exc:  # a config that fails to compile, launch or compute is reported, not fatal
            rows.append({"config": cfg_key(cfg), "error": repr(exc)[:300]})
            print(f"sweep {cfg_key(cfg)}: {exc!r}"[:400], flush=True)
            continue
        rows.append({"config": cfg_key(cfg), "rel_err": err, **us})
        totals[cfg_key(cfg)] = sum(us.values())
        print(f"sweep {cfg_key(cfg)}: " + ", ".join(f"{v:.2f}" for v in us.values()) + f" (err {err:.1e})", flush=True)
    best = min(totals, key=totals.get)
    res["sweep_best"] = best
    return configs[[cfg_key(c) for c in configs].index(best)]


def decode_timings(res: dict, gen: torch.Generator, cfg: GemvConfig | None, ks: list[int]) -> None:
    rows = res.setdefault("decode", [])
    for name, (k, n) in SHAPES.items():
        base1 = time_bf16(k, n, 1)
        base16 = time_bf16(k, n, 16)
        res.setdefault("config", repr(cfg) if cfg else "each shape's default_config")
        row3 = {"shape": name, "K": 4, "codebook": "3inst", "exl3_us": time_gemv(k, n, 4, 1, gen, cfg, "3inst")}
        res.setdefault("decode_3inst", []).append(row3)
        for K in ks:
            us = time_gemv(k, n, K, 1, gen, cfg)
            wbytes = k * n * K / 8 + 2 * (k + n)
            row = {
                "shape": name,
                "K": K,
                "exl3_us": us,
                "bf16_us": base1,
                "speedup": base1 / us,
                "weight_GBps": wbytes / us / 1e3,
                "of_copy_bw": wbytes / us / 1e3 / res["copy_GBps"],
                "bf16_GBps": k * n * 2 / base1 / 1e3,
            }
            if K in (2, 4):
                row["exl3_b16_us"] = time_gemv(k, n, K, 16, gen, cfg)
                row["b16_over_b1"] = row["exl3_b16_us"] / us
                row["bf16_b16_us"] = base16
            rows.append(row)
            print(json.dumps(row), flush=True)


def median_us(fn, *args) -> float:
    return do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median") * 1000


def prefill_timings(res: dict, gen: torch.Generator) -> None:
    """2048 rows: reconstruct + matmul against bf16 matmul; plain calls, and in a CUDA graph (GPU time alone)."""
    rows = res.setdefault("prefill", [])
    for name, (k, n) in SHAPES.items():
        x = torch.randn(2048, k, device="cuda").bfloat16()
        w = torch.randn(k, n, device="cuda").bfloat16()
        base = median_us(torch.matmul, x, w)
        base_g = graph_us([functools.partial(torch.matmul, x, w)] * 2)
        for K in (2, 4):
            tr, suh, svh = rand_layer(k, n, K, gen)
            call = functools.partial(exl3_matmul.exl3_matmul, x, tr, suh, svh, "mul1")
            total = median_us(call)
            total_g = graph_us([call] * 2)
            rec = median_us(reconstruct_weight, tr, suh, svh, "mul1", torch.bfloat16)
            row = {
                "shape": name,
                "K": K,
                "exl3_us": total,
                "reconstruct_us": rec,
                "bf16_us": base,
                "ratio": total / base,
                "graph_exl3_us": total_g,
                "graph_bf16_us": base_g,
                "graph_ratio": total_g / base_g,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)


def table(res: dict) -> str:
    lines = [
        f"device {res['device']}  copy {res['copy_GBps']:.0f} GB/s  bf16 {res['bf16_8192_TFLOPs']:.0f} TFLOP/s  "
        f"correct={res.get('correct')}",
        f"decode (batch 1, mul1, {res.get('config')}): shape | K | exl3 us | bf16 us | speedup | weight GB/s | "
        "of copy bw | b16/b1",
    ]
    for r in res.get("decode", []):
        b16 = f"{r['b16_over_b1']:.2f}" if "b16_over_b1" in r else "-"
        lines.append(
            f"  {r['shape']:<20} {r['K']} {r['exl3_us']:7.2f} {r['bf16_us']:7.2f} {r['speedup']:5.2f}x "
            f"{r['weight_GBps']:7.0f} {r['of_copy_bw']:5.2f} {b16}"
        )
    lines.append(
        f"launches (batch 1, K4, {res.get('breakdown_config')}): shape | whole call us | Hadamard us "
        f"| weight kernel us | finish kernel us | sum | empty launch {res.get('empty_launch_us', float('nan')):.2f} us"
    )
    for r in res.get("breakdown", []):
        lines.append(
            f"  {r['shape']:<20} {r['total_us']:7.2f} {r['hadamard_us']:7.2f} {r['weight_us']:7.2f} "
            f"{r['finish_us']:7.2f} {r['launch_sum_us']:7.2f}"
        )
    lines.append("prefill 2048 rows: shape | K | reconstruct+matmul us | reconstruct us | bf16 us | ratio | graphed")
    for r in res.get("prefill", []):
        lines.append(
            f"  {r['shape']:<20} {r['K']} {r['exl3_us']:8.1f} {r['reconstruct_us']:7.1f} {r['bf16_us']:8.1f} "
            f"{r['ratio']:5.3f} {r['graph_ratio']:5.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time launch configs at K=4 first and use the best")
    ap.add_argument("--sweep-input-hadamard", default="butterfly,dot",
                    help="in-kernel input Hadamard forms the sweep tries (comma-separated; '' for none): "
                         "bench/dot_chain_probe.py tells which ones the GPU's Triton compiles correctly")
    ap.add_argument("--sweep-waves", default="1,2,4", help="programs per SM the sweep tries (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="K in (2, 4) only")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "exl3_kernels.json"
    gen = torch.Generator(device="cuda").manual_seed(1234)
    state: dict = {"cfg": None}  # the launch config used for the timings: default, or the sweep's best
    steps = [("ceilings", lambda: ceilings(res))]
    if not args.skip_check:
        steps.append(("correctness", lambda: check_correctness(res, gen)))
    if args.sweep:
        forms = tuple(f for f in args.sweep_input_hadamard.split(",") if f)
        waves = tuple(int(w) for w in args.sweep_waves.split(","))
        steps.append(("sweep", lambda: state.__setitem__("cfg", sweep(res, gen, forms, waves))))
    steps.append(("breakdown", lambda: launch_breakdown(res, gen, state["cfg"])))
    ks = [2, 4] if args.quick else list(range(1, 9))
    steps.append(("decode", lambda: decode_timings(res, gen, state["cfg"], ks)))
    if not args.no_prefill:
        steps.append(("prefill", lambda: prefill_timings(res, gen)))
    for name, fn in steps:
        t0 = time.time()
        try:
            fn()
        except Exception:
            res.setdefault("errors", {})[name] = traceback.format_exc()[-2000:]
            print(f"step {name} failed:\n{res['errors'][name]}", flush=True)
        res.setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))
    print(table(res))


if __name__ == "__main__":
    main()
