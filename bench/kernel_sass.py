"""Compile a Triton kernel for Hopper (sm_90a) on any machine, GPU or not, and count what its inner loop issues:
registers, spills, shared memory, and the SASS instructions of the loop by opcode.

    python bench/kernel_sass.py [--formats fp16,K4/V4,...] [--block-n 64] [--warps 4] [--stages 2]
                                [--word-loads 1,0] [--keys-major 1,0] [--decode-group 4] [--json FILE]
    python bench/kernel_sass.py --exl3-gemv [--bits 2,4] [--codebook mul1] [--rows 16] [--warps 8] [--prefetch 0,1]

The first form counts the paged-attention decode kernel (instructions per key); the second the EXL3 small-batch
weight kernel (instructions per weight).

Triton lowers the kernel to PTX and Triton's own ptxas (shipped in the wheel) assembles it; nothing runs. The
signature mirrors what the JIT specializes at run time on real tensors (16-byte aligned pointers, strides that are
multiples of 16), so the code is the code a GPU would load. Instructions per key (the loop's instructions times the
warps that issue them, over the keys one iteration covers) is the figure to compare between variants: on a GPU
that hides memory latency, it bounds the step time from below. Timings still need the GPU (bench/kv_cache.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.kv_cache import int_list, parse_formats  # noqa: E402
from kernels import exl3_matmul  # noqa: E402
from kernels import paged_attention as attention  # noqa: E402
from kernels.exl3_reconstruct import CODEBOOK_IDS, group_size  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
PTXAS_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*;", re.M)
BACK_BRANCH = re.compile(r"BRA\s.*?(0x[0-9a-f]+)")
GEMV_STEPS = 4  # 128-row steps per program in the compiled EXL3 weight kernel
# The integer pipe's opcodes: what the ceiling (~3 integer operations per weight, 64 per clock per SM)
# counts. The rest of the loop is loads, the fp16 scale multiply (HFMA2), MMAs and bookkeeping.
INTEGER_OPS = {"IMAD", "IDP", "SHF", "PRMT", "LOP3", "SGXT", "LEA", "IADD3", "ISETP", "SEL", "IABS", "IMNMX", "BMSK"}


@dataclass(frozen=True)
class Variant:
    k_bits: int
    v_bits: int
    block_n: int
    num_warps: int
    num_stages: int
    word_loads: bool
    keys_major: bool
    group: int  # query heads per kv head; one query token per sequence (decode)
    head_dim: int = 128


def hopper_source(kernel: triton.JITFunction, signature: dict, constants: dict, aligned: list[str]) -> ASTSource:
    """The kernel as the JIT would specialize it: constexprs bound, the named arguments known to be multiples of 16
    (pointers from torch's allocator, strides of real shapes)."""
    index = kernel.arg_names.index
    return ASTSource(
        kernel,
        signature,
        constexprs={(index(n),): v for n, v in constants.items()},
        attrs={(index(n),): [["tt.divisibility", 16]] for n in aligned},
    )


def compile_attention(variant: Variant) -> triton.compiler.CompiledKernel:
    """The decode kernel as the JIT would build it for these constexprs, compiled for sm_90a."""
    kernel = attention._paged_attention_kernel
    block_m = max(16, triton.next_power_of_2(variant.group))
    constants = {
        "PAGE_SIZE": 16, "GROUP_SIZE": variant.group, "TOKENS_PER_BLOCK": block_m // variant.group,
        "HEAD_DIM": variant.head_dim, "BLOCK_D": max(16, triton.next_power_of_2(variant.head_dim)),
        "BLOCK_M": block_m, "BLOCK_N": variant.block_n, "HAS_WINDOW": False, "K_BITS": variant.k_bits,
        "V_BITS": variant.v_bits, "SPLIT": True, "WORD_LOADS": variant.word_loads, "KEYS_MAJOR": variant.keys_major,
        "ROTATED_K": variant.k_bits > 0, "ROTATED_V": variant.v_bits > 0, "DOT_PRECISION": None,
    }  # fmt: skip
    float_pointers = {"q_ptr", "out_ptr", "h_ptr"}
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in float_pointers:
            signature[name] = "*bf16"
        elif name.startswith("part_"):
            signature[name] = "*fp32"
        elif name in ("k_ptr", "v_ptr"):
            signature[name] = "*i32" if (variant.k_bits if name == "k_ptr" else variant.v_bits) else "*bf16"
        elif name in ("k_scales_ptr", "v_scales_ptr"):
            signature[name] = "*fp16" if (variant.k_bits if name == "k_scales_ptr" else variant.v_bits) else "*bf16"
        elif name == "block_tables_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        elif name == "sm_scale_log2":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    aligned = [
        n for n in kernel.arg_names if signature[n].startswith("*") or n.startswith("stride") or n == "split_len"
    ]
    source = hopper_source(kernel, signature, constants, aligned)
    return triton.compile(
        source, target=HOPPER, options={"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    )


def assemble(ptx: str) -> tuple[str, str]:
    """(ptxas -v report, SASS listing) of the PTX for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        Path(ptx_path).write_text(ptx)
        report = subprocess.run(
            [str(PTXAS_BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", ptx_path, "-o", cubin],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
        sass = subprocess.run(
            [str(PTXAS_BIN / "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    return report, sass


def inner_loop(sass: str) -> list[str]:
    """Opcodes of the longest backward branch's body: the kernel's key loop."""
    listing = [(int(m.group(1), 16), m.group(2), m.group(0)) for m in INSTRUCTION.finditer(sass)]
    best: tuple[int, int] = (0, 0)
    for i, (address, _, text) in enumerate(listing):
        branch = BACK_BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            start = next(j for j, entry in enumerate(listing) if entry[0] >= int(branch.group(1), 16))
            if i + 1 - start > best[1] - best[0]:
                best = (start, i + 1)
    return [op for _, op, _ in listing[best[0] : best[1]]]


def measure(variant: Variant) -> dict:
    compiled = compile_attention(variant)
    report, sass = assemble(compiled.asm["ptx"])
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    loop = inner_loop(sass)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": compiled.metadata.shared,
        "loop_instructions": len(loop),
        "warp_instructions_per_key": len(loop) * variant.num_warps / variant.block_n,
        "loop_mix": dict(collections.Counter(loop).most_common(12)),
    }


def compile_exl3_gemv(
    bits: int, codebook: str, rows: int, num_warps: int, prefetch: bool, input_hadamard: str = "launch"
) -> triton.compiler.CompiledKernel:
    """The fused EXL3 weight kernel (one 128-column block, two 64-row halves per step) for sm_90a, inline PTX on."""
    kernel = exl3_matmul._gemv_kernel
    constants = {
        "K": bits, "G": group_size(bits), "CODEBOOK": CODEBOOK_IDS[codebook], "BLOCK_M": 16 if rows <= 16 else 32,
        "STEPS": GEMV_STEPS, "ASM": True, "PREFETCH": prefetch, "IN_HAD": exl3_matmul.INPUT_HADAMARD[input_hadamard],
    }  # fmt: skip
    pointer_types = {"xh_ptr": "*fp16" if input_hadamard == "launch" else "*bf16", "words_ptr": "*i32",
                     "part_ptr": "*fp32", "suh_ptr": "*fp16", "h64_ptr": "*fp32"}  # fmt: skip
    signature = {n: "constexpr" if n in constants else pointer_types.get(n, "i32") for n in kernel.arg_names}
    aligned = [n for n, t in signature.items() if t.startswith("*") or n in ("n_cols", "stride_xh")]
    source = hopper_source(kernel, signature, constants, aligned)
    return triton.compile(source, target=HOPPER, options={"num_warps": num_warps, "num_stages": 1})


def measure_exl3_gemv(
    bits: int, codebook: str, rows: int, num_warps: int, prefetch: bool, input_hadamard: str = "launch"
) -> dict:
    """Per 128 x 128 step of the weight kernel: the loop body when the compiler kept the loop, else the whole
    kernel over its steps (an unrolled loop has no backward branch)."""
    compiled = compile_exl3_gemv(bits, codebook, rows, num_warps, prefetch, input_hadamard)
    report, sass = assemble(compiled.asm["ptx"])
    loop = inner_loop(sass)
    per_step = loop if loop else [m.group(2) for m in INSTRUCTION.finditer(sass)]
    scale = 1 if loop else GEMV_STEPS
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": compiled.metadata.shared,
        "loop_instructions": len(per_step) / scale,
        # thread instructions per weight, the unit of the ceiling (~3 integer operations per weight)
        "instructions_per_weight": len(per_step) / scale * num_warps * 32 / (128 * 128),
        "integer_ops_per_weight": sum(op in INTEGER_OPS for op in per_step) / scale * num_warps * 32 / (128 * 128),
        "loop_mix": dict(collections.Counter(per_step).most_common(12)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="fp16,K4/V4,K8/V8,K2/V2", help="fp16 or K<bits>/V<bits>, comma-separated")
    parser.add_argument("--block-n", type=int_list, default=[64])
    parser.add_argument("--warps", type=int_list, default=[4])
    parser.add_argument("--stages", type=int_list, default=[2])
    parser.add_argument(
        "--word-loads", type=int_list, default=[1], help="quantized pages: 1 whole-word loads, 0 gathers"
    )
    parser.add_argument("--keys-major", type=int_list, default=[1, 0])
    parser.add_argument("--decode-group", type=int, default=4, help="query heads per kv head (Llama-3-8B: 4)")
    parser.add_argument("--exl3-gemv", action="store_true", help="count the EXL3 weight kernel instead")
    parser.add_argument("--bits", type=int_list, default=[2, 4], help="--exl3-gemv: trellis bits K")
    parser.add_argument("--codebook", default="mul1", choices=sorted(CODEBOOK_IDS))
    parser.add_argument("--rows", type=int, default=16, help="--exl3-gemv: batch rows (16 or 32 per program)")
    parser.add_argument("--prefetch", type=int_list, default=[0, 1], help="--exl3-gemv: GemvConfig.prefetch")
    parser.add_argument("--input-hadamard", default="launch", help="--exl3-gemv: GemvConfig.input_hadamard values")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for row, line in exl3_gemv_rows(args) if args.exl3_gemv else attention_rows(args):
        rows.append(row)
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def exl3_gemv_rows(args: argparse.Namespace) -> Iterator[tuple[dict, str]]:
    for bits, warps, prefetch, had in product(args.bits, args.warps, args.prefetch, args.input_hadamard.split(",")):
        counts = measure_exl3_gemv(bits, args.codebook, args.rows, warps, bool(prefetch), had)
        row = {"bits": bits, "codebook": args.codebook, "warps": warps, "prefetch": bool(prefetch),
               "input_hadamard": had, **counts}  # fmt: skip
        yield (
            row,
            (
                f"EXL3 K{bits} {args.codebook} warps {warps} prefetch {prefetch} input Hadamard {had}: "
                f"{row['instructions_per_weight']:.2f} instructions per weight ({row['integer_ops_per_weight']:.2f} "
                f"integer), {row['loop_instructions']:.0f} per "
                f"128 x 128 step, {row['registers']} registers, {row['spill_store_bytes']} B spilled, "
                f"{row['shared_bytes']} B shared; {row['loop_mix']}"
            ),
        )


def attention_rows(args: argparse.Namespace) -> Iterator[tuple[dict, str]]:
    for fmt, bits in parse_formats(args.formats).items():
        k_bits, v_bits = (b or 0 for b in bits)  # the kernel's K_BITS / V_BITS: 0 for an unquantized side
        modes = args.word_loads if k_bits or v_bits else [1]
        for n, w, s, wl, km in product(args.block_n, args.warps, args.stages, modes, args.keys_major):
            variant = Variant(k_bits, v_bits, n, w, s, bool(wl), bool(km), args.decode_group)
            row = {"format": fmt, **variant.__dict__, **measure(variant)}
            major = "keys" if km else "queries"
            line = (
                f"{fmt:6} block {n:3} warps {w} stages {s} words {wl} {major}-major: "
                f"{row['warp_instructions_per_key']:6.1f} warp instructions per key, loop {row['loop_instructions']}, "
                f"{row['registers']} registers, {row['spill_store_bytes']} B spilled, {row['shared_bytes']} B shared"
            )
            yield row, line


if __name__ == "__main__":
    sys.exit(main())
