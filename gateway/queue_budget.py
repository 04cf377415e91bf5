"""Admission control per model: how many requests, and how many tokens, may wait for a worker at once.

A shared ledger in Redis (``gw:queue:{model}*``, see shared/names.py) holds each admitted-but-not-started request's
cost (prompt + n * max_tokens). ``reserve_and_enqueue`` checks the limits, adds the request and XADDs it to
``requests:{model}`` in one Lua script (one round trip on the first token's path), so gateways racing for the last
slot cannot both win. A request leaves the ledger when its first event arrives (it started:
that is the *drain*), or when it ends without starting. An entry whose gateway died leaves at its queue deadline.

Past a limit the client gets 429 with a Retry-After from the observed drain rate: how long until enough requests
(or tokens) have left the queue for this one to fit, at the pace they have been leaving lately.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway import errors
from gateway.relay import ENQUEUE_LUA, entry_id_text
from shared import names
from shared.wire import GenerationRequest

MAX_RETRY_AFTER_SECONDS = 600.0

# reserve(costs hash, deadlines zset, stats hash, request id, cost, queue deadline, max requests, max tokens) returns
# {admitted, waiting requests, waiting tokens, drained requests, drained tokens} (before this request).
_RESERVE_LUA = """
local function reserve(costs, deadlines, stats_key, id, cost, deadline, max_requests, max_tokens)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, 100)) do
    local c = redis.call('HGET', costs, old)
    if c then
      redis.call('HDEL', costs, old)
      redis.call('HINCRBY', stats_key, 'tokens', -tonumber(c))
    end
    redis.call('ZREM', deadlines, old)
  end
  local count = redis.call('HLEN', costs)
  local stats = redis.call('HMGET', stats_key, 'tokens', 'drained', 'drained_tokens')
  local tokens = tonumber(stats[1] or '0')
  local result = {0, count, tokens, tonumber(stats[2] or '0'), tonumber(stats[3] or '0')}
  if count >= max_requests then return result end
  if count > 0 and tokens + cost > max_tokens then return result end
  redis.call('HSET', costs, id, cost)
  redis.call('ZADD', deadlines, deadline, id)
  redis.call('HINCRBY', stats_key, 'tokens', cost)
  result[1] = 1
  return result
end
"""

# KEYS: costs hash, deadlines zset, stats hash, requests stream, meta hash. ARGV: request id, cost, queue deadline,
# max requests, max tokens, then relay.ENQUEUE_LUA's arguments. One round trip admits the request: the ledger entry
# and, only if it fits, the stream entry (its id becomes the sixth result).
_RESERVE_AND_ENQUEUE = (
    _RESERVE_LUA
    + ENQUEUE_LUA
    + """
local r = reserve(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
if r[1] == 1 then
  r[6] = enqueue(KEYS[4], KEYS[5], ARGV, 6)
end
return r
"""
)

# KEYS: costs hash, deadlines zset, stats hash. ARGV: request id, 1 if it started (counts as drained).
_RELEASE = """
local c = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not c then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'tokens', -tonumber(c))
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[3], 'drained', 1)
  redis.call('HINCRBY', KEYS[3], 'drained_tokens', tonumber(c))
