"""Where an engine step's time goes: prompt steps against decode steps, on the default model.

    python bench/step_profile.py [--prompts 1 4] [--repeat 8] [--max-tokens 8]

For each prompt count n: n chat prompts are added at once and stepped to the end, ``--repeat`` times; prints the
median wall time of the step that prefills them (the prompt step) and of the decode steps after it. Then, for one
prompt: the prompt step under cProfile (the Python functions that hold it, by own time) and under torch.profiler (GPU
kernel time and launches against the wall time: a step much longer than its kernels is bound by the host).
A closed-loop client whose request lands just after a prompt step began waits for all of it, so this step's length is
what the serving benchmark's queue time shows at concurrency above one.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e_decode import sync  # noqa: E402
from inference_worker.engine import Engine  # noqa: E402
from shared.default_model import ensure_default_model  # noqa: E402
from shared.settings import DEFAULT_MODEL_ID, load_settings  # noqa: E402
from shared.tokenizer import ModelTokenizer  # noqa: E402
from shared.wire import GenerationRequest, SamplingParams  # noqa: E402

QUESTIONS = ["Explain why the sky is blue.", "Write a haiku about autumn.", "List three uses of a paperclip.",
             "What is the difference between weather and climate?"]


class StepTimer:
    """Adds chat requests to an engine and times its steps."""

    def __init__(self, engine: Engine, tokenizer: ModelTokenizer, max_tokens: int) -> None:
        self.engine, self.tokenizer, self.max_tokens = engine, tokenizer, max_tokens
        self.count = 0

    def add(self, n: int) -> None:
        for _ in range(n):
            question = QUESTIONS[self.count % len(QUESTIONS)]
            ids = self.tokenizer.chat_prompt_ids([{"role": "user", "content": question}])
            params = SamplingParams(max_tokens=self.max_tokens, temperature=0, ignore_eos=True)
            self.engine.add_request(GenerationRequest(id=f"r{self.count}", model=DEFAULT_MODEL_ID, prompt_ids=ids,
                                                      params=params))
            self.count += 1

    def step(self) -> float:
        sync(self.engine.device)
        start = time.perf_counter()
        self.engine.step()
        sync(self.engine.device)
        return time.perf_counter() - start

    def run(self, n: int) -> tuple[float, list[float]]:
        """(prompt step seconds, decode steps' seconds) for n prompts added together."""
        self.add(n)
        prompt = self.step()
        decode = []
        while self.engine.has_work():
            decode.append(self.step())
        return prompt, decode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--top", type=int, default=25, help="functions listed from the profile")
    args = ap.parse_args()
    settings = load_settings(max_batch_size=max(args.prompts))
    ensure_default_model(settings.models_dir)
    model_dir = settings.models_dir / DEFAULT_MODEL_ID
    engine = Engine.from_settings(model_dir, settings, model_id=DEFAULT_MODEL_ID)
    timer = StepTimer(engine, ModelTokenizer.from_dir(model_dir), args.max_tokens)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {device}, torch {torch.__version__}")
    started = time.perf_counter()
    built = engine.warm_up_graphs()  # as the worker does before serving
    prompt_tokens = engine.decode_graphs.prompt_tokens if engine.decode_graphs else 0
    fused = any(getattr(m, "fused", False) for m in engine.model.modules())
    print(f"warm-up: {built} CUDA graphs in {time.perf_counter() - started:.2f} s (prompt graphs up to "
          f"{prompt_tokens} tokens; fused norms and rotary {'on' if fused else 'off'})")
    for n in args.prompts:
        timer.run(n)  # warm-up: compiles kernels and captures this batch size's decode graphs
        prompt_s, decode_s = [], []
        for _ in range(args.repeat):
            p, d = timer.run(n)
            prompt_s.append(p)
            decode_s.extend(d)
        print(f"{n} prompt(s): prompt step {1000 * statistics.median(prompt_s):.2f} ms p50 "
              f"({1000 * min(prompt_s):.2f}-{1000 * max(prompt_s):.2f}), decode step "
              f"{1000 * statistics.median(decode_s):.2f} ms p50")

    profiler = cProfile.Profile()
    for _ in range(args.repeat):
        timer.add(1)
        profiler.enable()
        timer.step()
        profiler.disable()
        while engine.has_work():
            timer.step()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    print(f"cProfile, {args.repeat} prompt steps of one prompt, by own time:")
    print(out.getvalue())

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    timer.add(1)
    with torch.profiler.profile(activities=activities) as prof:
        wall = timer.step()
    while engine.has_work():
        timer.step()
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events)
    launches = sum(e.count for e in events if e.self_device_time_total > 0)
    print(f"torch.profiler, one prompt step: wall {1000 * wall:.2f} ms (profiled), GPU kernels "
          f"{kernel_us / 1000:.2f} ms over ~{launches} kernel-bearing op calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
