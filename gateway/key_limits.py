"""Per-key limits and usage, kept in Redis so every gateway instance enforces the same numbers.

- Requests per minute: GCRA (the "generic cell rate algorithm"): one timestamp per key, a full minute's worth of
  requests may come at once, after that one per ``60/rpm`` seconds. The refusal knows exactly when the next request
  fits, which is the Retry-After.
- Tokens per UTC day: at admission the request *reserves* its worst case (prompt + n * max_tokens); when its final
  usage is seen the unused part is refunded (``settle``, exactly once across instances, keyed on the request's meta).
  A stream nobody reads to the end keeps its whole reservation: the quota errs on the side of the operator.
- Usage: all-time ``requests`` / ``prompt_tokens`` / ``completion_tokens`` per key, and today's quota counter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway import errors
from gateway.api_keys import ApiKey
from shared import names
from shared.settings import Settings

DAY_SECONDS = 86_400

# KEYS: rate key, usage hash. ARGV: rpm (0: unlimited). Returns {allowed, ms until the next request fits}.
_ADMIT_REQUEST = """
local rpm = tonumber(ARGV[1])
if rpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local interval = 60000 / rpm
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  local allow_at = tat + interval - 60000
  if allow_at > now then return {0, math.ceil(allow_at - now)} end
  redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil(tat + interval - now) + 1000)
end
redis.call('HINCRBY', KEYS[2], 'requests', 1)
return {1, 0}
"""

# KEYS: quota counter. ARGV: cost, limit, ttl. Returns {allowed, tokens counted today}.
_RESERVE_TOKENS = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[1])
if used + cost > tonumber(ARGV[2]) then return {0, used} end
redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {1, used + cost}
"""

# KEYS: meta hash, usage hash, quota counter (may be a dummy). ARGV: prompt, completion, meta ttl after settling.
# Returns 1 when this call settled the request, 0 when it was settled before, -1 when its meta is gone.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[1], 'settled', '1') == 0 then return 0 end
local prompt, completion = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved_tokens') or '0')
local quota_key = redis.call('HGET', KEYS[1], 'quota_key')
if quota_key and quota_key ~= '' and reserved > prompt + completion and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('DECRBY', KEYS[3], reserved - prompt - completion)
end
if redis.call('HGET', KEYS[1], 'key_id') ~= '' then
  redis.call('HINCRBY', KEYS[2], 'prompt_tokens', prompt)
  redis.call('HINCRBY', KEYS[2], 'completion_tokens', completion)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


@dataclass(frozen=True)
class QuotaHold:
    quota_key: str  # "" when the key has no daily quota
    reserved: int


def today() -> int:
    return int(time.time() // DAY_SECONDS)


def seconds_to_next_day() -> float:
    return DAY_SECONDS - time.time() % DAY_SECONDS


class KeyLimits:
    def __init__(self, redis: aioredis.Redis, settings: Settings, meta_ttl_after_settle: int) -> None:
        self.redis = redis
        self.settings = settings
        self.meta_ttl_after_settle = meta_ttl_after_settle
        self._admit = redis.register_script(_ADMIT_REQUEST)
        self._reserve = redis.register_script(_RESERVE_TOKENS)
        self._settle = redis.register_script(_SETTLE)

    def rpm_of(self, key: ApiKey) -> int:
        return self.settings.rate_limit_rpm if key.rpm is None else key.rpm

    def quota_of(self, key: ApiKey) -> int:
        return self.settings.token_quota_per_day if key.tokens_per_day is None else key.tokens_per_day

    async def count_request(self, key: ApiKey) -> None:
        """Count one request against the key's per-minute rate; 429 with Retry-After when it is over."""
        rpm = self.rpm_of(key)
        keys = [names.key_rate(key.key_id), names.key_usage(key.key_id)]
        allowed, wait_ms = await self._admit(keys=keys, args=[rpm])
        if not allowed:
            raise errors.too_many(
                f"Rate limit reached for this API key: {rpm} requests per minute. Retry in {wait_ms / 1000:.1f} s.",
                "rate_limit_exceeded",
                retry_after=wait_ms / 1000,
            )

    async def reserve_tokens(self, key: ApiKey, cost: int) -> QuotaHold:
        """Hold ``cost`` tokens of today's quota; 429 (until the next UTC day) when they do not fit."""
        limit = self.quota_of(key)
        if limit <= 0:
            return QuotaHold("", 0)
        quota_key = names.key_quota(key.key_id, today())
        allowed, used = await self._reserve(keys=[quota_key], args=[cost, limit, 2 * DAY_SECONDS])
        if not allowed:
            detail = (
                "this request alone asks for more than the whole quota; lower max_tokens or n"
                if cost > limit
                else f"{used} are already used or held by running requests"
            )
            raise errors.too_many(
                f"Daily token quota exceeded for this API key: the request needs up to {cost} tokens "
                f"(prompt + n * max_tokens) of {limit} per day, and {detail}.",
                "token_quota_exceeded",
                retry_after=seconds_to_next_day(),
            )
        return QuotaHold(quota_key, cost)

    async def refund(self, hold: QuotaHold) -> None:
        """Give back a hold whose request never reached the queue."""
        if hold.quota_key and hold.reserved:
            await self.redis.decrby(hold.quota_key, hold.reserved)

    async def settle(self, request_id: str, key_id: str, quota_key: str, prompt: int, completion: int) -> bool:
        """Charge what the request used (refunding the rest of its hold) and add it to the key's usage, once."""
        keys = [
            names.request_meta(request_id),
            names.key_usage(key_id or "-"),
            quota_key or names.request_meta(request_id),  # a key that exists, so the script reads no other
        ]
        return await self._settle(keys=keys, args=[prompt, completion, self.meta_ttl_after_settle]) == 1

    async def usage(self, key: ApiKey) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(names.key_usage(key.key_id))
        pipe.get(names.key_quota(key.key_id, today()))
        counters, today_tokens = await pipe.execute()
        counts = {k.decode(): int(v) for k, v in counters.items()}
        return {
            "requests": counts.get("requests", 0),
            "prompt_tokens": counts.get("prompt_tokens", 0),
            "completion_tokens": counts.get("completion_tokens", 0),
            "tokens_today": int(today_tokens or 0),
        }
