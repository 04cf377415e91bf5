"""The inference worker's Redis side: pull requests when there is room, publish events, watch cancels, heartbeat.

One asyncio task per concern; the engine runs in its own thread (EngineLoop) so the model never waits on Redis.
Entries are acknowledged only after the final event of their request is written (ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from inference_worker.engine import Engine, EngineLoop
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
    def __init__(self, engine: Engine, settings: Settings, model_id: str, metrics_port: int = 0) -> None:
        self.engine = engine
        self.settings = settings
        self.model_id = model_id
        self.metrics_port = metrics_port
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stream = names.requests_stream(model_id)
        self.redis: aioredis.Redis = aioredis.from_url(settings.redis_url)
        self.active: dict[str, ActiveRequest] = {}
        self.events: asyncio.Queue[list[tuple[str, dict]]] = asyncio.Queue()
        self.room = asyncio.Event()  # set whenever a request finishes: the intake may pull again
        self.stopping = asyncio.Event()
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        await ensure_group(self.redis, self.stream, names.WORKER_GROUP)
        aio_loop = asyncio.get_running_loop()
        engine_loop = EngineLoop(
            self.engine, on_events=lambda evs: aio_loop.call_soon_threadsafe(self.events.put_nowait, evs)
        )
        engine_loop.start()
        await self._heartbeat_once()
        log.info("worker %s serving %s from %s", self.worker_id, self.model_id, self.stream)
        tasks = [asyncio.create_task(c) for c in (self._intake(), self._publish(), self._watch_cancels(),
                                                   self._heartbeat())]
        try:
            await self.stopping.wait()
            await self._drain()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            engine_loop.stop()
            await self.redis.delete(names.worker_key(self.worker_id))
            await self.redis.aclose()

    def stop(self) -> None:
        self.stopping.set()

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
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    await self._admit(entry_id, fields)

    async def _admit(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            req = wire.GenerationRequest.from_dict(payload(fields))
        except Exception as exc:  # a malformed entry must not kill the worker; it is acked and dropped
            log.error("dropping malformed request entry %s: %s", entry_id, exc)
            await self.redis.xack(self.stream, names.WORKER_GROUP, entry_id)
            return
        self.active[req.id] = ActiveRequest(entry_id)
        self.engine.add_request(req)

    async def _publish(self) -> None:
        ttl = self.settings.output_ttl_seconds
        while True:
            batch = await self.events.get()
            while not self.events.empty():  # coalesce whatever else is ready into one round trip
                batch.extend(self.events.get_nowait())
            pipe = self.redis.pipeline(transaction=False)
            finished: list[str] = []
            for request_id, event in batch:
                stream = names.output_stream(request_id)
                pipe.xadd(stream, entry(event))
                if event["type"] in wire.TERMINAL_EVENTS:
                    pipe.expire(stream, ttl)
                    finished.append(request_id)
            for request_id in finished:
                active = self.active.pop(request_id, None)
                if active is not None:
                    pipe.xack(self.stream, names.WORKER_GROUP, active.entry_id)
                pipe.delete(names.cancel_key(request_id))
            await pipe.execute()
            if finished:
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
        await pipe.execute()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._heartbeat_once()
            except aioredis.ConnectionError as exc:
                log.warning("heartbeat failed: %s", exc)
