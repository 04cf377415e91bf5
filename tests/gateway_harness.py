"""Shared parts for the gateway tests (no tests here): a real gateway on a free port, a worker heartbeat, and
``WorkerPeer`` - the test playing the worker's side of the wire (XREADGROUP requests, XADD events)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway.app import start
from shared import names, wire
from shared.redis_server import free_port
from shared.redis_streams import ensure_group, entry, payload
from shared.settings import Settings, load_settings

# The gateway tests use their own Redis database of the session's server and empty it per test, so live worker
# heartbeats from other test files can never leak into /ready or /v1/models here.
GATEWAY_TEST_DB = 3


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def gateway_redis_url(redis_url: str) -> str:
    return f"{redis_url.rsplit('/', 1)[0]}/{GATEWAY_TEST_DB}"


@asynccontextmanager
async def fresh_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(gateway_redis_url(redis_url))
    await r.flushdb()
    try:
        yield r
    finally:
        await r.aclose()


def make_model_dir(models_dir: Path, model: str) -> Path:
    """An (empty) model directory: enough for requests that send token ids and so need no tokenizer."""
    path = models_dir / model
    path.mkdir(parents=True, exist_ok=True)
    return path


def gateway_settings(redis_url: str, models_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": gateway_redis_url(redis_url), "models_dir": models_dir}
    values.update(overrides)
    return load_settings(env={}, **values)


def gateway_config(**overrides: Any) -> dict[str, Any]:
    """Settings a test changes for its gateway (keys, limits, timeouts), checked against ``Settings`` at once."""
    load_settings(env={}, **overrides)
    return overrides


@asynccontextmanager
async def running_gateway(
    settings: Settings, config: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """The gateway as production runs it (``gateway.app.start``) on a free port, and a real HTTP client for it
    (sending ``headers`` with every request, e.g. an Authorization header)."""
    settings = dataclasses.replace(settings, host="127.0.0.1", port=free_port(), **(config or {}))
    runner = await start(settings)
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{settings.port}", headers=headers)
    try:
        yield session
    finally:
        await session.close()
        await runner.cleanup()


async def announce_worker(
    r: aioredis.Redis, model: str, *, max_model_len: int = 128, age: float = 0.0, active: int = 0
) -> str:
    """Write the heartbeat hash a worker keeps; ``age`` seconds old (a stale worker when over the threshold)."""
    worker_id = f"test-worker-{uuid.uuid4().hex[:8]}"
    now = time.time()
    await r.hset(
        names.worker_key(worker_id),
        mapping={
            "worker_id": worker_id,
            "model": model,
            "device": "cpu",
            "pid": 4242,
            "capacity": 8,
            "active": active,
            "max_model_len": max_model_len,
            "metrics_port": 9999,
            "started": now - 60 - age,
            "heartbeat": now - age,
        },
    )
    await r.expire(names.worker_key(worker_id), 60)
    return worker_id


class WorkerPeer:
    """Reads ``requests:{model}`` as a consumer of the workers' group and writes events to ``out:{id}``."""

    def __init__(self, r: aioredis.Redis, model: str) -> None:
        self.r = r
        self.model = model
        self.stream = names.requests_stream(model)

    @classmethod
    async def announced(cls, r: aioredis.Redis, model: str, *, max_model_len: int = 128) -> WorkerPeer:
        """A peer whose heartbeat is written (so the gateway serves ``model``) and which has joined the group."""
        await announce_worker(r, model, max_model_len=max_model_len)
        return await cls(r, model).join()

    async def join(self) -> WorkerPeer:
        await ensure_group(self.r, self.stream, names.WORKER_GROUP)
        return self

    async def next_request(self, timeout: float = 5.0) -> wire.GenerationRequest:
        resp = await self.r.xreadgroup(
            names.WORKER_GROUP, "test-peer", {self.stream: ">"}, count=1, block=int(timeout * 1000)
        )
        assert resp, f"no request arrived on {self.stream} within {timeout} s"
        _stream, entries = resp[0]
        entry_id, fields = entries[0]
        await self.r.xack(self.stream, names.WORKER_GROUP, entry_id)
        return wire.GenerationRequest.from_dict(payload(fields))

    async def emit(self, request_id: str, event: dict[str, Any]) -> str:
        entry_id = await self.r.xadd(names.output_stream(request_id), entry(event))
        return entry_id.decode()

    async def answer(
        self, request_id: str, pieces: list[str], *, index: int = 0, finish_reason: str = "stop", prompt_tokens: int = 3
    ) -> list[str]:
        """Deltas for ``pieces``, a finish, and done; returns the entry ids in order."""
        ids = []
        for i, text in enumerate(pieces):
            ids.append(await self.emit(request_id, delta(text, index=index, token_id=100 + i)))
        ids.append(await self.emit(request_id, finish(index, finish_reason, len(pieces))))
        ids.append(await self.emit(request_id, done(prompt_tokens, len(pieces))))
        return ids


def delta(text: str, index: int = 0, token_id: int = 100) -> dict[str, Any]:
    return {"type": wire.EVENT_DELTA, "index": index, "text": text, "token_ids": [token_id], "logprobs": None}


def finish(index: int, reason: str, completion_tokens: int) -> dict[str, Any]:
    return {
        "type": wire.EVENT_FINISH,
        "index": index,
        "finish_reason": reason,
        "completion_tokens": completion_tokens,
        "stop_reason": None,
    }


def done(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "type": wire.EVENT_DONE,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "timings": {"queue_s": 0.0, "ttft_s": 0.01, "total_s": 0.02},
        "worker_id": "test-peer",
    }


@dataclass
class SseEvent:
    id: str | None
    data: str | None
    comment: str | None

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


