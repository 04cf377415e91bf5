"""Which forms of the input Hadamard inside the EXL3 weight kernel does the GPU's Triton compile correctly?

    python bench/dot_chain_probe.py                 # every form x 4 and 8 warps, each in its own process
    python bench/dot_chain_probe.py --form 1 --warps 8 --one   # one variant in this process
    TRITON_INTERPRET=1 python bench/dot_chain_probe.py --device cpu   # the interpreter (all forms should pass)

The weight kernel (kernels/exl3_matmul.py) multiplies decoded trellis tiles, transposed, by ``xh^T`` where
``xh = (x * suh) H``. Computing ``xh`` inside it would save a launch per linear (~3.5 us of 15 on an H100), but
two attempts passed the interpreter and failed on the GPU (BENCHMARKS.md). This probe runs a cut-down weight
kernel (one program per 128 output columns, no split-K; the real ``decode_tiles`` for the weights) with the
Hadamard formed each way, and compares the result with the same kernel reading ``xh`` that torch computed (form 0):

0. ``xh`` loaded (the shipped path; the control)
1. ``H64 (a + b)^T`` as a [64, 64] x [64, rows] fp16 dot whose result is the weight dot's B operand (Hopper wgmma)
2. the same product formed by rows, ``(a + b) H64`` as a [rows, 64] x [64, 64] dot (M = rows: mma.sync), transposed
3. form 1's result passed through a per-program scratch line in global memory (store, barrier, load, barrier)
4. no Hadamard dot: an elementwise broadcast-and-sum (slow; tells whether the dot is what breaks)
5. form 1's result stored as the output, with no weight dot after it (tells whether the Hadamard dot alone is right)
6. a butterfly H64 in six levels of reshape, split and join (adds only: no dot, no matrix in registers)

Each variant runs in a child process, since an illegal address poisons the CUDA context for the rest of a process.

Prints one line per variant: ok (relative error, and on a GPU the time of one launch on a 4096 x 4096 layer), WRONG
(relative error) or CRASHED (the child's last error line).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import exl3_ref as ref  # noqa: E402
from kernels.exl3_matmul import INV_SQRT128, _butterfly_level  # noqa: E402
from kernels.exl3_reconstruct import decode_tiles, group_size, trellis_words, use_asm  # noqa: E402
from kernels.hadamard import hadamard_signs  # noqa: E402

FORMS = {
    0: "xh loaded (control)",
    1: "H64 dot, result as the weight dot's B operand",
    2: "row-form H64 dot (M = rows), transposed",
    3: "H64 dot through a scratch line",
    4: "elementwise Hadamard, no dot",
    5: "H64 dot alone, stored",
    6: "butterfly H64 (reshape, split, join), no dot",
}


@triton.jit
def _hadamard_half(s, h64, scratch, rows, r64, BLOCK_M: tl.constexpr, FORM: tl.constexpr):
    """xh^T for one 64-row half from s [64, BLOCK_M] fp32 (the half's a + b or a - b, already over sqrt(128))."""
    if FORM == 2:
        out = tl.trans(tl.dot(tl.trans(s.to(tl.float16)), h64).to(tl.float16))
    elif FORM == 4:
        out = tl.sum(h64.to(tl.float32)[:, :, None] * s[None, :, :], axis=1).to(tl.float16)
    elif FORM == 6:
        for level in tl.static_range(6):  # the shipped kernel's butterfly (GemvConfig.input_hadamard="butterfly")
            s = _butterfly_level(s, 1 << level, BLOCK_M)
        out = s.to(tl.float16)
    else:
        out = tl.dot(h64, s.to(tl.float16)).to(tl.float16)
        if FORM == 3:
            line = scratch + r64[:, None] * BLOCK_M + rows[None, :]
            tl.store(line, out)
            tl.debug_barrier()
            out = tl.load(line)
            tl.debug_barrier()
    return out


@triton.jit
def _probe_kernel(
    x_ptr, suh_ptr, xh_ptr, h64_ptr, words_ptr, scratch_ptr, out_ptr, M, n_cols,
    K: tl.constexpr, G: tl.constexpr, CODEBOOK: tl.constexpr, BLOCK_M: tl.constexpr, STEPS: tl.constexpr,
    ASM: tl.constexpr, FORM: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    r64 = tl.arange(0, 64)
    row_ok = rows < M
    k = STEPS * 128
    h64 = tl.load(h64_ptr + r64[:, None] * 64 + r64[None, :])
    scratch = scratch_ptr + pid_n * (64 * BLOCK_M)
    acc = tl.zeros((128, BLOCK_M), dtype=tl.float32)
    for step in range(STEPS):
        feat = step * 128 + r64
        if FORM == 0:
            xh_t = xh_ptr + rows[None, :] * k + feat[:, None]
            xh_a = tl.load(xh_t, mask=row_ok[None, :], other=0.0)
            xh_b = tl.load(xh_t + 64, mask=row_ok[None, :], other=0.0)
        else:
            x_t = x_ptr + rows[None, :] * k + feat[:, None]
            a = tl.load(x_t, mask=row_ok[None, :], other=0.0) * tl.load(suh_ptr + feat)[:, None] * INV_SQRT128
            b = tl.load(x_t + 64, mask=row_ok[None, :], other=0.0) * tl.load(suh_ptr + feat + 64)[:, None] * INV_SQRT128
            xh_a = _hadamard_half(a + b, h64, scratch, rows, r64, BLOCK_M, FORM)
            xh_b = _hadamard_half(a - b, h64, scratch, rows, r64, BLOCK_M, FORM)
        if FORM == 5:
            cols = step * 128 + r64
            tl.store(out_ptr + rows[None, :] * n_cols + cols[:, None], xh_a.to(tl.float32), mask=row_ok[None, :])
            tl.store(out_ptr + rows[None, :] * n_cols + cols[:, None] + 64, xh_b.to(tl.float32), mask=row_ok[None, :])
        else:
            w_a = decode_tiles(words_ptr, step * 8, pid_n * 8, n_cols // 16, K, G, CODEBOOK, 4, 8, ASM)
            w_b = decode_tiles(words_ptr, step * 8 + 4, pid_n * 8, n_cols // 16, K, G, CODEBOOK, 4, 8, ASM)
            acc = tl.dot(tl.trans(w_a), xh_a, acc)
            acc = tl.dot(tl.trans(w_b), xh_b, acc)
    if FORM != 5:
        cols = pid_n * 128 + tl.arange(0, 128)
        tl.store(out_ptr + rows[None, :] * n_cols + cols[:, None], acc, mask=row_ok[None, :])


def run_form(form: int, warps: int, device: str, rows: int = 1, k: int = 512, n: int = 512, bits: int = 4,
             timed: bool = False) -> float:
    """Relative error of the form's output against form 0's (form 5: against torch's xh); with ``timed``, the
    microseconds of one launch instead (no check)."""
    gen = torch.Generator().manual_seed(0)
    trellis = torch.randint(-32768, 32768, (k // 16, n // 16, 16 * bits), dtype=torch.int16, generator=gen)
    suh = torch.randn(k, generator=gen).sign() * (1 + 0.1 * torch.rand(k, generator=gen))
    x = torch.randn(rows, k, generator=gen)
    xh = ref._had_last(x * suh)  # fp32 (x * suh) H, orthonormal
    trellis, suh, x, xh = (t.to(device) for t in (trellis, suh, x, xh))
    block_m = 16 if rows <= 16 else 32
    h64 = hadamard_signs(64, device, torch.float16)
    scratch = torch.empty(n // 128 * 64 * block_m, dtype=torch.float16, device=device)

    def launch(f: int) -> torch.Tensor:
        out = torch.full((rows, n), float("nan"), device=device)
        _probe_kernel[(n // 128,)](
            x, suh, xh.half(), h64, trellis_words(trellis), scratch, out, rows, n,
            K=bits, G=group_size(bits), CODEBOOK=2, BLOCK_M=block_m, STEPS=k // 128, ASM=use_asm(), FORM=f,
            num_warps=warps,
        )  # fmt: skip
        return out

    if timed:
        return 1000 * triton.testing.do_bench(lambda: launch(form), warmup=25, rep=100)
    got = launch(form)
    want = xh if form == 5 else launch(0)
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - want.double()).norm() / want.double().norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--form", type=int, choices=sorted(FORMS), action="append", help="default: all")
    parser.add_argument("--warps", type=int, action="append", help="default: 4 and 8")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--one", action="store_true", help="run the single --form/--warps here, not in a child")
    args = parser.parse_args()
    forms, warps = args.form or sorted(FORMS), args.warps or [4, 8]
    if args.one:
        err = run_form(forms[0], warps[0], args.device, args.rows)
        timing = ""
        if err < 5e-3 and args.device == "cuda":  # a correct form: how long it takes on a 4096 x 4096 layer
            us = run_form(forms[0], warps[0], args.device, args.rows, k=4096, n=4096, timed=True)
            timing = f", {us:.1f} us at 4096 x 4096 (32 programs, no split-K: compare forms, not kernels)"
        print(f"{'ok' if err < 5e-3 else 'WRONG'} {err:.2e}{timing}")
        return 0 if err < 5e-3 else 1
    for form in forms:
        for w in warps:
            cmd = [sys.executable, __file__, "--one", "--form", str(form), "--warps", str(w), "--rows", str(args.rows),
                   "--device", args.device]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
            lines = (done.stdout + done.stderr).strip().splitlines() or ["(no output)"]
            verdict = lines[-1] if done.stdout.strip() else f"CRASHED: {lines[-1][:160]}"
            print(f"form {form} ({FORMS[form]}), {w} warps, {args.rows} rows: {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
