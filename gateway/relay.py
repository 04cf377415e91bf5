"""The gateway's half of the wire: enqueue a request, follow its ``out:{id}`` stream, cancel it when the client goes.

Every Redis read blocks for at most ``block_seconds`` so callers wake up regularly to send keep-alives and notice a
client that went away; ``follow`` yields ``None`` on those idle wake-ups. If every worker of the model disappears
while a request waits, or the gateway shuts down, ``follow`` cancels the request and ends it with an error event of
its own (``worker_lost``, ``shutting_down``) instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.registry import WorkerRegistry
from shared import names, wire

log = logging.getLogger("gateway.relay")

READ_BATCH = 256  # entries per XREAD: a burst of deltas costs one round trip


@dataclass(frozen=True)
class OutputEvent:
    entry_id: str | None  # the Redis entry id in out:{id} (the SSE event id); None for events the gateway made up
    event: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.event.get("type"))

    @property
    def terminal(self) -> bool:
        return self.type in wire.TERMINAL_EVENTS


class Relay:
    def __init__(
        self,
        redis: aioredis.Redis,
        registry: WorkerRegistry,
        *,
        stream_maxlen: int,
        cancel_ttl: int,
        block_seconds: float,
    ) -> None:
        self.stopping = asyncio.Event()  # set when the gateway shuts down: every follow() ends within one block
        self.redis = redis
        self.registry = registry
        self.stream_maxlen = stream_maxlen
        self.cancel_ttl = cancel_ttl
        self.block_ms = max(1, int(block_seconds * 1000))  # 0 would mean "block forever"

    async def enqueue(self, request: wire.GenerationRequest) -> str:
        """XADD the request to ``requests:{model}`` (trimmed, approximately, to the configured length)."""
        entry_id = await self.redis.xadd(
            names.requests_stream(request.model),
            {names.PAYLOAD_FIELD: wire.pack(request.to_dict())},
            maxlen=self.stream_maxlen,
            approximate=True,
        )
        return entry_id.decode()

    async def cancel(self, request_id: str) -> None:
        """Tell the worker to stop: ``cancel:{id}`` outlives any queue wait, so a queued request is skipped too."""
        await self.redis.set(names.cancel_key(request_id), b"1", ex=self.cancel_ttl)

    async def read(self, request_id: str, after: str) -> list[OutputEvent]:
        """Events after entry ``after``, blocking up to ``block_seconds``; [] when none arrived."""
        resp = await self.redis.xread({names.output_stream(request_id): after}, count=READ_BATCH, block=self.block_ms)
        out = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                out.append(OutputEvent(entry_id.decode(), _decode_event(request_id, entry_id, fields)))
        return out

    async def follow(self, request_id: str, model: str, after: str = "0-0") -> AsyncIterator[OutputEvent | None]:
        """Yield the request's events up to and including the terminal one; ``None`` after each idle block."""
        last_liveness_check = time.monotonic()
        while True:
            if self.stopping.is_set():
                await self.cancel(request_id)
                yield _gateway_error(request_id, "shutting_down", "the gateway is shutting down; retry the request")
                return
            events = await self.read(request_id, after)
            for ev in events:
                yield ev
                if ev.terminal:
                    return
            if events:
                after = events[-1].entry_id or after
                continue
            now = time.monotonic()
            if now - last_liveness_check >= self.registry.stale_seconds:
                last_liveness_check = now
                if not await self.registry.workers_for(model):
                    await self.cancel(request_id)  # a worker that comes back must not run it for nobody
                    yield _gateway_error(request_id, "worker_lost", f"every worker of model '{model}' went away")
                    return
            yield None


class CancelGuard:
    """``async with CancelGuard(relay, id) as guard``: unless ``guard.finished`` is set, cancel on the way out.

    Covers every way a relay loop ends early: client disconnect, handler cancellation, gateway shutdown, a bug.
    """

    def __init__(self, relay: Relay, request_id: str) -> None:
        self.relay = relay
        self.request_id = request_id
        self.finished = False

    async def __aenter__(self) -> CancelGuard:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.finished:
            return
        try:
            await self.relay.cancel(self.request_id)
        except (RedisError, OSError) as exc:
            log.warning("could not cancel %s: %s", self.request_id, exc)


def _gateway_error(request_id: str, code: str, message: str) -> OutputEvent:
    """An error event the gateway writes itself (no Redis entry id): the request ends as if the worker failed."""
    log.info("ending %s: %s", request_id, code)
    return OutputEvent(None, {"type": wire.EVENT_ERROR, "code": code, "message": message})


def _decode_event(request_id: str, entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    try:
        event = wire.unpack(fields[names.PAYLOAD_FIELD])
        if isinstance(event, dict) and "type" in event:
            return event
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        log.error("undecodable event %s in out:%s: %s", entry_id, request_id, exc)
    return {"type": wire.EVENT_ERROR, "code": "bad_event", "message": "the worker wrote an unreadable event"}
