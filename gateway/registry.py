"""Live workers, read from their heartbeat hashes ``workers:{worker_id}``.

A worker refreshes its hash (with a TTL) every few seconds; it counts as live while its ``heartbeat`` field is newer
than ``settings.worker_stale_seconds``. A model is served iff at least one live worker names it. The scan result is
cached for a fraction of a second so a burst of requests costs one SCAN, not one each. Admission goes further: past
that, a non-empty result is still served to it for a little longer while one background scan refreshes it, so no
request waits for the SCAN in steady traffic; "nobody serves this model" is never answered from a stale list. Listings
(/v1/workers, /v1/models) and the relay's liveness checks always see a list at most ``cache_seconds`` old.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from shared import names

log = logging.getLogger("gateway.registry")

SCAN_BATCH = 200


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    model: str
    device: str
    pid: int
    capacity: int
    active: int
    max_model_len: int
    metrics_port: int
    started: float
    heartbeat: float

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> WorkerInfo:
        """Parse a heartbeat hash; raises ValueError/KeyError if a required field is missing or malformed."""
        f = {k.decode(): v.decode() for k, v in fields.items()}
        return cls(
            worker_id=f["worker_id"],
            model=f["model"],
            device=f.get("device", ""),
            pid=int(f.get("pid", 0)),
            capacity=int(f.get("capacity", 0)),
            active=int(f.get("active", 0)),
            max_model_len=int(f.get("max_model_len", 0)),
            metrics_port=int(f.get("metrics_port", 0)),
            started=float(f.get("started", 0.0)),
            heartbeat=float(f["heartbeat"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {"id": self.worker_id, **asdict(self)}


class WorkerRegistry:
    def __init__(
        self, redis: aioredis.Redis, stale_seconds: float, cache_seconds: float = 0.5, serve_stale_seconds: float = 2.0
    ) -> None:
        self.redis = redis
        self.stale_seconds = stale_seconds
        self.cache_seconds = cache_seconds
        self.serve_stale_seconds = max(cache_seconds, serve_stale_seconds)
        self._cached: list[WorkerInfo] = []
        self._cached_at = -float("inf")
        self._refreshing: asyncio.Task[list[WorkerInfo]] | None = None

    async def live_workers(self, allow_stale: bool = False) -> list[WorkerInfo]:
        """Every worker with a fresh heartbeat, sorted by model then id. Raises redis errors to the caller.
        ``allow_stale``: the admission path's answer, which may lag by up to ``serve_stale_seconds``."""
        age = time.monotonic() - self._cached_at
        if age < self.cache_seconds:
            return self._cached
        if allow_stale and self._cached and age < self.serve_stale_seconds:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh_quietly())
            return self._cached
        return await self._scan()

    async def _refresh_quietly(self) -> list[WorkerInfo]:
        try:
            return await self._scan()
        except Exception as exc:  # the next caller past serve_stale_seconds scans itself and sees the error
            log.warning("refreshing the worker list failed: %s", exc)
            return self._cached

    async def _scan(self) -> list[WorkerInfo]:
        now = time.monotonic()
        keys = [key async for key in self.redis.scan_iter(match=names.WORKER_KEY_PATTERN, count=SCAN_BATCH)]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        hashes = await pipe.execute() if keys else []
        oldest = time.time() - self.stale_seconds
        workers = []
        for key, fields in zip(keys, hashes, strict=True):
            if not fields:  # expired between SCAN and HGETALL
                continue
            try:
                info = WorkerInfo.from_hash(fields)
            except (KeyError, ValueError, UnicodeDecodeError) as exc:
                log.warning("ignoring malformed heartbeat %s: %s", key, exc)
                continue
            if info.heartbeat >= oldest:
                workers.append(info)
        workers.sort(key=lambda w: (w.model, w.worker_id))
        self._cached, self._cached_at = workers, now
        return workers

    async def workers_for(self, model: str, allow_stale: bool = False) -> list[WorkerInfo]:
        found = [w for w in await self.live_workers(allow_stale) if w.model == model]
        if not found and allow_stale:  # "nobody serves it" is never answered from a stale list
            found = [w for w in await self.live_workers() if w.model == model]
        return found

    async def models(self) -> dict[str, list[WorkerInfo]]:
        """Served model id -> its live workers."""
        out: dict[str, list[WorkerInfo]] = {}
        for w in await self.live_workers():
            out.setdefault(w.model, []).append(w)
        return out


def context_length(workers: list[WorkerInfo]) -> int | None:
    """The context every live worker of a model can hold (the smallest), or None if none reports one."""
    lengths = [w.max_model_len for w in workers if w.max_model_len > 0]
    return min(lengths) if lengths else None
