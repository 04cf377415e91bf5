"""Where the time to first token goes through the suite: sequential streaming chat requests, each split into
    gateway → worker   the worker's ``queue_s``: from the gateway's admission start (registry check, chat template,
                       tokenizing, queue reservation, XADD) to the worker scheduling it
    worker             the worker's ``ttft_s`` minus ``queue_s``: prefill and the first sample, in the worker
    worker → client    the client's first content chunk minus the worker's ``ttft_s``: XADD, XREAD, SSE, parse
The worker's timings come from its final ``done`` event, read back from ``out:{request_id}`` in Redis. Then the same
chats go straight into an Engine in this process (the worker's settings; clock started before the chat template):
    in-process         its time to the first delta, and the engine's own prefill (``ttft_s - queue_s``)
so the hop (client TTFT minus in-process TTFT) and the worker's prefill against the engine's alone come from one run.

    python bench/hop_probe.py [--requests 12] [--max-tokens 8]

Starts its own redis-server, gateway and worker on the default model; loopback only; bounded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving import done_timings  # noqa: E402
from shared.redis_server import free_port, start_redis_server  # noqa: E402
from shared.settings import DEFAULT_MODEL_ID, load_settings  # noqa: E402
from tests.suite import running_suite  # noqa: E402


def first_content_seconds(base: str, body: dict) -> tuple[str, float]:
    req = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start, first = time.perf_counter(), None
    with urllib.request.urlopen(req, timeout=120) as resp:
        request_id = resp.headers["X-Request-Id"]
        for raw in resp:
            line = raw.decode().strip()
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{request_id}: no content arrived")
    return request_id, first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()
    models_dir = load_settings().models_dir
    from shared.default_model import ensure_default_model

    ensure_default_model(models_dir)
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis_server(port, Path(tmp) / "redis")
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url)
        try:
            with running_suite(url, models_dir, DEFAULT_MODEL_ID, Path(tmp)) as base:
                for i in range(args.requests + 1):  # the first one warms up
                    request_id, client_ttft = first_content_seconds(base, chat(i, args.max_tokens))
                    timings = done_timings(r, request_id)
                    if timings is None:
                        raise RuntimeError(f"{request_id}: its worker left no done event")
                    if i:
                        rows.append((timings["queue_s"], timings["ttft_s"] - timings["queue_s"],
                                     client_ttft - timings["ttft_s"], client_ttft))
        finally:
            server.terminate()
            server.wait()
    local = in_process(models_dir, args.requests, args.max_tokens)
    # The same loop on a plain thread shows what stepping off the main thread costs (why the worker steps on its own).
    threaded: list = []
    runner = threading.Thread(target=lambda: threaded.extend(in_process(models_dir, args.requests, args.max_tokens)))
    runner.start()
    runner.join()
    names_ = ("gateway -> worker", "worker (prefill)", "worker -> client", "client TTFT")
    print(f"{'ms, p50 (min-max) over ' + str(len(rows)) + ' requests':<40}")
    for k, name in enumerate(names_):
        xs = [row[k] * 1000 for row in rows]
        print(f"{name:<28} {statistics.median(xs):8.1f}  ({min(xs):.1f}-{max(xs):.1f})")
    for k, name in enumerate(("in-process prefill", "in-process TTFT")):
        for where, rows_ in (("", local), (", thread", threaded)):
            xs = [row[k] * 1000 for row in rows_]
            print(f"{name + where:<28} {statistics.median(xs):8.1f}  ({min(xs):.1f}-{max(xs):.1f})")
    hop = statistics.median(r[3] for r in rows) - statistics.median(r[1] for r in local)
    print(f"{'hop (TTFT p50 diff)':<28} {hop * 1000:8.1f}")
    return 0


def chat(i: int, max_tokens: int) -> dict:
    return {"model": DEFAULT_MODEL_ID, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": f"Tell me one fact about the number {i}."}]}


def in_process(models_dir: Path, requests: int, max_tokens: int) -> list[tuple[float, float]]:
    """(engine prefill, TTFT from before the chat template) for the same chats, one at a time, no gateway or Redis."""
    from inference_worker.engine import Engine
    from shared.tokenizer import ModelTokenizer
    from shared.wire import GenerationRequest, SamplingParams

    model_dir = models_dir / DEFAULT_MODEL_ID
    engine = Engine.from_settings(model_dir, load_settings(), model_id=DEFAULT_MODEL_ID)
    tok = ModelTokenizer.from_dir(model_dir)
    rows = []
    for i in range(requests + 1):  # the first one warms up
        body = chat(i, max_tokens)
        start = time.perf_counter()
        prompt_ids = tok.chat_prompt_ids(body["messages"])
        req = GenerationRequest(id=f"local-{i}", model=DEFAULT_MODEL_ID, prompt_ids=prompt_ids,
                                params=SamplingParams(max_tokens=max_tokens, temperature=0), created=time.time())
        engine.add_request(req)
        first = None
        timings = None
        while timings is None:
            for _rid, ev in engine.step():
                if first is None and ev["type"] == "delta" and ev.get("text"):
                    first = time.perf_counter() - start
                elif ev["type"] == "done":
                    timings = ev["timings"]
        if i and first is not None:
            rows.append((timings["ttft_s"] - timings["queue_s"], first))
    return rows


if __name__ == "__main__":
    sys.exit(main())
