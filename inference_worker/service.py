"""The inference worker's Redis side: pull requests when there is room, publish events, watch cancels, heartbeat.

One asyncio task per concern. The engine steps on another thread (EngineLoop, on the process's main thread: see
``python -m inference_worker``) so the model never waits on Redis, and its events leave through a thread of their own
(EventPublisher) so relaying tokens never waits on the event loop.
Entries are acknowledged only after the final event of their request is written (ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from inference_worker.engine import Engine
from inference_worker.metrics import ServiceMetrics
from inference_worker.publisher import EventPublisher, publisher_client
from shared import names, wire
from shared.redis_streams import ensure_group, entry, payload
from shared.settings import Settings

log = logging.getLogger("inference_worker.service")

INTAKE_BLOCK_MS = 500
CANCEL_POLL_S = 0.05


@dataclass
class ActiveRequest:
    entry_id: bytes
    started: float = field(default_factory=time.monotonic)


class WorkerService:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        model_id: str,
        metrics: ServiceMetrics | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.model_id = model_id
        self.metrics_port = metrics_port
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stream = names.requests_stream(model_id)
        self.metrics = metrics or ServiceMetrics(CollectorRegistry(), model_id, self.stream)
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url)
        self.active: dict[str, ActiveRequest] = {}
        self.room = asyncio.Event()  # set whenever a request finishes: the intake may pull again
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self.publisher = EventPublisher(
            publisher_client(settings.redis_url),
            self.stream,
            settings.output_ttl_seconds,
            entry_of=self._entry_of,
            on_finished=lambda ids: self._in_loop(self._finished, ids),
            on_lost=lambda ids: self._in_loop(self._lost, ids),
        )

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until ``stop()``. The caller steps the engine (an ``EngineLoop`` with ``self.publisher.submit`` as
        its event sink) on another thread, and stops it after this returns."""
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self.stopping.set()
        await ensure_group(self.redis, self.stream, names.WORKER_GROUP)
        self.publisher.start()
        await self._heartbeat_once()
        log.info("worker %s serving %s from %s", self.worker_id, self.model_id, self.stream)
        tasks = [asyncio.create_task(c) for c in (self._intake(), self._watch_cancels(), self._heartbeat(),
                                                   self._reclaim())]
        try:
            await self.stopping.wait()
            await self._drain()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self.publisher.stop)  # what the last steps said still reaches the clients
            self.publisher.client.close()
            await self.redis.delete(names.worker_key(self.worker_id))
            await self.redis.aclose()

    def stop(self) -> None:
        """Begin a graceful stop (any thread, e.g. a signal handler on the main thread)."""
        self._stop_requested = True
        self._in_loop(self.stopping.set)

    def _in_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the service's event loop, from any thread (dropped before the loop has started)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # closed in between: the service has ended, nothing is waiting for this
                pass

    async def _drain(self, timeout: float = 30.0) -> None:
        """Graceful stop: take no new work, let the requests we hold finish (or leave them pending for others)."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.active:
            log.warning("stopping with %d requests unfinished; they stay pending for another worker",
                        len(self.active))

    # -- tasks ----------------------------------------------------------------------------------------------------
    async def _intake(self) -> None:
        while not self.stopping.is_set():
            room = self.engine.free_slots()
            if room <= 0:
                self.room.clear()
                try:
                    await asyncio.wait_for(self.room.wait(), timeout=0.5)
                except TimeoutError:
                    pass
                continue
            try:
                resp = await self.redis.xreadgroup(names.WORKER_GROUP, self.worker_id, {self.stream: ">"},
                                                   count=room, block=INTAKE_BLOCK_MS)
            except aioredis.ConnectionError as exc:
                log.warning("redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis came back empty (restarted without persistence): the group must be made again
                await ensure_group(self.redis, self.stream, names.WORKER_GROUP)
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    await self._admit(entry_id, fields)

    async def _admit(self, entry_id: bytes, fields: dict[bytes, bytes] | None, resumed: bool = False) -> None:
        try:
            req = wire.GenerationRequest.from_dict(payload(fields))
        except Exception as exc:  # a malformed entry must not kill the worker; it is acked and dropped
            log.error("dropping malformed request entry %s: %s", entry_id, exc)
            await self.redis.xack(self.stream, names.WORKER_GROUP, entry_id)
            return
        if req.id in self.active:
            return  # already ours
        if resumed and not await self._prepare_resume(req):
            await self.redis.xack(self.stream, names.WORKER_GROUP, entry_id)  # its stream had already ended
            return
        self.active[req.id] = ActiveRequest(entry_id)
        self.engine.add_request(req)

    async def _prepare_resume(self, req: wire.GenerationRequest) -> bool:
        """Fill req.resume_tokens / finished_choices from what out:{id} already holds; False if it has ended."""
        for _entry_id, fields in await self.redis.xrange(names.output_stream(req.id)):
            event = payload(fields)
            kind = event.get("type")
            if kind in wire.TERMINAL_EVENTS:
                return False
            if kind == wire.EVENT_DELTA:
                req.resume_tokens.setdefault(int(event["index"]), []).extend(event.get("token_ids") or [])
            elif kind == wire.EVENT_FINISH:
                req.finished_choices.append(int(event["index"]))
        log.info("resuming request %s after %s streamed tokens", req.id,
                 {i: len(t) for i, t in req.resume_tokens.items()})
        return True

    async def _reclaim(self) -> None:
        """Take over requests whose worker died: entries pending longer than reclaim_idle_seconds (a live owner
        refreshes its own every heartbeat). An entry delivered max_deliveries times goes to the dead-letter stream."""
        idle_ms = int(self.settings.reclaim_idle_seconds * 1000)
        while not self.stopping.is_set():
            await asyncio.sleep(max(0.5, self.settings.reclaim_idle_seconds / 4))
            room = self.engine.free_slots()
            if room <= 0 or self.stopping.is_set():
                continue
            try:
                _next, claimed, *_ = await self.redis.xautoclaim(
                    self.stream, names.WORKER_GROUP, self.worker_id, min_idle_time=idle_ms, start_id="0-0", count=room
                )
                for entry_id, fields in claimed:
                    if fields is None:  # trimmed away while pending: nothing to run
                        await self.redis.xack(self.stream, names.WORKER_GROUP, entry_id)
                        continue
                    pending = await self.redis.xpending_range(self.stream, names.WORKER_GROUP, min=entry_id,
                                                              max=entry_id, count=1)
                    deliveries = pending[0]["times_delivered"] if pending else 1
                    if deliveries > self.settings.max_deliveries:
                        await self._dead_letter(entry_id, fields, deliveries)
                    else:
                        self.metrics.reclaimed.inc()
                        await self._admit(entry_id, fields, resumed=True)
            except (aioredis.ConnectionError, ResponseError) as exc:
                log.warning("reclaim failed: %s", exc)

    async def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int) -> None:
        """Park an entry that keeps failing, and end its client's stream with an error instead of a hang."""
        request_id = None
        try:
            request_id = payload(fields).get("id")
        except Exception:  # the dead-letter stream keeps the raw entry either way
            pass
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(names.deadletter_stream(self.stream), {**fields, b"reason": f"delivered {deliveries} times"},
                  maxlen=10_000, approximate=True)
        if request_id:
            out = names.output_stream(request_id)
            pipe.xadd(out, entry({"type": wire.EVENT_ERROR, "code": "worker_failed",
                                  "message": f"the request failed on {deliveries} workers and was dead-lettered"}))
            pipe.expire(out, self.settings.output_ttl_seconds)
        pipe.xack(self.stream, names.WORKER_GROUP, entry_id)
        await pipe.execute()
        self.metrics.dead_letters.inc()
        log.error("dead-lettered request %s after %d deliveries", request_id, deliveries)

    def _entry_of(self, request_id: str) -> bytes | None:
        """The requests-stream entry of a request this worker holds (read from the publisher's thread)."""
        active = self.active.get(request_id)
        return None if active is None else active.entry_id

    def _finished(self, request_ids: list[str]) -> None:
        """Their final events are written and their entries acked: their slots are free."""
        for request_id in request_ids:
            self.active.pop(request_id, None)
        self.room.set()

    def _lost(self, request_ids: set[str]) -> None:
        """Their events could not reach Redis: stop computing them (the gateway has ended their streams)."""
        for request_id in request_ids:
            self.active.pop(request_id, None)
            self.engine.abort(request_id)
        self.room.set()

    async def _watch_cancels(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            ids = list(self.active)
            if not ids:
                continue
            pipe = self.redis.pipeline(transaction=False)
            for request_id in ids:
                pipe.exists(names.cancel_key(request_id))
            try:
                flags = await pipe.execute()
            except aioredis.ConnectionError:
                continue
            for request_id, flag in zip(ids, flags, strict=True):
                if flag:
                    self.engine.abort(request_id)

    async def _heartbeat_once(self) -> None:
        stats = self.engine.stats()
        key = names.worker_key(self.worker_id)
        now = time.time()
        fields = {
            "worker_id": self.worker_id,
            "model": self.model_id,
            "device": str(self.engine.device),
            "pid": os.getpid(),
            "capacity": self.engine.cfg.max_batch_size,
            "active": len(self.active),
            "max_model_len": self.engine.max_model_len,
            "metrics_port": self.metrics_port,
            "started": self.started_at,
            "heartbeat": now,
            "kv_usage": stats.get("kv_usage", 0.0),
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, max(3, int(self.settings.heartbeat_seconds * 3)))
        entry_ids = [a.entry_id for a in self.active.values()]
        if entry_ids:  # reset their idle time: entries of a live worker are never reclaimed by another
            pipe.xclaim(self.stream, names.WORKER_GROUP, self.worker_id, 0, entry_ids, justid=True)
        await pipe.execute()
        self.metrics.last_heartbeat.set(now)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._heartbeat_once()
            except aioredis.ConnectionError as exc:
                log.warning("heartbeat failed: %s", exc)
