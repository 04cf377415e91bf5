"""Serving benchmark: the same workload through the gateway (HTTP/SSE -> Redis -> worker) and in-process.

    python bench/serving.py                          # starts Redis + gateway + worker on the default model
    python bench/serving.py --base-url http://127.0.0.1:8000 --model ID   # against a running suite
    python bench/serving.py --concurrency 1 4 8 --rate 2 --requests 32 --max-tokens 64
    python bench/serving.py --rounds 3      # alternate gateway and in-process runs; the hop is a median of rounds

Reports TTFT, inter-token latency and end-to-end latency (p50/p90/p99), output tokens/s and errors for each load
pattern, with the engine's own split of the TTFT at p50 (queue: from acceptance to the step that first schedules the
request; prefill: from there to its first token; served runs read it from the worker's final events, so with
``--base-url`` only when ``--redis-url`` is given), then the same requests driven straight into the engine in this
process, so the cost of the gateway + Redis hop is a ratio measured in one run (goal: <= 3 ms added TTFT at p50, <=
5% added inter-token latency). With ``--rounds N`` the two alternate N times with the suite up throughout (so both
see the same idle background processes) and the hop is reported per round and as the median over rounds: on a noisy
host one pair of runs can differ by more than the hop itself. The in-process side runs the engine as the worker does
(``EngineLoop.run()`` on the main thread) with an asynchronous client on a second thread, so in both a request that
arrives while a step runs joins at the next step; only the gateway, Redis and the worker's intake and publisher are
missing from it. Fixed-rate runs go through both sides too.
Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "List three uses of a paperclip.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "Give me a recipe for a simple tomato soup.",
    "Why do we have seasons on Earth?",
    "Summarise the plot of a detective story in one paragraph.",
]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""
    request_id: str = ""
    # the engine's own split of the TTFT (its final event's timings): from acceptance (the gateway's, or add_request
    # in-process) to the step that first schedules the request, and from there to its first token
    queue: float | None = None
    prefill: float | None = None

    def take_timings(self, timings: dict) -> None:
        if timings.get("ttft_s") is not None:
            self.queue, self.prefill = timings["queue_s"], timings["ttft_s"] - timings["queue_s"]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def summarize(name: str, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    toks = sum(r.tokens for r in ok)
    return {
        "name": name, "requests": len(results), "errors": len(results) - len(ok),
        "ttft_ms": {p: 1000 * pct(ttft, p) for p in (50, 90, 99)},
        "itl_ms": {p: 1000 * pct(itl, p) for p in (50, 90, 99)},
        "e2e_s": {p: pct(e2e, p) for p in (50, 90, 99)},
        "output_tok_s": toks / wall if wall > 0 else 0.0, "wall_s": wall,
        "first_error": next((r.error for r in results if not r.ok), ""),
        "engine_queue_ms": 1000 * pct([r.queue for r in ok if r.queue is not None], 50),
        "engine_prefill_ms": 1000 * pct([r.prefill for r in ok if r.prefill is not None], 50),
    }


async def one_http(session: aiohttp.ClientSession, base: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    res = Result(ok=False)
    last = None
    try:
        async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
            res.request_id = resp.headers.get("X-Request-Id", "")
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no tokens"
    except (TimeoutError, aiohttp.ClientError) as exc:
        res.error = repr(exc)
    return res


async def run_http(base: str, model: str, n: int, max_tokens: int, concurrency: int | None, rate: float | None
                   ) -> tuple[list[Result], float]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sem = asyncio.Semaphore(concurrency or n)

        async def guarded(i: int) -> Result:
            async with sem:
                return await one_http(session, base, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(guarded(i)))
            if rate:
                await asyncio.sleep(1.0 / rate)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def done_timings(client, request_id: str) -> dict | None:
    """The timings of the final ``done`` event a worker left in ``out:{request_id}`` (a synchronous redis client),
    None when there is none (yet)."""
    from shared import names, wire

    for _entry, fields in client.xrange(names.output_stream(request_id)):
        event = wire.unpack(fields[names.PAYLOAD_FIELD])
        if event.get("type") == "done":
            return event["timings"]
    return None


def read_engine_timings(redis_url: str, results: list[Result]) -> None:
    """Fill each served result's engine split from the final event its worker left in ``out:{request_id}``."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for res in results:
            timings = done_timings(client, res.request_id) if res.request_id else None
            if timings is not None:
                res.take_timings(timings)
    finally:
        client.close()


def in_process_engine(model_dir: Path, model: str, max_batch_size: int):
    """An Engine configured and warmed up as the served worker is (``max_batch_size`` and its CUDA graphs included):
    the hop is the only difference."""
    from inference_worker.engine import Engine
    from shared.settings import load_settings

    engine = Engine.from_settings(model_dir, load_settings(max_batch_size=max_batch_size), model_id=model)
    engine.warm_up_graphs()
    return engine


