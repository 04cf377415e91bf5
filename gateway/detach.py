"""Streams whose clients went away, kept generating for a grace period in case a client resumes them.

Each SSE connection following a request registers as a *reader* (``gw:readers:{id}``). When the last reader leaves
(its client disconnected, or its gateway shut down) the request is not cancelled at once: it is *detached*, i.e. put
in the shared ``gw:detached`` set with the time it should be cancelled. A new reader (a resume, on any gateway) takes
it out again, and while any reader remains it is never detached - so a client that reconnects before its old
gateway noticed the drop is safe. Every gateway sweeps the set twice a second and sets ``cancel:{id}`` for what is
due, so a detached request is cancelled even when the gateway it was detached from is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import names

log = logging.getLogger("gateway.detach")

SWEEP_INTERVAL_SECONDS = 0.5
SWEEP_BATCH = 200
READERS_TTL_SECONDS = 4 * 3600  # only matters for readers whose gateway was killed: normal ends delete the hash

# KEYS: readers hash, detached zset. ARGV: reader token, request id, readers ttl.
_ATTACH = """
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: readers hash, detached zset. ARGV: reader token, request id, grace seconds.
# Returns 1 when this was the last reader (the request is now detached).
_DETACH = """
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) > 0 then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[3]), ARGV[2])
return 1
"""

# KEYS: the detached zset. ARGV: cancel key prefix, readers key prefix, cancel ttl, batch.
# Returns how many requests were cancelled.
_SWEEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
for _, id in ipairs(due) do
  redis.call('SET', ARGV[1] .. id, '1', 'EX', tonumber(ARGV[3]))
  redis.call('DEL', ARGV[2] .. id)
  redis.call('ZREM', KEYS[1], id)
end
return #due
"""


class DetachedStreams:
    def __init__(self, redis: aioredis.Redis, grace_seconds: float, cancel_ttl: int) -> None:
        self.redis = redis
        self.grace_seconds = grace_seconds
        self.cancel_ttl = cancel_ttl
        self._attach = redis.register_script(_ATTACH)
        self._detach = redis.register_script(_DETACH)
        self._sweep = redis.register_script(_SWEEP)

    async def attach(self, request_id: str, reader: str) -> None:
        """``reader`` (a token unique to one connection) follows the stream: it must not be cancelled."""
        keys = [names.stream_readers(request_id), names.DETACHED_STREAMS]
        await self._attach(keys=keys, args=[reader, request_id, READERS_TTL_SECONDS])

    async def detach(self, request_id: str, reader: str) -> bool:
        """``reader`` left; True when it was the last one and the grace period started."""
        keys = [names.stream_readers(request_id), names.DETACHED_STREAMS]
        return await self._detach(keys=keys, args=[reader, request_id, self.grace_seconds]) == 1

    async def forget(self, request_id: str) -> None:
        """The request ended: nobody needs to track its readers any more."""
        await self.redis.delete(names.stream_readers(request_id))

    async def sweep(self) -> int:
        """Cancel every detached request whose grace period is over; returns how many."""
        args = [names.cancel_key(""), names.stream_readers(""), self.cancel_ttl, SWEEP_BATCH]
        return int(await self._sweep(keys=[names.DETACHED_STREAMS], args=args))

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep until ``stop`` is set; Redis outages are logged once per minute at most, never fatal."""
        last_warning = -float("inf")
        while not stop.is_set():
            try:
                cancelled = await self.sweep()
                if cancelled:
                    log.info("cancelled %d detached streams nobody resumed", cancelled)
                    continue  # there may be more due
            except (RedisError, OSError) as exc:
                if time.monotonic() - last_warning > 60:
                    last_warning = time.monotonic()
                    log.warning("cannot sweep detached streams: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), timeout=SWEEP_INTERVAL_SECONDS)
            except TimeoutError:
                pass
