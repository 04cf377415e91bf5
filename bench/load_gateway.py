"""Bounded loopback load test of one gateway: backpressure, no hangs, bounded Redis memory.

    python bench/load_gateway.py                       # both phases, defaults below (about a minute on 2 cores)
    python bench/load_gateway.py --streams 200 --burst 1000    # smaller

It starts its own redis-server and one gateway process (``python -m gateway``) on free loopback ports, and plays the
workers with the wire-level stand-in from tests/gateway_harness.py (real Redis Streams traffic, no model compute: the
gateway is what is measured), in a process of its own so the load generator does not starve it. Two phases:

1. ``--streams`` concurrent SSE streams held open by the one gateway (opened over 8 s, each getting a token a
   second for 20 s).
2. A burst of ``--burst`` requests sent within ``--burst-seconds`` at 10x what the stand-in workers can serve; the
   queue admits what fits (``TRELLIS_MAX_QUEUED_REQUESTS``) and refuses the rest with 429 + Retry-After.

Pass criteria (exit status 1 otherwise): every request ends as 200, or 429/503 with a well-formed error body (429
with Retry-After); none hangs; all streams were open at once in phase 1; Redis memory stays bounded and the output
streams expire afterwards. Every loop is bounded in count and time; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.redis_server import free_port, start_redis_server, wait_for_port  # noqa: E402
from tests.gateway_harness import StandInWorker  # noqa: E402

REQUEST_TIMEOUT_SECONDS = 90  # a request still open after this counts as hung
OUTPUT_TTL_SECONDS = 5  # short, so the run can watch outputs expire


@dataclass
class Outcomes:
    statuses: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)
    malformed: list[str] = field(default_factory=list)
    missing_retry_after: int = 0
    hung: int = 0
    latencies: list[float] = field(default_factory=list)

    def record_error(self, status: int, headers: dict, text: str) -> None:
        try:
            error = json.loads(text)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            self.codes[error["code"]] += 1
        except (ValueError, KeyError, AssertionError, TypeError):
            self.malformed.append(f"{status}: {text[:200]}")
        if status == 429 and "Retry-After" not in headers:
            self.missing_retry_after += 1

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None  # noqa: E731
        return {
            "statuses": dict(self.statuses),
            "error_codes": dict(self.codes),
            "malformed_error_bodies": len(self.malformed),
            "429_without_retry_after": self.missing_retry_after,
            "hung": self.hung,
            "latency_s": {"p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0)},
        }


# -- phase 1: many streams held open -------------------------------------------------------------------------------
async def hold_streams(session: aiohttp.ClientSession, model: str, count: int, tokens: int, ramp: float) -> dict:
    """``count`` streams opened over ``ramp`` seconds (a thundering herd would only test the queue limit, which is
    phase 2's job), each held for ``tokens`` seconds."""
    open_now = 0
    most_open = 0
    outcomes = Outcomes()
    complete_streams = 0

    async def one(i: int) -> None:
        nonlocal open_now, most_open, complete_streams
        await asyncio.sleep(ramp * i / count)
        began = time.monotonic()
        body = {"model": model, "prompt": [1, 2, 3], "max_tokens": tokens, "stream": True}
        try:
            async with session.post("/v1/completions", json=body) as resp:
                outcomes.statuses[resp.status] += 1
                if resp.status != 200:
                    outcomes.record_error(resp.status, dict(resp.headers), await resp.text())
                    return
                open_now += 1
                most_open = max(most_open, open_now)
                deltas = 0
                try:
                    async for line in resp.content:
                        if line.startswith(b"data: [DONE]"):
                            complete_streams += deltas == tokens
                        elif line.startswith(b'data: {"error"'):
                            outcomes.record_error(503, {}, line[6:].decode())  # an error event mid-stream
                        elif line.startswith(b"data: ") and b'"text":" t' in line:
                            deltas += 1
                finally:
                    open_now -= 1
                outcomes.latencies.append(time.monotonic() - began)
        except TimeoutError:
            outcomes.hung += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return {**outcomes.summary(), "most_open_at_once": most_open, "complete_streams": complete_streams}


# -- phase 2: a burst at 10x capacity ------------------------------------------------------------------------------
async def burst(session: aiohttp.ClientSession, model: str, count: int, seconds: float) -> dict:
    outcomes = Outcomes()

    async def one(i: int) -> None:
        await asyncio.sleep(seconds * i / count)  # spread evenly over the burst window
        began = time.monotonic()
        body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 4, "stream": i % 2 == 0}
        try:
            async with session.post("/v1/completions", json=body) as resp:
                text = await resp.text()
                outcomes.statuses[resp.status] += 1
                if resp.status != 200:
                    outcomes.record_error(resp.status, dict(resp.headers), text)
                elif body["stream"] and not text.rstrip().endswith("data: [DONE]"):
                    outcomes.malformed.append(f"stream without [DONE]: {text[-200:]}")
                elif body["stream"] and '"error"' in text:
                    outcomes.record_error(503, {}, text.split("data: ")[-2].strip())  # an error event mid-stream
                outcomes.latencies.append(time.monotonic() - began)
        except TimeoutError:
            outcomes.hung += 1

    began = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    return {**outcomes.summary(), "wall_s": round(time.monotonic() - began, 1)}


