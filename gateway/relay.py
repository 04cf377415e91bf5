"""The gateway's half of the wire: enqueue a request, follow its ``out:{id}`` stream, cancel or withdraw it.

Every Redis read blocks for at most ``block_seconds`` so callers wake up regularly to send keep-alives and notice a
client that went away; ``follow`` yields ``None`` on those idle wake-ups. ``follow`` ends a request with an error
event of its own (no entry id) instead of waiting forever when every worker of the model disappears
(``worker_lost``, after cancelling it), when it has not started by its queue deadline (``queue_timeout``, after
withdrawing it), or when the gateway shuts down (``shutting_down``; the owner decides whether to cancel or detach).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from gateway import errors
from gateway.registry import WorkerRegistry
from gateway.stream_meta import RequestMeta
from shared import names, wire

log = logging.getLogger("gateway.relay")

READ_BATCH = 256  # entries per XREAD: a burst of deltas costs one round trip
META_SLACK_SECONDS = 3600  # meta outlives the queue wait by this much while the request runs (refreshed at the end)

# enqueue(stream, meta key, args, at): args[at..] = maxlen, payload field, payload, meta ttl, then meta field/value
# pairs. The XADD and the meta (with the new entry id) land together, so a resuming gateway never sees one without the
# other. A Lua function so the queue ledger can run it in the same script as its reservation (gateway/queue_budget.py).
ENQUEUE_LUA = """
local function enqueue(stream, meta, args, at)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', args[at], '*', args[at + 1], args[at + 2])
  if #args > at + 3 then
    redis.call('HSET', meta, 'entry_id', id, unpack(args, at + 4))
    redis.call('EXPIRE', meta, tonumber(args[at + 3]))
  end
  return id
end
"""

# KEYS: requests stream, cancel key, output stream. ARGV: entry id, group, cancel ttl.
# Deletes the entry if no worker has been handed it yet (then it can never run); sets the cancel key either way.
# Returns 1 when the entry was withdrawn before delivery, 0 when a worker already holds it, 2 when it has in fact
# started (its output exists: a busy gateway had not read it yet), and then does nothing.
_WITHDRAW = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local delivered = false
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == ARGV[2] and last then
      local ems, eseq = parse(ARGV[1])
      local lms, lseq = parse(last)
      delivered = ems < lms or (ems == lms and eseq <= lseq)
    end
  end
end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[3]))
if delivered then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


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
        self._withdraw = redis.register_script(_WITHDRAW)

    def enqueue_call(self, request: wire.GenerationRequest, meta: RequestMeta | None = None) -> tuple[list, list]:
        """KEYS and ARGV of ``ENQUEUE_LUA``'s ``enqueue``: the XADD to ``requests:{model}`` (trimmed, approximately,
        to the configured length) with the request's meta, run by ``QueueBudget.reserve_and_enqueue``."""
        meta_args: list[str] = []
        ttl = META_SLACK_SECONDS
        if meta is not None:
            if meta.queue_deadline:
                ttl += max(0, int(meta.queue_deadline - time.time()))
            meta_args = [part for item in meta.to_hash().items() for part in item]
        keys = [names.requests_stream(request.model), names.request_meta(request.id)]
        return keys, [self.stream_maxlen, names.PAYLOAD_FIELD, wire.pack(request.to_dict()), ttl, *meta_args]

    async def withdraw(self, model: str, request_id: str, entry_id: str) -> bool | None:
        """Make sure a late request never runs: delete its queue entry if undelivered (True), else cancel it (False).
        None: it has started after all, and was left alone."""
        keys = [names.requests_stream(model), names.cancel_key(request_id), names.output_stream(request_id)]
        result = await self._withdraw(keys=keys, args=[entry_id or "0-0", names.WORKER_GROUP, self.cancel_ttl])
        return None if result == 2 else result == 1

    async def cancel(self, request_id: str) -> None:
        """Tell the worker to stop: ``cancel:{id}`` outlives any queue wait, so a queued request is skipped too."""
        await self.redis.set(names.cancel_key(request_id), b"1", ex=self.cancel_ttl)

    async def read(self, request_id: str, after: str, block_ms: int | None = None) -> list[OutputEvent]:
        """Events after entry ``after``, blocking up to ``block_seconds``; [] when none arrived."""
        block = self.block_ms if block_ms is None else max(1, block_ms)
        resp = await self.redis.xread({names.output_stream(request_id): after}, count=READ_BATCH, block=block)
        out = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                out.append(OutputEvent(entry_id.decode(), _decode_event(request_id, entry_id, fields)))
        return out

    async def follow(
        self, request_id: str, model: str, after: str = "0-0", *, queue_deadline: float = 0.0, entry_id: str = ""
    ) -> AsyncIterator[OutputEvent | None]:
        """Yield the request's events after ``after`` up to and including the terminal one; ``None`` after each idle
        block. Until the first event arrives, a ``queue_deadline`` (unix time, 0: none) is enforced."""
        started = after != "0-0"
        last_liveness_check = time.monotonic()
        while True:
            if self.stopping.is_set():
                yield _gateway_error(
                    request_id,
                    "shutting_down",
                    f"the gateway is shutting down; resume with GET /v1/streams/{request_id} and the Last-Event-ID "
                    "header, or retry the request",
                )
                return
            block_ms = self.block_ms
            if not started and queue_deadline:
                remaining = queue_deadline - time.time()
                if remaining <= 0:
                    withdrawn = await self.withdraw(model, request_id, entry_id)
                    if withdrawn is not None:
                        yield _gateway_error(request_id, "queue_timeout", errors.queue_timeout(withdrawn).message)
                        return
                    started = True  # its events are waiting to be read: relay them
                    continue
                block_ms = min(block_ms, int(remaining * 1000) + 1)
            events = await self.read(request_id, after, block_ms)
            for ev in events:
                yield ev
                if ev.terminal:
                    return
            if events:
                started = True
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


def entry_id_text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


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
