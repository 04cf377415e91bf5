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

from gateway.app import start
from shared import names, wire
from shared.redis_server import free_port
from shared.redis_streams import ensure_group, entry, payload
from shared.settings import Settings, load_settings

# The gateway tests use their own Redis database of the session's server and empty it per test, so live worker
# heartbeats from other test files can never leak into /ready or /v1/models here.
GATEWAY_TEST_DB = 3


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


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    """The gateway as production runs it (``gateway.app.start``) on a free port, and a real HTTP client for it."""
    settings = dataclasses.replace(settings, host="127.0.0.1", port=free_port())
    runner = await start(settings)
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{settings.port}")
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
