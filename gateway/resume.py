"""GET /v1/streams/{request_id}: resume (or re-read) a request's SSE stream, on any gateway instance.

The client sends the id of the last event it saw as ``Last-Event-ID`` (the header an EventSource sends by itself, or
the ``last_event_id`` query parameter); event ids are the Redis entry ids of ``out:{id}``. The gateway rebuilds the
response's state from ``gw:meta:{id}`` and the events up to that id, then sends exactly what follows: no gap, no
duplicate. Without ``Last-Event-ID`` the whole stream is sent from the start. Only the key that made the request (or
an admin key) may read it; to anyone else it does not exist.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway import errors
from gateway.auth import ADMIN, USER, principal_of, require_scope
from gateway.generation import FirstTokenTimer, builder_from_meta, parse_entry_id, relay_sse
from gateway.inflight import InFlight
from gateway.state import state_of
from gateway.stream_meta import load_meta
from shared import names

_REQUEST_ID = re.compile(r"^(cmpl|chatcmpl)-[0-9a-f]{32}$")


async def resume_stream(request: web.Request) -> web.StreamResponse:
    require_scope(request, USER)
    state = state_of(request)
    request_id = request.match_info["request_id"]
    last_event_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or None
    if last_event_id is not None:
        try:
            parse_entry_id(last_event_id)
        except ValueError as exc:
            raise errors.invalid(f"Last-Event-ID: {exc}.", "Last-Event-ID") from None
    not_found = errors.ApiError(
        404,
        f"There is no stream '{request_id}' (it never existed, belongs to another key, or expired).",
        param="request_id",
        code="stream_not_found",
    )
    if not _REQUEST_ID.match(request_id):
        raise not_found
    meta = await load_meta(state.redis, request_id)
    key = principal_of(request)
    if meta is None or (key is not None and not key.allows(ADMIN) and key.key_id != meta.key_id):
        raise not_found
    # a finished request whose output expired, or a resume point in an output that is gone, cannot be served
    settled = await state.redis.hexists(names.request_meta(request_id), "settled")
    if (last_event_id or settled) and not await state.redis.exists(names.output_stream(request_id)):
        raise not_found
    builder = builder_from_meta(meta, meta.include_usage)
    async with InFlight(state, meta, resumable=True) as flight:
        return await relay_sse(flight, builder, FirstTokenTimer(meta.model, None, state), state, request, last_event_id)