# -- the stand-in workers, in their own process ---------------------------------------------------------------------
def _stand_in_main(redis_url: str, model: str, options: dict, stop: multiprocessing.synchronize.Event) -> None:
    async def serve() -> None:
        async with StandInWorker(redis_url, model, **options):
            while not stop.is_set():
                await asyncio.sleep(0.1)

    asyncio.run(serve())


@contextlib.asynccontextmanager
async def stand_in_workers(redis_url: str, model: str, **options: object):
    """A StandInWorker for ``model`` in a spawned process, heartbeating and visible to the gateway on entry."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_stand_in_main, args=(redis_url, model, options, stop), daemon=True)
    proc.start()
    r = aioredis.from_url(redis_url)
    try:
        async with asyncio.timeout(60):  # until its heartbeat is there
            while not [k async for k in r.scan_iter(match="workers:*")]:
                assert proc.is_alive(), "the stand-in worker process died"
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # past the gateway's registry cache
        yield
    finally:
        stop.set()
        await asyncio.to_thread(proc.join, 10)
        await r.aclose()


# -- the run -------------------------------------------------------------------------------------------------------
async def redis_memory(r: aioredis.Redis) -> dict:
    info = await r.info("memory")
    return {"used_mb": round(info["used_memory"] / 2**20, 1), "peak_mb": round(info["used_memory_peak"] / 2**20, 1)}


async def key_census(r: aioredis.Redis) -> dict:
    counts: Counter = Counter()
    async for key in r.scan_iter(count=1000):
        counts[key.decode().split(":")[0] + ":" + ("*" if b":" in key else "")] += 1
    streams = {k.decode(): await r.xlen(k) async for k in r.scan_iter(match="requests:*")}
    return {"keys_by_prefix": dict(counts), "requests_stream_lengths": streams}


def gateway_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def run(args: argparse.Namespace, redis_url: str, gateway_url: str, gateway_pid: int) -> dict:
    r = aioredis.from_url(redis_url)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
    report: dict = {"redis_before": await redis_memory(r)}
    async with aiohttp.ClientSession(base_url=gateway_url, connector=connector, timeout=timeout) as session:
        async with stand_in_workers(
            redis_url,
            "load-streams",
            capacity=args.streams,
            tokens=20,
            token_seconds=1.0,
            output_ttl=OUTPUT_TTL_SECONDS,
        ):
            report["streams"] = await hold_streams(session, "load-streams", args.streams, tokens=20, ramp=8.0)
        report["gateway_rss_mb_after_streams"] = gateway_rss_mb(gateway_pid)
        # the stand-ins serve capacity / request_seconds requests a second; the burst comes at 10x that
        capacity, request_seconds = 5, 0.2  # 25 requests/s: the burst (250/s) stays within what one gateway can take
        served_per_second = capacity / request_seconds
        seconds = args.burst / (10 * served_per_second)
        async with stand_in_workers(
            redis_url,
            "load-burst",
            capacity=capacity,
            tokens=4,
            token_seconds=request_seconds / 4,
            output_ttl=OUTPUT_TTL_SECONDS,
        ):
            report["burst"] = {
                "requests": args.burst,
                "over_seconds": round(seconds, 1),
                "capacity_per_second": served_per_second,
                **await burst(session, "load-burst", args.burst, seconds),
            }
    report["redis_after_load"] = await redis_memory(r)
    await asyncio.sleep(OUTPUT_TTL_SECONDS + 2)  # outputs and request metadata expire
    report["redis_after_expiry"] = {**await redis_memory(r), **await key_census(r)}
    report["gateway_rss_mb_end"] = gateway_rss_mb(gateway_pid)
    await r.aclose()
    return report


def verdict(report: dict, args: argparse.Namespace) -> list[str]:
    problems = []
    for phase in ("streams", "burst"):
        p = report[phase]
        if p["hung"]:
            problems.append(f"{phase}: {p['hung']} requests hung")
        if p["malformed_error_bodies"]:
            problems.append(f"{phase}: {p['malformed_error_bodies']} malformed error bodies")
        if p["429_without_retry_after"]:
            problems.append(f"{phase}: 429 without Retry-After")
        unexpected = {s for s in p["statuses"] if s not in (200, 429, 503)}
        if unexpected:
            problems.append(f"{phase}: unexpected statuses {sorted(unexpected)}")
        if sum(p["statuses"].values()) != (args.streams if phase == "streams" else args.burst):
            problems.append(f"{phase}: some requests got no answer at all")
    if report["streams"]["most_open_at_once"] < args.streams:
        problems.append(f"only {report['streams']['most_open_at_once']} of {args.streams} streams were open at once")
    if report["streams"]["complete_streams"] != args.streams:
        problems.append(f"only {report['streams']['complete_streams']} of {args.streams} streams got every token")
    keys = report["redis_after_expiry"]["keys_by_prefix"]
    if keys.get("out:*"):
        problems.append(f"{keys['out:*']} output streams did not expire")
    if any(n > 2 * args.stream_maxlen for n in report["redis_after_expiry"]["requests_stream_lengths"].values()):
        problems.append("a requests stream was not trimmed")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams in phase 1")
    parser.add_argument("--burst", type=int, default=5000, help="requests in the phase 2 burst")
    parser.add_argument("--max-queued", type=int, default=100, help="TRELLIS_MAX_QUEUED_REQUESTS for the gateway")
    parser.add_argument("--stream-maxlen", type=int, default=2000, help="TRELLIS_REQUEST_STREAM_MAXLEN")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))  # thousands of sockets

    with tempfile.TemporaryDirectory(prefix="trellis-load-") as tmp:
        redis_port, gateway_port = free_port(), free_port()
        redis_proc = start_redis_server(redis_port, Path(tmp) / "redis")
        for model in ("load-streams", "load-burst"):
            (Path(tmp) / "models" / model).mkdir(parents=True)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = {
            **os.environ,
            "TRELLIS_REDIS_URL": redis_url,
            "TRELLIS_MODELS_DIR": str(Path(tmp) / "models"),
            "TRELLIS_HOST": "127.0.0.1",
            "TRELLIS_PORT": str(gateway_port),
            "TRELLIS_LOG_LEVEL": "WARNING",
            "TRELLIS_MAX_QUEUED_REQUESTS": str(args.max_queued),
            "TRELLIS_QUEUE_TIMEOUT_SECONDS": "10",
            "TRELLIS_OUTPUT_TTL_SECONDS": str(OUTPUT_TTL_SECONDS),
            "TRELLIS_REQUEST_STREAM_MAXLEN": str(args.stream_maxlen),
            "TRELLIS_API_KEYS": "",
        }
        gateway = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=Path(__file__).parent.parent)
        try:
            if not wait_for_port("127.0.0.1", gateway_port, timeout=30):
                raise RuntimeError("the gateway did not start")
            began = time.monotonic()
            report = asyncio.run(run(args, redis_url, f"http://127.0.0.1:{gateway_port}", gateway.pid))
            report["total_wall_s"] = round(time.monotonic() - began, 1)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    problems = verdict(report, args)
    report["result"] = "PASS" if not problems else "FAIL"
    report["problems"] = problems
    print(json.dumps(report, indent=2))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
