"""End-to-end greedy decode of a synthetic Llama-3-8B-shaped EXL3 model on one CUDA GPU, against Hugging Face
transformers bf16 with the same shapes (random weights) measured in the same run.

    python bench/e2e_decode.py [--new-tokens 128] [--batches 1,8,32] [--no-graphs] [--no-hf] [--out DIR]
    python bench/e2e_decode.py --tiny      # CPU check of this script's logic on a two-layer model (timings meaningless)

1. Ceiling: device-to-device copy bandwidth (bytes read + written, as bench/exl3_kernels.py counts it).
2. Synthesize the model (4.0 bpw body, MUL1, 6-bit head: ExLlamaV3's defaults) into a temp dir and load it with our
   loader; GPU memory it holds against its file size (goal: <= 1.05x, KV cache apart).
3. For each batch size: one prefill of a fixed 16-token prompt per sequence, then timed decode steps (tokens read
   back to the host every step, as a server must):
   - "eager": a fresh ForwardBatch per step, as the engine builds it today;
   - "graph": fixed input buffers and one attention plan sized for the longest context (its per-sequence lengths
     live on the GPU and are updated in place), the whole forward captured once in a CUDA graph and replayed. Its
     greedy tokens are checked against the eager ones. This is the hook the engine needs for CUDA-graph decode.
     ("static" with --no-graphs or on CPU: the same buffers, the forward run directly.)
4. Baseline: transformers LlamaForCausalLM bf16 built from a config on the GPU, greedy decode with its own KV cache
   (a plain loop of forwards), and at batch 1 also generate() with its static cache; the faster is the baseline.
5. Roofline: weight bytes read per decode step / copy bandwidth (KV reads ignored).
Results go to $OUT/e2e_decode.json (or --out DIR); a short table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import tokenizers
import torch
from tokenizers import pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_worker.batch import ForwardBatch  # noqa: E402
from inference_worker.engine import Engine, EngineConfig  # noqa: E402
from inference_worker.exl3_linear import PATHS, Exl3Linear, exl3_path  # noqa: E402
from inference_worker.kv_cache import PagedKVCache  # noqa: E402
from inference_worker.loader import load_model  # noqa: E402
from inference_worker.models.decoder import DecoderConfig, DecoderModel  # noqa: E402
from shared.exl3_synth import PRESETS, Preset, synth_model  # noqa: E402
from shared.tokenizer import ModelTokenizer  # noqa: E402
from shared.wire import GenerationRequest, SamplingParams  # noqa: E402

TINY = Preset(96, 2, 2, 1, 160, 200, False, 10000.0, 512, 1e-5, 1, 2)  # hidden 96 pads to 128: padding exercised
PAGE_SIZE = 16
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy, bytes read + written, median of timed copies."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    else:
        times = []
        for _ in range(10):
            t = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
    return 2 * n / ms / 1e6


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """A fixed prompt per sequence, different between sequences (no shared prefix)."""
    return [[(1000 + 7919 * (b * length + i)) % vocab for i in range(length)] for b in range(batch)]


def weight_bytes_per_step(model: DecoderModel, batch: int) -> int:
    """Bytes of weights one decode step reads: every tensor but the embedding table, plus one embedding row a token."""
    embed = model.embed.weight
    others = [t for t in [*model.parameters(), *model.buffers()] if t.data_ptr() != embed.data_ptr()]
    return tensor_bytes(others) + batch * embed.shape[1] * embed.element_size()


class PagedDecoder:
    """Greedy decode of ``batch`` equal-length prompts through our model and a paged KV cache of exactly their size.

    Sequence b owns pages b*P .. b*P+P-1, so the slot of each (step, sequence) is known in advance.
    """

    def __init__(
        self, model: DecoderModel, config: DecoderConfig, batch: int, prompt_len: int, steps: int, dtype: torch.dtype
    ) -> None:
        self.model, self.config = model, config
        self.batch, self.prompt_len = batch, prompt_len
        self.device = model.embed.weight.device
        self.max_context = prompt_len + steps
        pages = -(-self.max_context // PAGE_SIZE)
        self.cache = PagedKVCache(
            config.num_hidden_layers,
            batch * pages,
            PAGE_SIZE,
            config.num_key_value_heads,
            config.head_dim,
            dtype,
            self.device,
        )
        self.tables = torch.arange(batch * pages, device=self.device).view(batch, pages)
        pos = torch.arange(prompt_len, self.max_context, device=self.device)
        # slot of the token at step t of sequence b: [steps, batch]
        self.slots = (self.tables[:, pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE).t().contiguous()
        self.rows = torch.arange(batch, device=self.device)

    @property
    def kv_cache_bytes(self) -> int:
        return tensor_bytes([*self.cache.k, *self.cache.v])

    def prefill(self, ids: list[list[int]]) -> torch.Tensor:
        """Writes every prompt's K/V; returns the first greedy token of each sequence [batch]."""
        p = self.prompt_len
        positions = torch.arange(p, device=self.device).repeat(self.batch)
        slots = self.tables[:, torch.arange(p, device=self.device) // PAGE_SIZE] * PAGE_SIZE
        slots = slots + torch.arange(p, device=self.device) % PAGE_SIZE
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=self.device).flatten(),
            positions=positions,
            query_lens=[p] * self.batch,
            context_lens=[p] * self.batch,
            block_tables=self.tables,
            slot_mapping=slots.flatten(),
            logits_indices=self.rows * p + p - 1,
        )
        with torch.inference_mode():
            return self.model(batch, self.cache).argmax(-1)

    def decode_eager(self, first: torch.Tensor, steps: int) -> tuple[list[list[int]], float]:
        """A fresh ForwardBatch per step (what the engine does). (tokens per step, seconds of the decode steps)."""
        cur, tokens = first.clone(), []
        sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for t in range(steps):
                pos = self.prompt_len + t
                batch = ForwardBatch(
                    input_ids=cur,
                    positions=torch.full((self.batch,), pos, dtype=torch.int64, device=self.device),
                    query_lens=[1] * self.batch,
                    context_lens=[pos + 1] * self.batch,
                    block_tables=self.tables,
                    slot_mapping=self.slots[t],
                    logits_indices=self.rows,
                )
                cur = self.model(batch, self.cache).argmax(-1)
                tokens.append(cur.tolist())  # the host needs every token to stream it
        return tokens, time.perf_counter() - start

    def _static_batch(self) -> tuple[ForwardBatch, torch.Tensor]:
        """Decode inputs in fixed buffers, and an attention plan built for the longest context whose per-sequence
        lengths (``ctx_len``, on the device) are updated in place each step: a CUDA graph can replay over them."""
        from kernels.paged_attention import plan_attention

        batch = ForwardBatch(
            input_ids=torch.zeros(self.batch, dtype=torch.int64, device=self.device),
            positions=torch.zeros(self.batch, dtype=torch.int64, device=self.device),
            query_lens=[1] * self.batch,
            context_lens=[self.max_context] * self.batch,
            block_tables=self.tables,
            slot_mapping=self.slots[0].clone(),
            logits_indices=self.rows,
        )
        plan = plan_attention(
            [1] * self.batch,
            [self.max_context] * self.batch,
            self.config.num_attention_heads,
            self.config.num_key_value_heads,
            self.device,
        )
        batch._attention_plan = plan  # type: ignore[attr-defined] # read by inference_worker.attention.attend_paged
        return batch, plan.ctx_len

    def decode_static(self, first: torch.Tensor, steps: int, graph: bool) -> tuple[list[list[int]], float]:
        """Decode over fixed input buffers, the whole forward replayed from one CUDA graph when ``graph`` (else run
        directly: the same bookkeeping, checkable on CPU). (tokens per step, seconds of the decode steps)."""
        batch, ctx_len = self._static_batch()

        def set_step(t: int) -> None:
            pos = self.prompt_len + t
            batch.positions.fill_(pos)
            batch.slot_mapping.copy_(self.slots[t])
            ctx_len.fill_(pos + 1)  # what the attention kernel reads (inside a graph too)
            batch.context_lens[:] = [pos + 1] * self.batch  # what the CPU reference reads

        batch.input_ids.copy_(first)
        set_step(0)

        def forward() -> torch.Tensor:
            return self.model(batch, self.cache)

        cuda_graph = None
        if graph:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.inference_mode(), torch.cuda.stream(side):
                for _ in range(2):  # compiles every kernel and settles the allocator before capture
                    forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(cuda_graph):
                logits = forward()

        tokens = []
        sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for t in range(steps):
                set_step(t)
                if cuda_graph is not None:
                    cuda_graph.replay()
                else:
                    logits = forward()
                cur = logits.argmax(-1)
                batch.input_ids.copy_(cur)
                tokens.append(cur.tolist())
        seconds = time.perf_counter() - start
        del cuda_graph
        return tokens, seconds


