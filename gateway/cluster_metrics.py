"""Cluster gauges read from Redis at scrape time: live workers per model, stream lengths, pending entries and lag,
and conversion jobs by state. Every gateway reports the same values (dashboards take ``max`` over gateways).

Reads are bounded (at most ``MAX_STREAMS`` streams and ``MAX_JOBS`` jobs) so a scrape stays cheap; when Redis is
unreachable the gauges keep their last values and ``trellis_gateway_redis_up`` drops to 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge
from redis.exceptions import RedisError, ResponseError

from gateway.registry import WorkerRegistry
from shared import names

log = logging.getLogger("gateway.cluster_metrics")

MAX_STREAMS = 500
MAX_JOBS = 1000
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
STREAM_PATTERNS = ("requests:*", "deadletter:*")


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.redis_up = Gauge("trellis_gateway_redis_up", "1 when the last scrape could read Redis", registry=registry)
        self.workers_live = Gauge(
            "trellis_workers_live", "Workers with a fresh heartbeat, per model", ["model"], registry=registry
        )
        self.stream_length = Gauge(
            "trellis_redis_stream_length", "Entries in each Trellis stream (XLEN)", ["stream"], registry=registry
        )
        self.stream_pending = Gauge(
            "trellis_redis_stream_pending",
            "Entries delivered to a consumer of the group and not yet acknowledged",
            ["stream", "group"],
            registry=registry,
        )
        self.stream_lag = Gauge(
            "trellis_redis_stream_lag",
            "Entries no consumer of the group has been given yet",
            ["stream", "group"],
            registry=registry,
        )
        self.conversion_jobs = Gauge(
            "trellis_conversion_jobs", "Conversion jobs by state", ["state"], registry=registry
        )
        for state in JOB_STATES:
            self.conversion_jobs.labels(state)
        self._models_seen: set[str] = set()  # a model whose workers all died reports 0, not nothing

    async def refresh(self, redis: aioredis.Redis, registry: WorkerRegistry, models_dir: Path) -> None:
        try:
            await self._workers(registry, models_dir)
            await self._streams(redis)
            await self._jobs(redis)
        except (RedisError, OSError) as exc:
            log.warning("cluster metrics not refreshed: %s", exc)
            self.redis_up.set(0)
            return
        self.redis_up.set(1)

    async def _workers(self, registry: WorkerRegistry, models_dir: Path) -> None:
        served = await registry.models()
        # a model with a directory but no worker reports 0, so "no worker" is a value an alert can see
        on_disk = {p.name for p in models_dir.iterdir() if p.is_dir()} if models_dir.is_dir() else set()
        self._models_seen |= set(served)
        self.workers_live.clear()
        for model in on_disk | self._models_seen:
            self.workers_live.labels(model).set(len(served.get(model, [])))

    async def _streams(self, redis: aioredis.Redis) -> None:
        streams = [names.CONVERSIONS_STREAM]
        for pattern in STREAM_PATTERNS:
            async for key in redis.scan_iter(match=pattern, count=200, _type="stream"):
                streams.append(key.decode() if isinstance(key, bytes) else key)
                if len(streams) >= MAX_STREAMS:
                    break
        pipe = redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        results = await pipe.execute(raise_on_error=False)
        self.stream_length.clear()
        self.stream_pending.clear()
        self.stream_lag.clear()
        for i, stream in enumerate(streams):
            length, groups = results[2 * i], results[2 * i + 1]
            if isinstance(length, ResponseError) or isinstance(groups, ResponseError):
                continue  # the stream does not exist (yet), e.g. no conversion was ever submitted
            self.stream_length.labels(stream).set(length)
            for group in groups:
                name = _text(_field(group, "name") or b"")
                self.stream_pending.labels(stream, name).set(int(_field(group, "pending") or 0))
                lag = _field(group, "lag")
                self.stream_lag.labels(stream, name).set(int(lag) if lag is not None else length)

    async def _jobs(self, redis: aioredis.Redis) -> None:
        ids = await redis.zrevrange(names.CONVERSION_JOBS, 0, MAX_JOBS - 1)
        pipe = redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(names.conversion_key(_text(job_id)), "state")
        counts = dict.fromkeys(JOB_STATES, 0)
        for state in await pipe.execute() if ids else []:
            if state is not None:
                counts[_text(state)] = counts.get(_text(state), 0) + 1
        for state, count in counts.items():
            self.conversion_jobs.labels(state).set(count)


def _field(group: dict, key: str) -> object:
    """A field of an XINFO GROUPS entry, whichever way the client decoded the keys."""
    return group[key] if key in group else group.get(key.encode())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