def run_in_process(engine, model_dir: Path, model: str, n: int, max_tokens: int, concurrency: int | None,
                   rate: float | None = None) -> tuple[list[Result], float]:
    """The same requests fed straight into ``engine`` in this process (no gateway, no Redis), the way the worker runs
    it: ``EngineLoop.run()`` steps on this (main) thread while a client thread submits ``concurrency`` requests at a
    time, or one every 1/``rate`` seconds, and reads the events as the loop hands them over. The client is
    asynchronous, as every served client is: a request submitted while a step runs joins at the next step. Event
    times are taken when the loop hands them over (an in-process consumer's best case)."""
    from inference_worker.engine import EngineLoop
    from shared.tokenizer import ModelTokenizer
    from shared.wire import GenerationRequest, SamplingParams

    tok = ModelTokenizer.from_dir(model_dir)
    delivered: queue.SimpleQueue = queue.SimpleQueue()
    loop = EngineLoop(engine, lambda events: delivered.put((time.perf_counter(), events)))
    results: dict[str, Result] = {}
    failure: list[BaseException] = []
    t0 = time.perf_counter()

    def client() -> None:
        pending = list(range(n))
        start: dict[str, float] = {}
        last: dict[str, float] = {}
        in_flight: set[str] = set()

        def submit(i: int) -> None:
            # the clock starts before the chat template and tokenizing, as the gateway's TTFT does; at a fixed rate,
            # when the request was due
            t_submit = t0 + i / rate if rate else time.perf_counter()
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            req = GenerationRequest(id=uuid.uuid4().hex, model=model, prompt_ids=tok.chat_prompt_ids(messages),
                                    params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            start[req.id] = t_submit
            results[req.id] = Result(ok=False)
            in_flight.add(req.id)
            engine.add_request(req)

        deadline = time.perf_counter() + 600.0
        while (pending or in_flight) and time.perf_counter() < deadline:
            while pending and (t0 + pending[0] / rate <= time.perf_counter() if rate
                               else len(in_flight) < (concurrency or 1)):
                submit(pending.pop(0))
            wait = max(0.0, t0 + pending[0] / rate - time.perf_counter()) if rate and pending else 1.0
            try:
                now, events = delivered.get(timeout=wait)
            except queue.Empty:
                continue
            for rid, ev in events:
                r = results[rid]
                if ev["type"] == "delta" and ev.get("text"):
                    if rid not in last:
                        r.ttft = now - start[rid]
                    else:
                        r.itl.append(now - last[rid])
                    last[rid] = now
                elif ev["type"] == "done":
                    r.ok, r.e2e, r.tokens = True, now - start[rid], ev["usage"]["completion_tokens"]
                    r.take_timings(ev["timings"])
                    in_flight.discard(rid)
                elif ev["type"] == "error":
                    r.error = ev["message"]
                    in_flight.discard(rid)

    def guarded_client() -> None:
        try:
            client()
        except BaseException as exc:  # re-raised on the main thread once the loop has stopped
            failure.append(exc)
        finally:
            loop.stop()

    thread = threading.Thread(target=guarded_client, name="bench-client")
    thread.start()
    loop.run()
    thread.join()
    if failure:
        raise failure[0]
    return list(results.values()), time.perf_counter() - t0


def print_table(rows: list[dict]) -> None:
    print(f"{'run':<28}{'req':>5}{'err':>5}{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'ITL p50':>9}{'p90':>8}{'p99':>8}"
          f"{'E2E p50 s':>10}{'tok/s':>8}{'queue':>9}{'prefill':>9}")
    for r in rows:
        t, i, e = r["ttft_ms"], r["itl_ms"], r["e2e_s"]
        print(f"{r['name']:<28}{r['requests']:>5}{r['errors']:>5}{t[50]:>10.1f}{t[90]:>8.1f}{t[99]:>8.1f}"
              f"{i[50]:>9.1f}{i[90]:>8.1f}{i[99]:>8.1f}{e[50]:>10.2f}{r['output_tok_s']:>8.1f}"
              f"{r['engine_queue_ms']:>9.1f}{r['engine_prefill_ms']:>9.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running gateway; default: start Redis + gateway + worker here")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--models-dir", type=Path, help="default: TRELLIS_MODELS_DIR / var/models")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rate", type=float, nargs="*", default=[2.0], help="requests/s for the fixed-rate runs")
    ap.add_argument("--no-in-process", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="alternate gateway and in-process runs this many times")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--redis-url", help="with --base-url: the suite's Redis, to read the workers' own TTFT split")
    args = ap.parse_args()

    from shared.default_model import ensure_default_model
    from shared.settings import load_settings

    settings = load_settings()
    models_dir = args.models_dir or settings.models_dir
    if args.model == settings.default_model:
        ensure_default_model(models_dir)
    rows: list[dict] = []
    max_batch = max(args.concurrency)  # the served worker's and the in-process engine's batch limit

    rounds = max(1, args.rounds)
    in_process = not args.no_in_process

    def tag(r: int) -> str:
        return f" #{r + 1}" if rounds > 1 else ""

    async def http_runs(base: str, r: int, redis_url: str | None) -> None:
        await run_http(base, args.model, 2, 4, 2, None)  # warm-up
        loads = [(f"concurrency={c}{tag(r)}", c, None) for c in args.concurrency]
        loads += [(f"rate={rate}/s", None, rate) for rate in ((args.rate or []) if r == 0 else [])]
        for name, c, rate in loads:
            res, wall = await run_http(base, args.model, args.requests, args.max_tokens, c, rate)
            if redis_url:
                await asyncio.to_thread(read_engine_timings, redis_url, res)
            rows.append(summarize(f"gateway {name}", res, wall))

    engines: list = []

    def in_process_runs(r: int) -> None:
        # one engine for every round, warmed up like the worker is (its warm-up requests), then measured: like the
        # served worker, it captures a CUDA graph for a new shape once, in whichever round first needs it
        if not engines:
            engines.append(in_process_engine(models_dir / args.model, args.model, max_batch))
        engine = engines[0]
        run_in_process(engine, models_dir / args.model, args.model, 2, 4, 2)
        for c in args.concurrency:
            res, wall = run_in_process(engine, models_dir / args.model, args.model, args.requests, args.max_tokens, c)
            rows.append(summarize(f"in-process concurrency={c}{tag(r)}", res, wall))
        for rate in (args.rate or []) if r == 0 else []:
            res, wall = run_in_process(engine, models_dir / args.model, args.model, args.requests, args.max_tokens,
                                       None, rate)
            rows.append(summarize(f"in-process rate={rate}/s", res, wall))

    if args.base_url:
        for r in range(rounds):
            asyncio.run(http_runs(args.base_url, r, args.redis_url))
            if in_process and rounds > 1:
                in_process_runs(r)
    else:
        from shared.redis_server import free_port, start_redis_server
        from tests.suite import running_suite

        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            redis_proc = start_redis_server(port, Path(tmp) / "redis")
            try:
                redis_url = f"redis://127.0.0.1:{port}/0"
                with running_suite(redis_url, models_dir, args.model, Path(tmp),
                                   TRELLIS_MAX_BATCH_SIZE=str(max_batch)) as base:
                    for r in range(rounds):
                        asyncio.run(http_runs(base, r, redis_url))
                        if in_process and rounds > 1:
                            in_process_runs(r)
            finally:
                redis_proc.terminate()
                redis_proc.wait()
    if in_process and rounds == 1:
        in_process_runs(0)  # one round: the suite is stopped first, so the engine has the machine to itself

    print_table(rows)
    by_name = {r["name"]: r for r in rows}
    for c in args.concurrency:
        hops = []
        for r in range(rounds):
            g, p = by_name.get(f"gateway concurrency={c}{tag(r)}"), by_name.get(f"in-process concurrency={c}{tag(r)}")
            if g and p:
                hops.append((g["ttft_ms"][50] - p["ttft_ms"][50], g["itl_ms"][50] / p["itl_ms"][50],
                             g["output_tok_s"] / p["output_tok_s"]))
                print(f"hop cost at concurrency {c}{tag(r)}: TTFT p50 +{hops[-1][0]:.2f} ms, "
                      f"ITL p50 x{hops[-1][1]:.3f}, tok/s x{hops[-1][2]:.3f}")
        if len(hops) > 1:
            ttft, itl, tok = (statistics.median(h[k] for h in hops) for k in range(3))
            print(f"hop cost at concurrency {c}, median of {len(hops)} rounds: TTFT p50 +{ttft:.2f} ms, "
                  f"ITL p50 x{itl:.3f}, tok/s x{tok:.3f}")
    for rate in args.rate or []:
        g, p = by_name.get(f"gateway rate={rate}/s"), by_name.get(f"in-process rate={rate}/s")
        if g and p:
            print(f"hop cost at {rate} requests/s: TTFT p50 +{g['ttft_ms'][50] - p['ttft_ms'][50]:.2f} ms, "
                  f"ITL p50 x{g['itl_ms'][50] / p['itl_ms'][50]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
