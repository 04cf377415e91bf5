"""Decode speed of a synthetic Mixtral-8x7B-shaped model (EXL3 at 3 bits per weight by default) beside its roofline.

    python bench/moe.py                                   # CUDA, full 32-layer 8x7B shapes, EXL3 K=3, batches 1 and 32
    python bench/moe.py --format bf16                     # the same model dense in bf16 (~93 GB)
    python bench/moe.py --preset tiny --device cpu        # a smoke run of every code path on the CPU

The model is built in memory from random weights (random trellis codes are valid EXL3 layers, see
shared/exl3_synth.py): every attention and expert linear is an ``Exl3Linear`` (or ``DenseLinear``), the router is
dense, and it runs through the real ``DecoderModel`` forward with ``SparseMoe`` and the paged KV cache. Each
sequence starts from ``--context`` cached tokens; only decode steps are timed.

Reported per batch size:
- tokens/s: end to end, eager, as the worker runs it today (one forward per step, synchronised).
- roofline: the bytes one step must read (the dense weights, the experts the routing actually picked, the KV cache)
  over the device-to-device copy bandwidth measured in the same run; also the experts-only figure.
- linears floor (CUDA): the same step's linears alone (with the step's real expert group sizes) replayed from a CUDA
  graph, so launch overhead and attention are excluded: how close the EXL3 kernels themselves get to the roofline.
Results go to $OUT/moe.json (or --out); a short table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_worker.batch import ForwardBatch  # noqa: E402
from inference_worker.cuda_graphs import DecodeGraphs  # noqa: E402
from inference_worker.exl3_linear import Exl3Linear  # noqa: E402
from inference_worker.kv_cache import PagedKVCache  # noqa: E402
from inference_worker.layers import DenseLinear, Linear, RMSNorm  # noqa: E402
from inference_worker.models.decoder import MLP, Attention, Block, DecoderConfig, DecoderModel, MoeConfig  # noqa: E402
from inference_worker.moe import SparseMoe  # noqa: E402
from shared.exl3_format import Exl3Tensors, padded  # noqa: E402
from shared.exl3_synth import CODEBOOK_RMS  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    vocab: int


PRESETS = {
    "mixtral-8x7b": Shape(4096, 14336, 32, 32, 8, 8, 2, 32000),
    "tiny": Shape(256, 512, 4, 4, 2, 8, 2, 1000),
}


def random_linear(
    k: int, n: int, fmt: str, bits: int, out_rms: float, gen: torch.Generator, dtype: torch.dtype, device: str
) -> Linear:
    """A k -> n linear mapping unit-RMS inputs to out_rms outputs: EXL3 random codes (K = bits) or dense."""
    if fmt == "bf16":
        return DenseLinear((torch.randn(n, k, generator=gen, device=device) * (out_rms / math.sqrt(k))).to(dtype))
    k_pad, n_pad = padded(k), padded(n)
    shape = (k_pad // 16, n_pad // 16, 16 * bits)
    trellis = torch.randint(-32768, 32768, shape, dtype=torch.int16, generator=gen, device=device)
    suh = torch.zeros(k_pad, device=device)
    svh = torch.zeros(n_pad, device=device)
    suh[:k] = torch.randn(k, generator=gen, device=device).sign()
    svh[:n] = torch.randn(n, generator=gen, device=device).sign() * out_rms / (CODEBOOK_RMS["mul1"] * math.sqrt(k))
    return Exl3Linear(Exl3Tensors(trellis, suh.half(), svh.half(), "mul1", None, k, n), dtype, device)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes a forward reads from this module's weights as stored on the device (codes, scales or dense)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers()) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_model(shape: Shape, fmt: str, bits: int, head_bits: int, dtype: torch.dtype, device: str) -> DecoderModel:
    head_dim = shape.hidden // shape.heads
    config = DecoderConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        rope_scaling=None,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_ids=(2,),
        moe=MoeConfig(shape.experts, shape.top_k, True, tuple(range(shape.layers))),
    )
    gen = torch.Generator(device=device).manual_seed(0)
    residual_rms = 1.0 / math.sqrt(2 * shape.layers)  # each of the 2L residual branches adds about this much

    def linear(k: int, n: int, out_rms: float = 1.0) -> Linear:
        return random_linear(k, n, fmt, bits, out_rms, gen, dtype, device)

    def norm() -> RMSNorm:
        return RMSNorm(torch.ones(shape.hidden, dtype=dtype, device=device), config.rms_norm_eps)

    h, q_out, kv_out = shape.hidden, shape.heads * head_dim, shape.kv_heads * head_dim
    blocks = []
    for i in range(shape.layers):
        attn = Attention(
            config, i, linear(h, q_out), linear(h, kv_out), linear(h, kv_out), linear(q_out, h, residual_rms)
        )
        experts = [
            MLP(
                linear(h, shape.intermediate),
                linear(h, shape.intermediate),
                linear(shape.intermediate, h, residual_rms),
            )
            for _ in range(shape.experts)
        ]
        router = (torch.randn(shape.experts, h, generator=gen, device=device) / math.sqrt(h)).to(dtype)
        blocks.append(Block(norm(), attn, norm(), SparseMoe(router, experts, shape.top_k, True)))
        if (i + 1) % 8 == 0 or i + 1 == shape.layers:
            print(f"built layer {i + 1}/{shape.layers}", flush=True)
    embed = (torch.randn(shape.vocab, h, generator=gen, device=device) * 0.5).to(dtype)
    head = random_linear(h, shape.vocab, fmt, head_bits, 1.0, gen, dtype, device)
    return DecoderModel(config, embed, blocks, norm(), head).to(device).eval().requires_grad_(False)


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy of 1 GiB (64 MiB on the CPU): bytes read + written per second, median."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return 2 * n / (do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median") / 1000)
    times = []
    for _ in range(25):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * n / sorted(times)[len(times) // 2]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class DecodeRun:
    """Sequences that already hold ``context`` tokens in the paged cache, advanced one token per step."""

    def __init__(self, model: DecoderModel, batch: int, context: int, steps: int, page_size: int = 16) -> None:
        cfg = model.config
        self.model, self.batch, self.context, self.page_size = model, batch, context, page_size
        self.pages_per_seq = -(-(context + steps + 8) // page_size)
        device = model.embed.weight.device
        self.scratch_page = batch * self.pages_per_seq  # one page more: decode graphs park padding rows there
        self.max_context = context + steps + 8
        self.cache = PagedKVCache(
            cfg.num_hidden_layers,
            batch * self.pages_per_seq + 1,
            page_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            model.embed.weight.dtype,
            device,
        )
        self.device = device
        self.tables = torch.arange(batch * self.pages_per_seq, device=device).view(batch, self.pages_per_seq)
        self.step_index = 0
        self.tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)

    def kv_bytes(self) -> int:
        """KV-cache bytes the next step reads (every sequence's whole context, all layers)."""
        length = self.context + self.step_index + 1
        return self.batch * length * self.cache.bytes_per_token()

    def step(self, graphs: DecodeGraphs | None = None) -> torch.Tensor:
        """One decode step of every sequence: eagerly, or replayed from ``graphs``."""
        pos = self.context + self.step_index
        slots = self.tables[:, pos // self.page_size] * self.page_size + pos % self.page_size
        batch = ForwardBatch(
            input_ids=self.tokens,
            positions=torch.full((self.batch,), pos, device=self.device),
            query_lens=[1] * self.batch,
            context_lens=[pos + 1] * self.batch,
            block_tables=self.tables,
            slot_mapping=slots,
            logits_indices=torch.arange(self.batch, device=self.device),
        )
        with torch.inference_mode():
            logits = graphs.forward(batch) if graphs is not None else self.model(batch, self.cache)
        self.tokens = logits.argmax(-1)
        self.step_index += 1
        return logits


def record_routing(model: DecoderModel, run: DecodeRun, steps: int) -> list[list[list[int]]]:
    """Per step, per layer: how many of the step's tokens each expert got (group sizes), from the model's router."""
    seen: list[list[list[int]]] = []
    hooks = []

    def record(moe: SparseMoe, args: tuple[torch.Tensor]) -> None:
        _, experts = moe.route(args[0])
        seen[-1].append(torch.bincount(experts.flatten(), minlength=moe.num_experts).tolist())

    for block in model.blocks:
        hooks.append(block.mlp.register_forward_pre_hook(record))
    try:
        for _ in range(steps):
            seen.append([])
            run.step()
    finally:
        for h in hooks:
            h.remove()
    return seen


def linears_floor_ms(model: DecoderModel, batch: int, group_sizes: list[list[int]]) -> float:
    """One decode step's linears only (attention projections, the experts with these group sizes, the head),
    captured in a CUDA graph and replayed: the step time with launches, attention and routing free."""
    from triton.testing import do_bench

    dtype = model.embed.weight.dtype
    hidden = model.config.hidden_size
    x = torch.randn(batch, hidden, device="cuda", dtype=dtype)
    calls = []
    for block, sizes in zip(model.blocks, group_sizes, strict=True):
        attn = block.attn
        calls += [lambda m=m: m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        attn_out = torch.randn(batch, attn.o_proj.in_features, device="cuda", dtype=dtype)
        calls.append(lambda m=attn.o_proj, a=attn_out: m(a))
        for expert, rows in zip(block.mlp.experts, sizes, strict=True):
            if rows:
                xe = torch.randn(rows, hidden, device="cuda", dtype=dtype)
                he = torch.randn(rows, expert.down_proj.in_features, device="cuda", dtype=dtype)
                calls += [lambda e=expert, xe=xe: e.gate_proj(xe), lambda e=expert, xe=xe: e.up_proj(xe)]
                calls.append(lambda e=expert, he=he: e.down_proj(he))
    calls.append(lambda: model.head(x))
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


def graph_decode(model: DecoderModel, run: DecodeRun, steps: int) -> dict:
    """The same decode steps replayed from CUDA graphs, as the worker runs them (every expert over the step's tokens,
    see inference_worker/moe.py): tokens/s, and how far the first replayed step's logits are from an eager step's."""
    graphs = DecodeGraphs(
        model, run.cache, run.batch, run.max_context, run.scratch_page, model.config.num_attention_heads
    )
    index, tokens = run.step_index, run.tokens.clone()
    graphed = run.step(graphs).clone()  # captures
    run.step_index, run.tokens = index, tokens
    eager = run.step()
    rel = float((graphed - eager).norm() / eager.norm())
    sync("cuda")
    t0 = time.perf_counter()
    for _ in range(steps):
        run.step(graphs)
    sync("cuda")
    elapsed = time.perf_counter() - t0
    return {"graph_tokens_per_s": run.batch * steps / elapsed, "graph_step_ms": 1000 * elapsed / steps,
            "graph_vs_eager_logits_rel_err": rel}  # fmt: skip


def bench_batch(model: DecoderModel, batch: int, args: argparse.Namespace, bandwidth: float) -> dict:
    run = DecodeRun(model, batch, args.context, args.warmup + args.count_steps + 2 * args.steps + 2)
    for _ in range(args.warmup):
        run.step()
    routing = record_routing(model, run, args.count_steps)

    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run.step()
    sync(args.device)
    elapsed = time.perf_counter() - t0
    tokens_per_s = batch * args.steps / elapsed

    moe_layers = [block.mlp for block in model.blocks]
    expert_bytes = [module_bytes(moe.experts[0]) for moe in moe_layers]  # every expert of a layer is the same size
    experts_read = [
        sum(sum(1 for n in sizes if n) * nbytes for sizes, nbytes in zip(step, expert_bytes, strict=True))
        for step in routing
    ]
    experts_per_step = sum(experts_read) / len(experts_read)
    all_expert_bytes = sum(module_bytes(e) for moe in moe_layers for e in moe.experts)
    dense_bytes = module_bytes(model) - model.embed.weight.numel() * model.embed.weight.element_size()
    dense_bytes -= all_expert_bytes  # attention, routers, norms, head
    kv = run.kv_bytes()
    step_bytes = dense_bytes + experts_per_step + kv
    result = {
        "batch": batch,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * elapsed / args.steps,
        "experts_hit_per_layer": sum(1 for step in routing for sizes in step for n in sizes if n)
        / (len(routing) * len(moe_layers)),
        "bytes_per_step": {"dense": dense_bytes, "experts_used": experts_per_step, "kv_cache": kv},
        "roofline_tokens_per_s": batch * bandwidth / step_bytes,
        "roofline_experts_only_tokens_per_s": batch * bandwidth / experts_per_step,
    }
    result["fraction_of_roofline"] = tokens_per_s / result["roofline_tokens_per_s"]
    if args.device.startswith("cuda"):
        try:
            result.update(graph_decode(model, run, args.steps))
            result["graph_fraction_of_roofline"] = result["graph_tokens_per_s"] / result["roofline_tokens_per_s"]
        except Exception as exc:  # keep the eager figures
            result["graph_error"] = f"{type(exc).__name__}: {exc}"
        try:
            floor_ms = linears_floor_ms(model, batch, routing[-1])
            result["linears_floor_ms"] = floor_ms
            result["linears_floor_tokens_per_s"] = batch * 1000 / floor_ms
        except Exception as exc:  # the end-to-end figures stand without it; say why it is missing
            result["linears_floor_error"] = f"{type(exc).__name__}: {exc}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mixtral-8x7b")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep it)")
    parser.add_argument("--format", choices=("exl3", "bf16"), default="exl3")
    parser.add_argument("--bits", type=int, default=3, help="EXL3 bits per weight of attention and experts")
    parser.add_argument("--head-bits", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=512, help="tokens already cached per sequence")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--count-steps", type=int, default=4, help="untimed steps whose routing sets the roofline")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per batch size")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu --preset tiny for a smoke run")

    shape = PRESETS[args.preset]
    if args.layers:
        shape = dataclasses.replace(shape, layers=args.layers)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    res: dict = {
        "preset": args.preset,
        "shape": dataclasses.asdict(shape),
        "format": args.format,
        "device": args.device,
    }
    if args.format == "exl3":
        res |= {"bits": args.bits, "head_bits": args.head_bits}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    res["copy_GBps"] = copy_bandwidth(args.device) / 1e9
    print(f"copy bandwidth {res['copy_GBps']:.0f} GB/s (read + write)", flush=True)

    t0 = time.perf_counter()
    model = build_model(shape, args.format, args.bits, args.head_bits, dtype, args.device)
    res["build_s"] = time.perf_counter() - t0
    res["model_GB"] = module_bytes(model) / 1e9
    linear_paths = {getattr(m, "path", "dense") for m in model.modules() if isinstance(m, Linear)}
    res["linear_paths"] = sorted(linear_paths)
    print(f"model {res['model_GB']:.1f} GB built in {res['build_s']:.0f} s, linear paths {res['linear_paths']}")

    res["results"] = []
    for batch in args.batches:
        row = bench_batch(model, batch, args, res["copy_GBps"] * 1e9)
        res["results"].append(row)
        print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe.json").write_text(json.dumps(res, indent=2))
    print(f"\n{args.preset} {args.format}" + (f" K={args.bits}" if args.format == "exl3" else ""), res.get("gpu", ""))
    print(
        f"{'batch':>5} {'eager tok/s':>11} {'graph tok/s':>11} {'roofline':>10} {'experts-only':>13} "
        f"{'graph of roofline':>17} {'floor tok/s':>11}"
    )
    for r in res["results"]:
        floor, graph = r.get("linears_floor_tokens_per_s"), r.get("graph_tokens_per_s")
        print(
            f"{r['batch']:>5} {r['tokens_per_s']:>11.1f} {'-' if graph is None else f'{graph:.1f}':>11} "
            f"{r['roofline_tokens_per_s']:>10.1f} {r['roofline_experts_only_tokens_per_s']:>13.1f} "
            f"{r.get('graph_fraction_of_roofline', 0.0):>17.1%} {'-' if floor is None else f'{floor:.1f}':>11}"
        )


if __name__ == "__main__":
    main()