end
return 1
"""


@dataclass(frozen=True)
class QueueState:
    waiting: int
    tokens: int
    drained: int  # requests that ever left this model's queue by starting (a counter)
    drained_tokens: int


class DrainRate:
    """Requests and tokens per second leaving a model's queue, from the shared counters sampled at each admission."""

    def __init__(self, window_seconds: float = 30.0) -> None:
        self.window = window_seconds
        self._samples: dict[str, deque[tuple[float, int, int]]] = {}

    def observe(self, model: str, drained: int, drained_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        samples = self._samples.setdefault(model, deque())
        samples.append((now, drained, drained_tokens))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()  # keep one sample older than the window as the baseline

    def rates(self, model: str) -> tuple[float, float]:
        """(requests/s, tokens/s); zeros until a drain has been seen over at least half a second."""
        samples = self._samples.get(model)
        if not samples or len(samples) < 2:
            return 0.0, 0.0
        (t0, d0, k0), (t1, d1, k1) = samples[0], samples[-1]
        if t1 - t0 < 0.5 or d1 <= d0:
            return 0.0, 0.0
        return (d1 - d0) / (t1 - t0), (k1 - k0) / (t1 - t0)


def retry_after_seconds(
    state: QueueState, cost: int, max_requests: int, max_tokens: int, rates: tuple[float, float], fallback: float
) -> float:
    """Seconds until this request would fit, at the observed drain rates; ``fallback`` when nothing drained yet."""
    request_rate, token_rate = rates
    waits = []
    excess_requests = state.waiting + 1 - max_requests
    if excess_requests > 0:
        waits.append(excess_requests / request_rate if request_rate > 0 else fallback)
    excess_tokens = state.tokens + cost - max_tokens
    if state.waiting > 0 and excess_tokens > 0:
        waits.append(excess_tokens / token_rate if token_rate > 0 else fallback)
    return min(MAX_RETRY_AFTER_SECONDS, max(waits, default=fallback))


class QueueBudget:
    def __init__(self, redis: aioredis.Redis, max_requests: int, max_tokens: int, fallback_retry_after: float) -> None:
        self.redis = redis
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.fallback_retry_after = fallback_retry_after
        self.drain = DrainRate()
        self._reserve_and_enqueue = redis.register_script(_RESERVE_AND_ENQUEUE)
        self._release = redis.register_script(_RELEASE)

    async def reserve_and_enqueue(
        self, model: str, request_id: str, cost: int, queue_deadline: float, enqueue: tuple[list, list]
    ) -> str:
        """Add the request to the model's queue ledger and, in the same script, XADD it (``enqueue``: the KEYS and
        ARGV of ``Relay.enqueue_call``); returns its entry id. 429 with Retry-After when the queue is full, and then
        nothing was enqueued."""
        enqueue_keys, enqueue_args = enqueue
        admitted, waiting, tokens, drained, drained_tokens, *entry = await self._reserve_and_enqueue(
            keys=[*_keys(model), *enqueue_keys],
            args=[request_id, cost, queue_deadline, self.max_requests, self.max_tokens, *enqueue_args],
        )
        self.drain.observe(model, int(drained), int(drained_tokens))
        if admitted:
            return entry_id_text(entry[0])
        state = QueueState(int(waiting), int(tokens), int(drained), int(drained_tokens))
        wait = retry_after_seconds(
            state, cost, self.max_requests, self.max_tokens, self.drain.rates(model), self.fallback_retry_after
        )
        if state.waiting >= self.max_requests:
            what = f"{state.waiting} requests are waiting (the limit is {self.max_requests})"
        else:
            what = (
                f"{state.tokens} tokens are waiting and this request adds up to {cost} "
                f"(the limit is {self.max_tokens}; lower max_tokens to fit sooner)"
            )
        raise errors.too_many(
            f"The queue for model '{model}' is full: {what}. Retry in about {math.ceil(wait)} s.",
            "queue_full",
            retry_after=wait,
        )

    async def release(self, model: str, request_id: str, started: bool) -> bool:
        """Take the request out of the ledger (idempotent); ``started`` counts it towards the drain rate."""
        return await self._release(keys=_keys(model), args=[request_id, "1" if started else "0"]) == 1

    async def state(self, model: str) -> QueueState:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hlen(names.queue_costs(model))
        pipe.hmget(names.queue_stats(model), ["tokens", "drained", "drained_tokens"])
        waiting, stats = await pipe.execute()
        tokens, drained, drained_tokens = (int(v or 0) for v in stats)
        return QueueState(int(waiting), tokens, drained, drained_tokens)


def queue_cost(request: GenerationRequest) -> int:
    """What a request holds in the ledger while it waits: its prompt and every token it may generate."""
    return len(request.prompt_ids) + request.params.n * request.params.max_tokens


def _keys(model: str) -> list[str]:
    return [names.queue_costs(model), names.queue_deadlines(model), names.queue_stats(model)]