def profile_eager(dec: PagedDecoder, first: torch.Tensor, steps: int = 3, top: int = 25) -> list[dict]:
    """Where an eager decode step's host time goes: torch.profiler over ``steps`` steps, the ``top`` ops by self CPU
    time (printed, and returned for the JSON)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dec.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        dec.decode_eager(first, steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    print(table, flush=True)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {"op": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total} for e in rows
    ]


def best_tok_s(res: dict) -> float:
    engine = [res.get(k, {}).get("tok_s", 0.0) for k in ("engine_off", "engine_auto")]
    return max(*(res.get(k, 0.0) for k in ("eager_tok_s", "static_tok_s", "graph_tok_s")), *engine)


def match_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of (step, sequence) tokens two greedy runs agree on, counting each sequence up to its first difference
    (after one differs, the two continue from different contexts)."""
    if not a:
        return 1.0
    agree = 0
    for s in range(len(a[0])):
        for t in range(len(a)):
            if a[t][s] != b[t][s]:
                break
            agree += 1
    return agree / (len(a) * len(a[0]))


def run_ours(
    model: DecoderModel,
    config: DecoderConfig,
    batch: int,
    prompt_len: int,
    steps: int,
    dtype: torch.dtype,
    graphs: bool,
    base_mem: int,
    profile: bool = False,
) -> dict:
    dec = PagedDecoder(model, config, batch, prompt_len, steps, dtype)
    res: dict = {"batch": batch, "kv_cache_bytes": dec.kv_cache_bytes}
    first = dec.prefill(prompts(batch, prompt_len, config.vocab_size))
    dec.decode_eager(first, min(2, steps))  # compile this batch size's kernels before timing
    eager_tokens, seconds = dec.decode_eager(first, steps)
    res["eager_s"] = seconds
    res["eager_tok_s"] = batch * steps / seconds
    log(f"ours batch {batch}: eager {res['eager_tok_s']:.1f} tok/s")
    mode = "graph" if graphs else "static"
    try:
        tokens, seconds = dec.decode_static(first, steps, graph=graphs)
        tok_s, same = batch * steps / seconds, match_fraction(tokens, eager_tokens)
        res.update({f"{mode}_s": seconds, f"{mode}_tok_s": tok_s, f"{mode}_matches_eager": same})
        log(f"ours batch {batch}: {mode} {tok_s:.1f} tok/s (same tokens as eager: {same:.3f})")
    except Exception as exc:  # keep the eager numbers; say why the static/graph run failed
        res[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"
        log(f"ours batch {batch}: {mode} decode failed: {res[f'{mode}_error']}")
        traceback.print_exc()
    if dec.device.type == "cuda":
        sync(dec.device)
        res["peak_minus_kv_bytes"] = torch.cuda.max_memory_allocated(dec.device) - base_mem - dec.kv_cache_bytes
    res["first_tokens"] = eager_tokens[: min(4, steps)]
    if profile:
        res["eager_profile"] = profile_eager(dec, first)
    del dec
    return res


def byte_tokenizer() -> ModelTokenizer:
    """A 256-token byte-level tokenizer: the engine needs one for pieces and eos; a synthetic model's ids past it
    detokenize to nothing, which costs the same as real text."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    return ModelTokenizer(tok, name="bytes")


def run_engine(
    model: DecoderModel, config: DecoderConfig, batch: int, prompt_len: int, steps: int, graphs: str
) -> dict:
    """The worker's own engine (scheduler, sampling, detokenizing, events) decoding ``batch`` greedy requests:
    tokens/s over the steps after every prefill is done. ``graphs``: EngineConfig.decode_graphs."""
    cfg = EngineConfig(
        device=str(model.embed.weight.device),
        max_batch_size=max(batch, 1),
        max_batch_tokens=max(2048, batch * prompt_len),
        kv_page_size=PAGE_SIZE,
        kv_cache_tokens=batch * PAGE_SIZE * -(-(prompt_len + steps + 1) // PAGE_SIZE),
        max_model_len=prompt_len + steps + 1,
        decode_graphs=graphs,
    )
    engine = Engine(model, config, byte_tokenizer(), cfg)
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)

    def generate() -> tuple[float, int]:
        for i, ids in enumerate(prompts(batch, prompt_len, config.vocab_size)):
            engine.add_request(GenerationRequest(f"r{i}", "bench", ids, params))
        while engine.scheduler.waiting or any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.running):
            engine.step()  # prefill (not timed)
        sync(engine.device)
        start, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += sum(len(e["token_ids"]) for _, e in engine.step() if e["type"] == "delta")
        return time.perf_counter() - start, tokens

    generate()  # captures this batch's graphs, compiles its kernels
    seconds, tokens = generate()
    return {"tok_s": tokens / seconds, "tokens": tokens, **engine.stats()}


def build_hf(p: Preset, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the preset's shapes and random weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=p.vocab,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        head_dim=p.hidden // p.heads,
        max_position_embeddings=p.max_positions,
        rms_norm_eps=p.rms_norm_eps,
        rope_theta=p.rope_theta,
        tie_word_embeddings=p.tied,
        bos_token_id=p.bos,
        eos_token_id=p.eos,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval().requires_grad_(False)  # .to: a no-op unless this version ignored the default


def hf_loop(model: torch.nn.Module, ids: list[list[int]], steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` greedy decode steps with transformers' own (dynamic) KV cache, after one prefill."""
    x = torch.tensor(ids, device=device)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer transformers rename past_key_values; both work
        out = model(input_ids=x, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.tolist()
        return time.perf_counter() - start


def hf_generate_static(model: torch.nn.Module, ids: list[list[int]], steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` decode steps of generate() with a static cache: generate(1 + steps) minus generate(1)."""
    x = torch.tensor(ids, device=device)

    def generate(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            disable_compile=True,  # its automatic torch.compile ran past a 140 s budget on the H200 (2026-11-29)
            pad_token_id=model.config.eos_token_id,
        )
        sync(device)
        return time.perf_counter() - start

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generate(2)  # warm-up
        return max(1e-9, generate(1 + steps) - generate(1))


def run_hf(
    p: Preset, batches: list[int], prompt_len: int, steps: int, dtype: torch.dtype, device: torch.device
) -> dict:
    model = build_hf(p, dtype, device)
    res: dict = {"weight_bytes": tensor_bytes([*model.parameters(), *model.buffers()])}
    embed = model.get_input_embeddings().weight
    res["weight_bytes_per_step"] = res["weight_bytes"] - embed.numel() * embed.element_size()
    for batch in batches:
        ids = prompts(batch, prompt_len, p.vocab)
        hf_loop(model, ids, min(2, steps), device)  # warm-up
        seconds = hf_loop(model, ids, steps, device)
        row = {"loop_tok_s": batch * steps / seconds}
        log(f"transformers batch {batch}: plain loop {row['loop_tok_s']:.1f} tok/s")  # before anything that may hang
        if batch == 1:
            try:
                row["generate_static_tok_s"] = steps / hf_generate_static(model, ids, steps, device)
            except Exception as exc:  # generate's cache options move between transformers versions
                row["generate_static_error"] = f"{type(exc).__name__}: {exc}"
        row["tok_s"] = max(v for k, v in row.items() if k.endswith("tok_s"))
        res[f"batch{batch}"] = row
        log(f"transformers batch {batch}: {row}")
    del model
    return res


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("triton", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def model_file_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a two-layer model on the CPU: checks this script's logic")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--codebook", default="mul1")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="timed decode steps (default 128; --tiny 8)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--path", choices=PATHS, default=None, help="force the EXL3 path (default: the device's)")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile 3 eager steps at the first batch size")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse (or keep) the synthesized model here")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    return ap.parse_args(argv)


def print_table(r: dict) -> None:
    print(f"\n== e2e decode: {r['model']} on {r['device_name']} ({r['dtype']}), {r['new_tokens']} new tokens ==")
    mem = r["memory"]
    print(
        f"memory: model {mem['model_bytes'] / 2**30:.3f} GiB vs file {mem['file_bytes'] / 2**30:.3f} GiB "
        f"= {mem['model_over_file']:.3f}x (goal <= 1.05); EXL3 paths {r['exl3_paths']}"
    )
    peaks = [b["peak_minus_kv_over_file"] for b in r["ours"] if "peak_minus_kv_over_file" in b]
    if peaks:
        print(f"peak while decoding, KV cache apart: {max(peaks):.3f}x the file (activations and graph pools included)")
    step_gib = r["weight_bytes_per_step"] / 2**30
    print(f"copy bandwidth {r['copy_GBps']:.0f} GB/s; weight bytes per step {step_gib:.3f} GiB; speeds in tokens/s")
    hf = r.get("transformers", {})
    print(
        f"| batch | ours eager | ours fixed buffers | engine, graphs off / on | transformers {r['dtype']} | speed-up "
        "| of 4-bit roofline |"
    )
    print("|---|---|---|---|---|---|---|")
    for b in r["ours"]:
        best = best_tok_s(b)
        mode = "graph" if "graph_tok_s" in b or "graph_error" in b else "static"
        fixed = "failed" if f"{mode}_error" in b else "-"
        if f"{mode}_tok_s" in b:
            fixed = f"{b[f'{mode}_tok_s']:.1f} ({mode}; same tokens: {b[f'{mode}_matches_eager']:.0%})"
        base = hf.get(f"batch{b['batch']}", {}).get("tok_s")
        base_s, speedup = (f"{base:.1f}", f"{best / base:.2f}x") if base else ("-", "-")
        engine = " / ".join(
            f"{b[k]['tok_s']:.1f}" if "tok_s" in b.get(k, {}) else "failed"
            for k in ("engine_off", "engine_auto", "engine_static")
            if k in b
        )
        cells = [str(b["batch"]), f"{b['eager_tok_s']:.1f}", fixed, engine, base_s, speedup]
        cells.append(f"{b['roofline_fraction']:.0%}")
        print("| " + " | ".join(cells) + " |")
    print(f"total {time.monotonic() - T0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.tiny:
        PRESETS["tiny"] = TINY
        preset, device, dtype = "tiny", torch.device("cpu"), torch.float32
        steps = args.new_tokens or 8
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on the GPU machine, or use --tiny for a CPU check", file=sys.stderr)
            return 2
        preset, device, dtype = args.preset, torch.device("cuda"), torch.bfloat16
        steps = args.new_tokens or 128
    p = PRESETS[preset]
    graphs = device.type == "cuda" and not args.no_graphs
    r: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": f"{preset} EXL3 {args.bits} bpw {args.codebook}, head {args.head_bits} bits",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, **package_versions()},
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_len": args.prompt_len,
        "new_tokens": steps,
        "memory": {},
    }
    r["copy_GBps"] = copy_bandwidth(device)
    log(f"copy bandwidth {r['copy_GBps']:.0f} GB/s")

    with tempfile.TemporaryDirectory(prefix="e2e-decode-") as tmp:
        model_dir = args.model_dir or Path(tmp) / preset
        if not (model_dir / "config.json").is_file():
            synth_model(preset, args.bits, model_dir, codebook=args.codebook, head_bits=args.head_bits)
            log(f"synthesized {model_dir}")
        r["memory"]["file_bytes"] = model_file_bytes(model_dir)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if args.path:
            with exl3_path(args.path):
                model, config = load_model(model_dir, device, dtype)
        else:
            model, config = load_model(model_dir, device, dtype)
        sync(device)
        log("loaded")
        paths = [m.path for m in model.modules() if isinstance(m, Exl3Linear)]
        r["exl3_paths"] = {path: paths.count(path) for path in sorted(set(paths))}
        mem = r["memory"]
        if device.type == "cuda":
            mem["model_bytes"] = torch.cuda.memory_allocated(device) - base_mem
            mem["load_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base_mem
        else:
            mem["model_bytes"] = tensor_bytes([*model.parameters(), *model.buffers()])
        mem["model_over_file"] = mem["model_bytes"] / mem["file_bytes"]
        r["weight_bytes_per_step"] = weight_bytes_per_step(model, 1)

        r["ours"] = []
        for batch in batches:
            profile = args.profile and batch == batches[0]
            res = run_ours(model, config, batch, args.prompt_len, steps, dtype, graphs, base_mem, profile)
            best = best_tok_s(res)
            roofline = batch * r["copy_GBps"] * 1e9 / weight_bytes_per_step(model, batch)
            res["roofline_tok_s"] = roofline
            res["roofline_fraction"] = best / roofline
            if "peak_minus_kv_bytes" in res:
                res["peak_minus_kv_over_file"] = res["peak_minus_kv_bytes"] / mem["file_bytes"]
            for mode in ("off", "auto" if device.type == "cuda" else "static"):
                try:
                    res[f"engine_{mode}"] = run_engine(model, config, batch, args.prompt_len, steps, mode)
                    log(f"engine batch {batch}, decode graphs {mode}: {res[f'engine_{mode}']['tok_s']:.1f} tok/s")
                except Exception as exc:  # keep the other numbers
                    traceback.print_exc()
                    res[f"engine_{mode}"] = {"error": f"{type(exc).__name__}: {exc}"}
            r["ours"].append(res)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.no_hf:
        try:
            r["transformers"] = run_hf(p, batches, args.prompt_len, steps, dtype, device)
        except Exception as exc:  # our numbers stand on their own; say why the baseline is missing
            traceback.print_exc()
            r["transformers"] = {"error": f"{type(exc).__name__}: {exc}", "weight_bytes_per_step": 0}
        hf1 = r["transformers"].get("batch1", {}).get("tok_s")
        ours1 = next((b for b in r["ours"] if b["batch"] == 1), None)
        if hf1 and ours1:
            r["speedup_batch1"] = best_tok_s(ours1) / hf1
        if r["transformers"]["weight_bytes_per_step"]:
            r["transformers"]["roofline_tok_s"] = r["copy_GBps"] * 1e9 / r["transformers"]["weight_bytes_per_step"]

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "e2e_decode.json").write_text(json.dumps(r, indent=2))
    print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
