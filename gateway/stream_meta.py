"""What the gateway remembers about a request in Redis (``gw:meta:{id}``), so that any gateway instance can resume its
stream (rebuild the same OpenAI chunks) and settle its token quota exactly once.

Written atomically with the request's XADD (``Relay.enqueue``); it expires a while after the request can have ended.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from shared import names


@dataclass(frozen=True)
class RequestMeta:
    request_id: str
    endpoint: str  # openai_api.COMPLETIONS | CHAT
    model: str
    created: int  # unix seconds, the ``created`` of every chunk
    n: int
    want_logprobs: bool
    top_logprobs: int
    include_usage: bool
    prompt_tokens: int
    key_id: str = ""  # the owner's key id; "" when the gateway runs without keys
    reserved_tokens: int = 0  # quota tokens held until settlement
    quota_key: str = ""  # the Redis key those tokens were counted in ("" when the key has no quota)
    queue_deadline: float = 0.0  # unix time; 0 means none
    entry_id: str = ""  # the request's entry in requests:{model}, filled in by the enqueue script

    def to_hash(self) -> dict[str, str]:
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "entry_id"}

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> RequestMeta:
        raw = {k.decode(): v.decode() for k, v in fields.items()}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            text = raw[f.name]
            if f.type == "bool":
                values[f.name] = text == "1"
            elif f.type == "int":
                values[f.name] = int(text)
            elif f.type == "float":
                values[f.name] = float(text)
            else:
                values[f.name] = text
        return cls(**values)


def _encode(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


async def load_meta(redis: aioredis.Redis, request_id: str) -> RequestMeta | None:
    """The request's meta, or None when there is no such request (or it expired)."""
    fields = await redis.hgetall(names.request_meta(request_id))
    if not fields or b"request_id" not in fields:
        return None
    return RequestMeta.from_hash(fields)
