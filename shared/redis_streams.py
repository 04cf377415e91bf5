"""Small Redis Streams helpers shared by the services (consumer groups, payload entries)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import wire
from shared.names import PAYLOAD_FIELD


async def ensure_group(r: aioredis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; a no-op when it exists."""
    try:
        await r.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def payload(fields: dict[bytes, bytes]) -> Any:
    """The msgpack payload of one stream entry."""
    return wire.unpack(fields[PAYLOAD_FIELD])


def entry(obj: Any) -> dict[bytes, bytes]:
    return {PAYLOAD_FIELD: wire.pack(obj)}
