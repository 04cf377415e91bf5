"""Redis keys only gateways read and write (shared by every gateway instance); the worker-facing names are in
shared/names.py. Everything here expires or is removed by the gateways themselves, so Redis memory stays bounded.

| key | type | purpose |
|---|---|---|
| ``gw:meta:{request_id}`` | hash, TTL | what a resuming gateway needs to rebuild a stream; quota settlement |
| ``gw:queue:{model}`` | hash | request id -> token cost, for requests admitted but not yet started |
| ``gw:queue:{model}:deadlines`` | zset | request id -> unix queue deadline (leaked entries leave at their deadline) |
| ``gw:queue:{model}:stats`` | hash | ``tokens`` queued now; counters ``drained``, ``drained_tokens`` (drain rate) |
| ``gw:rate:{key_id}`` | string, TTL | the key's GCRA "theoretical arrival time" in ms (requests per minute) |
| ``gw:quota:{key_id}:{day}`` | string, TTL | tokens reserved or used on that UTC day |
| ``gw:usage:{key_id}`` | hash | requests, prompt_tokens, completion_tokens: the key's all-time counters |
| ``gw:detached`` | zset | request id -> unix time its stream is cancelled unless a client resumes it |
| ``gw:readers:{request_id}`` | hash, TTL | the SSE readers following a stream now (one per gateway connection) |
"""

from __future__ import annotations

DETACHED = "gw:detached"


def request_meta(request_id: str) -> str:
    return f"gw:meta:{request_id}"


def queue_costs(model: str) -> str:
    return f"gw:queue:{model}"


def queue_deadlines(model: str) -> str:
    return f"gw:queue:{model}:deadlines"


def queue_stats(model: str) -> str:
    return f"gw:queue:{model}:stats"


def rate(key_id: str) -> str:
    return f"gw:rate:{key_id}"


def quota(key_id: str, day: int) -> str:
    return f"gw:quota:{key_id}:{day}"


def usage(key_id: str) -> str:
    return f"gw:usage:{key_id}"


def readers(request_id: str) -> str:
    return f"gw:readers:{request_id}"