def parse_sse(text: str) -> list[SseEvent]:
    """Split an SSE body into events (blank-line separated); comment-only blocks become comment events."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event_id = data = comment = None
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
        events.append(SseEvent(event_id, data, comment))
    return events


async def wait_for_key(r: aioredis.Redis, key: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await r.exists(key):
            return True
        await asyncio.sleep(0.05)
    return False


class StandInWorker:
    """A worker that speaks the real wire and computes nothing: it heartbeats, pulls requests only while it has a
    free slot (like inference_worker/service.py), answers each with up to ``tokens`` deltas ``token_seconds`` apart,
    honours ``cancel:{id}``, writes finish + done, expires ``out:{id}`` and acks. It rides out a Redis outage and
    re-creates its heartbeat and consumer group when Redis comes back empty. For gateway tests and
    bench/load_gateway.py: the gateway cannot tell it from a real worker, only it is fast and deterministic."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        *,
        capacity: int = 8,
        tokens: int = 3,
        token_seconds: float = 0.0,
        max_model_len: int = 4096,
        output_ttl: int = 60,
        heartbeat_seconds: float = 0.5,
    ) -> None:
        self.redis_url = redis_url
        self.model = model
        self.capacity = capacity
        self.tokens = tokens
        self.token_seconds = token_seconds
        self.max_model_len = max_model_len
        self.output_ttl = output_ttl
        self.heartbeat_seconds = heartbeat_seconds
        self.worker_id = f"stand-in-{uuid.uuid4().hex[:8]}"
        self.stream = names.requests_stream(model)
        self.served: list[str] = []  # request ids, in the order they were started
        self._active: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._r: aioredis.Redis | None = None

    async def __aenter__(self) -> StandInWorker:
        # like the gateway: a pooled connection that died with a restarted Redis is retried on a fresh one
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), 3)
        self._r = aioredis.from_url(
            self.redis_url, socket_connect_timeout=1.0, retry=retry, max_connections=self.capacity + 16
        )
        await self._heartbeat_once()
        await ensure_group(self._r, self.stream, names.WORKER_GROUP)
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._intake())]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in [*self._tasks, *self._active]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._active, return_exceptions=True)
        assert self._r is not None
        try:
            await self._r.delete(names.worker_key(self.worker_id))
        except (aioredis.RedisError, OSError):
            pass
        await self._r.aclose()

    async def _heartbeat_once(self) -> None:
        assert self._r is not None
        now = time.time()
        key = names.worker_key(self.worker_id)
        fields = {
            "worker_id": self.worker_id,
            "model": self.model,
            "device": "cpu",
            "pid": 0,
            "capacity": self.capacity,
            "active": len(self._active),
            "max_model_len": self.max_model_len,
            "metrics_port": 0,
            "started": now,
            "heartbeat": now,
        }
        await self._r.hset(key, mapping=fields)
        await self._r.expire(key, max(3, int(self.heartbeat_seconds * 6)))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self._heartbeat_once()
            except (aioredis.RedisError, OSError):
                pass  # Redis is away; the next beat tries again

    async def _intake(self) -> None:
        assert self._r is not None
        while True:
            free = self.capacity - len(self._active)
            if free <= 0:
                await asyncio.sleep(0.005)
                continue
            try:
                resp = await self._r.xreadgroup(
                    names.WORKER_GROUP, self.worker_id, {self.stream: ">"}, count=free, block=200
                )
            except aioredis.ResponseError as exc:  # NOGROUP: Redis came back empty
                if "NOGROUP" not in str(exc):
                    raise
                await ensure_group(self._r, self.stream, names.WORKER_GROUP)
                continue
            except (aioredis.RedisError, OSError):
                await asyncio.sleep(0.2)
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    request = wire.GenerationRequest.from_dict(payload(fields))
                    task = asyncio.create_task(self._serve(entry_id, request))
                    self._active.add(task)
                    task.add_done_callback(self._active.discard)

    async def _serve(self, entry_id: bytes, request: wire.GenerationRequest) -> None:
        assert self._r is not None
        self.served.append(request.id)
        out = names.output_stream(request.id)
        n_tokens = min(self.tokens, request.params.max_tokens)
        try:
            produced, reason = 0, "length"
            for i in range(n_tokens):
                if await self._r.exists(names.cancel_key(request.id)):
                    reason = "abort"
                    break
                for index in range(request.params.n):
                    await self._r.xadd(out, entry(delta(f" t{i}", index=index, token_id=100 + i)))
                produced += 1
                if self.token_seconds:
                    await asyncio.sleep(self.token_seconds)
            pipe = self._r.pipeline(transaction=False)
            for index in range(request.params.n):
                pipe.xadd(out, entry(finish(index, reason, produced)))
            pipe.xadd(out, entry(done(len(request.prompt_ids), produced * request.params.n)))
            pipe.expire(out, self.output_ttl)
            pipe.xack(self.stream, names.WORKER_GROUP, entry_id)
            pipe.delete(names.cancel_key(request.id))
            await pipe.execute()
        except (aioredis.RedisError, OSError):
            pass  # Redis went away mid-request: like a real worker, the entry stays pending


async def read_data_events(resp: aiohttp.ClientResponse, count: int, timeout: float = 5.0) -> list[SseEvent]:
    """Read an open SSE response until ``count`` data events arrived (keep-alive comments are skipped)."""
    events: list[SseEvent] = []
    block: list[str] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            line = await resp.content.readline()
            if not line:
                raise AssertionError(f"the stream ended after {len(events)} of {count} data events")
            text = line.decode().rstrip("\n")
            if text:
                block.append(text)
                continue
            events.extend(e for e in parse_sse("\n".join(block)) if e.data is not None)
            block = []
    return events
