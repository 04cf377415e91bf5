"""Relay one admitted request over HTTP: a single JSON body, or an SSE stream of OpenAI chunks.

Both loops read ``out:{id}`` through ``InFlight.events`` and stop as soon as the client is gone. ``InFlight`` then
cancels a non-streaming request (``cancel:{id}``: the worker frees the slot) and detaches a stream, which keeps
running for the resume grace period. The SSE event ids are the Redis entry ids of ``out:{id}``, so a client resumes
with ``GET /v1/streams/{id}`` and ``Last-Event-ID`` (gateway/resume.py) on any gateway instance.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admission import Admitted
from gateway.inflight import InFlight
from gateway.responses import ResponseBuilder
from gateway.sse import SseWriter, client_disconnected
from gateway.state import GatewayState
from gateway.stream_meta import RequestMeta
from shared import wire

log = logging.getLogger("gateway.generation")

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; only ever seen in metrics and logs


def response_builder(admitted: Admitted, include_usage: bool = False) -> ResponseBuilder:
    return builder_from_meta(admitted.meta, include_usage)


def builder_from_meta(meta: RequestMeta, include_usage: bool) -> ResponseBuilder:
    return ResponseBuilder(
        meta.endpoint,
        meta.request_id,
        meta.model,
        meta.created,
        n=meta.n,
        want_logprobs=meta.want_logprobs,
        top_logprobs=meta.top_logprobs,
        include_usage=include_usage,
    )


class FirstTokenTimer:
    """Observes the gateway-side time to first token (request received -> first delta relayed), once."""

    def __init__(self, model: str, received: float | None, state: GatewayState) -> None:
        self.model = model
        self.received = received  # None: not measured (a resumed stream)
        self.state = state
        self.seen = False

    def on_delta(self) -> None:
        if not self.seen and self.received is not None:
            self.seen = True
            self.state.metrics.ttft.labels(self.model).observe(time.monotonic() - self.received)


async def complete(admitted: Admitted, state: GatewayState, request: web.Request) -> web.StreamResponse:
    """Non-streaming: enqueue, wait for the whole answer; a worker error becomes an error body."""
    builder = response_builder(admitted)
    first_token = FirstTokenTimer(admitted.parsed.model, admitted.received, state)
    headers = {"X-Request-Id": admitted.id}
    with state.metrics.open_streams.labels("http").track_inprogress():
        async with InFlight(state, admitted.meta, request=admitted.request) as flight:
            async for ev in flight.events():
                # checked on every event too: a busy worker keeps the stream from ever going idle
                if client_disconnected(request):
                    return web.Response(status=CLIENT_CLOSED)
                if ev is None:
                    continue
                if ev.type == wire.EVENT_DELTA:
                    builder.apply_delta(ev.event)
                    first_token.on_delta()
                elif ev.type == wire.EVENT_FINISH:
                    builder.apply_finish(ev.event)
                elif ev.type == wire.EVENT_DONE:
                    builder.apply_done(ev.event)
                    return web.json_response(builder.response(), headers=headers)
                elif ev.type == wire.EVENT_ERROR:
                    raise errors.from_worker_event(ev.event)
    raise AssertionError("Relay.follow ended without a terminal event")


async def stream(admitted: Admitted, state: GatewayState, request: web.Request) -> web.StreamResponse:
    """Streaming: enqueue, then OpenAI chunks as SSE, then ``data: [DONE]``. Errors after the headers are sent become an
    ``{"error": ...}`` event, since the status line is already gone."""
    builder = response_builder(admitted, include_usage=admitted.parsed.include_usage)
    first_token = FirstTokenTimer(admitted.parsed.model, admitted.received, state)
    async with InFlight(state, admitted.meta, request=admitted.request, resumable=True) as flight:
        # a Redis failure while enqueueing is still a plain 503 response: nothing was sent yet
        return await relay_sse(flight, builder, first_token, state, request, after=None)


async def relay_sse(
    flight: InFlight,
    builder: ResponseBuilder,
    first_token: FirstTokenTimer,
    state: GatewayState,
    request: web.Request,
    after: str | None,
) -> web.StreamResponse:
    """The SSE response for a request in flight: every event after entry ``after`` (None: from the start, with the
    chat role chunks); the events up to ``after`` only rebuild the builder's state (a resumed stream)."""
    sse = SseWriter(request, state.settings.keepalive_seconds, headers={"X-Request-Id": flight.id})
    with state.metrics.open_streams.labels("sse").track_inprogress():
        try:
            await sse.open()
            if after is None:
                for chunk in builder.role_chunks():
                    await sse.send(chunk)
            if await _relay_chunks(flight, builder, first_token, state, request, sse, after):
                await sse.send_done()
                await sse.close()
        except ConnectionResetError:
            log.info("client left stream %s", flight.id)
        except RedisError as exc:
            log.warning("redis failed while streaming %s: %s", flight.id, exc)
            await _send_error_quietly(sse, errors.redis_unavailable(str(exc), state.settings.retry_after_seconds))
        except Exception:
            log.exception("unexpected error while streaming %s", flight.id)
            await _send_error_quietly(sse, errors.ApiError(500, "internal error while streaming"))
    return sse.response


async def _relay_chunks(
    flight: InFlight,
    builder: ResponseBuilder,
    first_token: FirstTokenTimer,
    state: GatewayState,
    request: web.Request,
    sse: SseWriter,
    after: str | None,
) -> bool:
    """Forward events as chunks; False if the client went away first."""
    replay_until = parse_entry_id(after) if after else None
    async for ev in flight.events():
        if client_disconnected(request):
            log.info("client left stream %s", flight.id)
            return False
        if ev is None:
            await sse.keepalive_if_due()
            continue
        replaying = replay_until is not None and ev.entry_id is not None and parse_entry_id(ev.entry_id) <= replay_until
        if ev.type == wire.EVENT_DELTA:
            choice, text, logprobs, offset = builder.apply_delta(ev.event)
            if not replaying:
                first_token.on_delta()
                await sse.send(builder.delta_chunk(choice, text, logprobs, offset), ev.entry_id)
        elif ev.type == wire.EVENT_FINISH:
            choice = builder.apply_finish(ev.event)
            if not replaying:
                await sse.send(builder.finish_chunk(choice), ev.entry_id)
        elif ev.type == wire.EVENT_DONE:
            builder.apply_done(ev.event)
            if builder.include_usage and not replaying:
                await sse.send(builder.usage_chunk(), ev.entry_id)
        elif ev.type == wire.EVENT_ERROR:
            error = errors.from_worker_event(ev.event)
            if not replaying:
                state.metrics.rejected.labels(error.code).inc()
                await sse.send(error.body(), ev.entry_id)
    return True


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """A Redis stream entry id ``ms-seq`` as a comparable pair; ValueError when it is not one."""
    ms, sep, seq = entry_id.strip().partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"{entry_id!r} is not a stream entry id (ms-seq)")
    return int(ms), int(seq)


async def _send_error_quietly(sse: SseWriter, error: errors.ApiError) -> None:
    try:
        await sse.send(error.body())
        await sse.send_done()
    except (ConnectionResetError, RuntimeError):
        pass  # the client is gone too
