"""Many chat sessions sharing one long system prompt: aggregate tokens/s with prefix reuse against without, same run.

    python bench/prefix_reuse.py [--sessions 64] [--system-tokens 1024] [--max-tokens 64] [--json OUT.json]
    python bench/prefix_reuse.py --sessions 8 --system-tokens 256 --max-tokens 8     # a quick CPU check

The worker's own Engine (in process, the default model, bf16 on CUDA / fp32 on CPU) gets ``--sessions`` chat
requests: the first alone, the others together as soon as it has its first token (a prefix cache can only share what
it has computed: requests that arrive in the same step all compute their prompts). Every one has the same system
prompt of about ``--system-tokens`` tokens (Britannica text from tests/data) and a user turn of its own; the engine
runs until all are done, greedy, ``--max-tokens`` new tokens each (eos ignored).
Measured twice, prefix caching on and off, each after an untimed warm-up run of the same shapes (a different system
prompt, so the timed run's reuse starts cold as a fresh deployment's would): wall time, aggregate output tokens/s,
time to first token (p50 / p90), and the prompt tokens the prefix cache supplied instead of computing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference_worker.engine import Engine  # noqa: E402
from shared.default_model import ensure_default_model  # noqa: E402
from shared.settings import load_settings  # noqa: E402
from shared.tokenizer import ModelTokenizer  # noqa: E402
from shared.wire import GenerationRequest, SamplingParams  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval" / "britannica-11th-slice.txt"
QUESTIONS = ["Summarize the entry.", "Who is it about?", "List three dates it mentions.", "What is the tone?"]


def system_prompt(tok: ModelTokenizer, tokens: int, offset: int) -> str:
    """About ``tokens`` tokens of reference text, starting ``offset`` characters in."""
    text = TEXT.read_text(encoding="utf-8")[offset:]
    ids = tok.encode(text, add_special_tokens=False)[:tokens]
    return "Answer questions about this reference text.\n\n" + tok.decode(ids)


def run(engine: Engine, tok: ModelTokenizer, system: str, sessions: int, max_tokens: int) -> dict:
    """All sessions at once; until every one is done."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    hits_before = engine.metrics.prefix_cache_hits._value.get()
    start, first, tokens = time.perf_counter(), {}, 0

    def add(i: int) -> None:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Session {i}: {QUESTIONS[i % len(QUESTIONS)]}"},
        ]
        engine.add_request(GenerationRequest(f"s{i}", "bench", tok.chat_prompt_ids(messages), params))
        first.pop(f"s{i}", None)

    add(0)  # the first session arrives alone; the rest while it decodes (a cache only shares what it has computed)
    while engine.has_work():
        for rid, event in engine.step():
            if event["type"] == "delta":
                first.setdefault(rid, time.perf_counter() - start)
                tokens += len(event["token_ids"])
        if len(first) == 1 and "s0" in first and sessions > 1 and "s1" not in engine._requests:
            for i in range(1, sessions):
                add(i)
    seconds = time.perf_counter() - start
    ttft = sorted(first.values())
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "tok_s": tokens / seconds,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "prefix_hit_tokens": engine.metrics.prefix_cache_hits._value.get() - hits_before,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = load_settings()
    model_dir = ensure_default_model(Path(settings.models_dir))
    tok = ModelTokenizer.from_dir(model_dir)
    results: dict = {"sessions": args.sessions, "system_tokens": args.system_tokens, "max_tokens": args.max_tokens}
    for caching in (True, False):
        engine = Engine.from_settings(
            model_dir, load_settings(prefix_caching=caching, max_batch_size=args.sessions, max_batch_tokens=8192)
        )
        run(engine, tok, system_prompt(tok, args.system_tokens, 20_000), args.sessions, args.max_tokens)  # warm-up
        res = run(engine, tok, system_prompt(tok, args.system_tokens, 0), args.sessions, args.max_tokens)
        results["with_reuse" if caching else "without_reuse"] = res
        print(
            f"prefix caching {'on ' if caching else 'off'}: {res['tok_s']:.1f} tok/s, {res['seconds']:.2f} s, "
            f"TTFT p50 {1000 * res['ttft_p50_s']:.0f} ms p90 {1000 * res['ttft_p90_s']:.0f} ms, "
            f"{res['prefix_hit_tokens']:.0f} prompt tokens from the cache",
            flush=True,
        )
        del engine
    on, off = results["with_reuse"], results["without_reuse"]
    results["throughput_ratio"] = on["tok_s"] / off["tok_s"]
    speedup = off["ttft_p50_s"] / on["ttft_p50_s"]
    print(f"with reuse / without: {results['throughput_ratio']:.2f}x tokens/s, TTFT p50 {speedup:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
