"""The converter worker's Redis side: pull conversion jobs, run them resumably, publish state and progress.

A job is one entry of the `conversions` stream (consumer group `converters`). Its state lives in the hash
`conv:{id}` and its progress events in the stream `conv:{id}:events`. The conversion itself runs in a thread; its work
directory (settings.work_dir/conversions/{id}) makes it resumable, so a job reclaimed after a crash, or re-run after a
cancel, continues where it stopped. The entry is acknowledged only once the job has ended (done, failed, cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import ResponseError

from shared import names
from shared.model_paths import ModelPathError, resolve_model_path
from shared.redis_streams import ensure_group, entry, payload
from shared.settings import Settings
from shared.wire import CONVERSION_ALLOCATIONS

log = logging.getLogger("converter_worker.service")

EVENTS_MAXLEN = 10_000
JOB_TTL_S = 7 * 24 * 3600  # finished jobs stay listed for a week


class ConverterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("trellis_converter_up", "1 while this converter worker runs", registry=registry)
        self.up.set(1)
        self.jobs = Counter("trellis_conversion_jobs_finished", "Conversion jobs ended here, by final state.",
                            ["state"], registry=registry)
        self.progress = Gauge("trellis_conversion_progress_ratio", "Fraction of the conversion done.",
                              ["conversion"], registry=registry)
        self.last_progress = Gauge("trellis_conversion_last_progress_timestamp_seconds",
                                   "Unix time of the conversion's last progress.", ["conversion"], registry=registry)
        self.block_seconds = Histogram("trellis_conversion_block_seconds", "Seconds to quantize one block.",
                                       registry=registry,
                                       buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200))


def job_fields(job: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in job.items() if v is not None}


class ConverterService:
    def __init__(self, settings: Settings, metrics: ConverterMetrics, metrics_port: int = 0) -> None:
        self.settings = settings
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url)
        self.stopping = asyncio.Event()
        self.current: str | None = None
        self.stop_flag = threading.Event()  # read by the conversion thread between blocks

    def stop(self) -> None:
        """Graceful: the running conversion checkpoints at its next block and the job stays resumable."""
        self.stopping.set()
        self.stop_flag.set()

    async def run(self) -> None:
        await ensure_group(self.redis, names.CONVERSIONS_STREAM, names.CONVERTER_GROUP)
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while not self.stopping.is_set():
                claimed = await self._next_job()
                if claimed is not None:
                    await self._run_job(*claimed)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self.redis.delete(names.converter_key(self.consumer))
            await self.redis.aclose()

    async def _next_job(self) -> tuple[bytes, dict[str, Any]] | None:
        """A job left by a dead converter first (resumed from its work dir), else a new one."""
        try:
            idle_ms = int(self.settings.reclaim_idle_seconds * 1000)
            _next, claimed, *_ = await self.redis.xautoclaim(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP,
                                                             self.consumer, idle_ms, start_id="0-0", count=1)
            entries = [(e, f) for e, f in claimed if f]
            if not entries:
                resp = await self.redis.xreadgroup(names.CONVERTER_GROUP, self.consumer,
                                                   {names.CONVERSIONS_STREAM: ">"}, count=1, block=1000)
                entries = [(e, f) for _s, es in resp or [] for e, f in es]
        except aioredis.ConnectionError as exc:
            log.warning("redis unavailable: %s", exc)
            await asyncio.sleep(1.0)
            return None
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await ensure_group(self.redis, names.CONVERSIONS_STREAM, names.CONVERTER_GROUP)
            return None
        if not entries:
            return None
        entry_id, fields = entries[0]
        try:
            return entry_id, payload(fields)
        except Exception as exc:  # noqa: BLE001 - a malformed entry is dropped, never retried forever
            log.error("dropping malformed conversion entry %s: %s", entry_id, exc)
            await self.redis.xack(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, entry_id)
            return None

    async def _publish(self, job_id: str, state: dict[str, Any], event: dict[str, Any] | None = None) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(names.conversion_key(job_id), mapping=job_fields(state))
        if event is not None:
            pipe.xadd(names.conversion_events(job_id), entry(event), maxlen=EVENTS_MAXLEN, approximate=True)
        await pipe.execute()

    async def _run_job(self, entry_id: bytes, job: dict[str, Any]) -> None:
        from converter_worker.convert import ConversionCancelled, ConvertOptions, convert

        job_id = str(job["id"])
        if await self.redis.exists(names.conversion_cancel_key(job_id)):  # cancelled while it waited in the queue
            await self._end(entry_id, job_id, "cancelled", {"error": "cancelled before it started"})
            return
        self.current = job_id
        self.stop_flag.clear()
        state: dict[str, Any] = {"state": "running", "worker": self.consumer, "started": time.time(), "error": ""}
        blocks = await self._block_figures(job_id)  # a resumed job keeps the figures of the blocks done before
        try:
            source = resolve_model_path(self.settings.models_dir, str(job["source"]))
            output = resolve_model_path(self.settings.models_dir, str(job["output"]), must_exist=False)
        except ModelPathError as exc:
            await self._end(entry_id, job_id, "failed", {"error": str(exc)})
            return
        if output.exists():
            await self._end(entry_id, job_id, "failed", {"error": f"output model {job['output']!r} already exists"})
            return
        work_dir = Path(self.settings.work_dir) / "conversions" / job_id
        resume = (work_dir / "args.json").exists()
        opts = ConvertOptions(
            input=source, output=output, work_dir=work_dir, bits=float(job["bits"]),
            head_bits=int(job.get("head_bits", 6)), codebook=str(job.get("codebook", "mul1")),
            cal_rows=int(job.get("cal_rows", 250)), cal_cols=int(job.get("cal_cols", 2048)),
            allocation=str(job.get("allocation", CONVERSION_ALLOCATIONS[0])),
            device=self.settings.device,
        )
        await self._publish(job_id, state, {"type": "state", "state": "running", "resumed": resume})
        self.metrics.progress.labels(conversion=job_id).set(0.0)
        self.metrics.last_progress.labels(conversion=job_id).set(time.time())
        loop = asyncio.get_running_loop()
        progress_q: asyncio.Queue[Any] = asyncio.Queue()
        last_block = [time.monotonic()]

        def on_progress(p: Any) -> None:  # called from the conversion thread
            loop.call_soon_threadsafe(progress_q.put_nowait, p)

        def should_stop() -> bool:
            return self.stop_flag.is_set()

        async def relay_progress() -> None:
            while (p := await progress_q.get()) is not None:
                ratio = p.done / p.total if p.total else 0.0
                now = time.monotonic()
                if p.stage == "block" and p.done:
                    self.metrics.block_seconds.observe(now - last_block[0])
                    last_block[0] = now
                self.metrics.progress.labels(conversion=job_id).set(ratio)
                self.metrics.last_progress.labels(conversion=job_id).set(time.time())
                state.update(progress=f"{ratio:.4f}", stage=p.stage, done=p.done, total=p.total,
                             eta=f"{p.eta:.1f}" if p.eta is not None else "", message=p.message)
                if p.figures is not None:
                    blocks[int(p.figures["block"])] = p.figures
                    state["blocks"] = json.dumps([blocks[b] for b in sorted(blocks)], separators=(",", ":"))
                try:
                    await self._publish(job_id, state, {"type": "progress", **asdict(p)})
                except aioredis.ConnectionError as exc:
                    log.warning("progress of %s not published: %s", job_id, exc)

        async def watch_cancel() -> None:
            while not finished.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), 0.5)
                try:
                    if not finished.is_set() and await self.redis.exists(names.conversion_cancel_key(job_id)):
                        self.stop_flag.set()
                        return
                except aioredis.ConnectionError as exc:
                    log.warning("cancel check failed: %s", exc)

        # The helpers are never cancelled mid-command (a Redis call cut off halfway can leave its connection
        # unusable): they end on their own once the conversion returns, after relaying every queued report.
        finished = asyncio.Event()
        helpers = [asyncio.create_task(relay_progress()), asyncio.create_task(watch_cancel())]
        outcome, error, result = "done", "", None
        try:
            result = await asyncio.to_thread(convert, opts, resume, on_progress, should_stop)
        except ConversionCancelled:
            outcome = "cancelled"
        except Exception as exc:  # noqa: BLE001 - any failure ends the job with its message, never the worker
            log.exception("conversion %s failed", job_id)
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            finished.set()
            progress_q.put_nowait(None)  # behind every report the thread queued before it returned
            await asyncio.gather(*helpers, return_exceptions=True)
            self.current = None
        if outcome == "cancelled":
            if self.stopping.is_set() and not await self.redis.exists(names.conversion_cancel_key(job_id)):
                # worker shutdown, not a user cancel: leave the entry pending for a restart or another converter
                await self._publish(job_id, {**state, "state": "queued"}, {"type": "state", "state": "queued"})
                return
            await self._end(entry_id, job_id, "cancelled", {"error": "cancelled; the work dir is kept for a resume"})
        elif outcome == "failed":
            await self._end(entry_id, job_id, "failed", {"error": error})
        else:
            assert result is not None
            await self._end(entry_id, job_id, "done", {"progress": "1", "output": str(job["output"]),
                                                         "result_bits": f"{result.bits:.2f}",
                                                         "seconds": f"{result.seconds:.1f}"})

    async def _block_figures(self, job_id: str) -> dict[int, dict[str, Any]]:
        raw = await self.redis.hget(names.conversion_key(job_id), "blocks")
        try:
            return {int(b["block"]): b for b in json.loads(raw)} if raw else {}
        except (ValueError, KeyError, TypeError):
            return {}

    async def _end(self, entry_id: bytes, job_id: str, final: str, extra: dict[str, Any]) -> None:
        state = {"state": final, "finished": time.time(), **extra}
        await self._publish(job_id, state, {"type": "state", "state": final, **extra})
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(names.conversion_key(job_id), JOB_TTL_S)
        pipe.expire(names.conversion_events(job_id), JOB_TTL_S)
        pipe.delete(names.conversion_cancel_key(job_id))
        pipe.xack(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, entry_id)
        await pipe.execute()
        self.metrics.jobs.labels(state=final).inc()
        for gauge in (self.metrics.progress, self.metrics.last_progress):  # per-job series end with the job
            with contextlib.suppress(KeyError):
                gauge.remove(job_id)
        log.info("conversion %s %s", job_id, final)

    async def _heartbeat(self) -> None:
        while True:
            try:
                pending = await self.redis.xpending_range(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, "-", "+",
                                                          100, consumername=self.consumer)
                pipe = self.redis.pipeline(transaction=False)
                pipe.hset(names.converter_key(self.consumer), mapping={
                    "pid": os.getpid(), "heartbeat": time.time(), "metrics_port": self.metrics_port,
                    "job": self.current or ""})
                pipe.expire(names.converter_key(self.consumer), int(self.settings.heartbeat_seconds * 3) + 1)
                ids = [p["message_id"] for p in pending]
                if ids:  # a live converter's jobs are never reclaimed, however long they run
                    pipe.xclaim(names.CONVERSIONS_STREAM, names.CONVERTER_GROUP, self.consumer, 0, ids, justid=True)
                await pipe.execute()
            except aioredis.ConnectionError as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.settings.heartbeat_seconds)
