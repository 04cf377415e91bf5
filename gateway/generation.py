"""Relay one admitted request over HTTP: a single JSON body, or an SSE stream of OpenAI chunks.

Both loops read ``out:{id}`` through ``Relay.follow`` and stop as soon as the client is gone; ``CancelGuard`` then
sets ``cancel:{id}`` so the worker frees the slot. The SSE event ids are the Redis entry ids of ``out:{id}``.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from redis.exceptions import RedisError

from gateway import errors
from gateway.admission import Admitted
from gateway.relay import CancelGuard, OutputEvent
from gateway.responses import ResponseBuilder
from gateway.sse import SseWriter, client_disconnected
from gateway.state import GatewayState
from shared import wire

log = logging.getLogger("gateway.generation")

CLIENT_CLOSED = 499  # nginx's status for "the client went away first"; only ever seen in metrics and logs


def response_builder(admitted: Admitted, include_usage: bool = False) -> ResponseBuilder:
    p = admitted.parsed
    return ResponseBuilder(
        p.endpoint,
        admitted.id,
        p.model,
        int(admitted.request.created),
        n=p.params.n,
        want_logprobs=p.params.logprobs,
        top_logprobs=p.params.top_logprobs,
        include_usage=include_usage,
    )


class FirstTokenTimer:
    """Observes the gateway-side time to first token (request received -> first delta relayed), once."""

    def __init__(self, admitted: Admitted, state: GatewayState) -> None:
        self.admitted = admitted
        self.state = state
        self.seen = False

    def on_delta(self) -> None:
        if not self.seen:
            self.seen = True
            elapsed = time.monotonic() - self.admitted.received
            self.state.metrics.ttft.labels(self.admitted.parsed.model).observe(elapsed)


def _from_worker(ev: OutputEvent) -> bool:
    """A terminal event the worker itself wrote: it has stopped, no cancel is needed."""
    return ev.terminal and ev.entry_id is not None


async def complete(admitted: Admitted, state: GatewayState, request: web.Request) -> web.StreamResponse:
    """Non-streaming: enqueue, wait for the whole answer; a worker error becomes an error body."""
    builder = response_builder(admitted)
    first_token = FirstTokenTimer(admitted, state)
    headers = {"X-Request-Id": admitted.id}
    with state.metrics.open_streams.labels("http").track_inprogress():
        async with CancelGuard(state.relay, admitted.id) as guard:
            await state.relay.enqueue(admitted.request)
            async for ev in state.relay.follow(admitted.id, admitted.parsed.model):
                # checked on every event too: a busy worker keeps the stream from ever going idle
                if client_disconnected(request):
                    return web.Response(status=CLIENT_CLOSED)
                if ev is None:
                    continue
                guard.finished = _from_worker(ev)
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
    first_token = FirstTokenTimer(admitted, state)
    sse = SseWriter(request, state.settings.keepalive_seconds, headers={"X-Request-Id": admitted.id})
    with state.metrics.open_streams.labels("sse").track_inprogress():
        async with CancelGuard(state.relay, admitted.id) as guard:
            await state.relay.enqueue(admitted.request)  # a Redis failure here is still a plain 503 response
            try:
                await sse.open()
                for chunk in builder.role_chunks():
                    await sse.send(chunk)
                if await _relay_chunks(admitted, state, request, sse, builder, first_token, guard):
                    await sse.send_done()
                    await sse.close()
            except ConnectionResetError:
                log.info("client left stream %s", admitted.id)
            except RedisError as exc:
                log.warning("redis failed while streaming %s: %s", admitted.id, exc)
                await _send_error_quietly(sse, errors.redis_unavailable(str(exc)))
            except Exception:
                log.exception("unexpected error while streaming %s", admitted.id)
                await _send_error_quietly(sse, errors.ApiError(500, "internal error while streaming"))
    return sse.response


async def _relay_chunks(
    admitted: Admitted,
    state: GatewayState,
    request: web.Request,
    sse: SseWriter,
    builder: ResponseBuilder,
    first_token: FirstTokenTimer,
    guard: CancelGuard,
) -> bool:
    """Forward events as chunks; False if the client went away first."""
    async for ev in state.relay.follow(admitted.id, admitted.parsed.model):
        if client_disconnected(request):
            log.info("client left stream %s", admitted.id)
            return False
        if ev is None:
            await sse.keepalive_if_due()
            continue
        guard.finished = _from_worker(ev)
        if ev.type == wire.EVENT_DELTA:
            choice, text, logprobs, offset = builder.apply_delta(ev.event)
            first_token.on_delta()
            await sse.send(builder.delta_chunk(choice, text, logprobs, offset), ev.entry_id)
        elif ev.type == wire.EVENT_FINISH:
            await sse.send(builder.finish_chunk(builder.apply_finish(ev.event)), ev.entry_id)
        elif ev.type == wire.EVENT_DONE:
            builder.apply_done(ev.event)
            if builder.include_usage:
                await sse.send(builder.usage_chunk(), ev.entry_id)
        elif ev.type == wire.EVENT_ERROR:
            error = errors.from_worker_event(ev.event)
            state.metrics.rejected.labels(error.code).inc()
            await sse.send(error.body(), ev.entry_id)
    return True


async def _send_error_quietly(sse: SseWriter, error: errors.ApiError) -> None:
    try:
        await sse.send(error.body())
        await sse.send_done()
    except (ConnectionResetError, RuntimeError):
        pass  # the client is gone too
