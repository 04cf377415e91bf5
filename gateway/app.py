"""The gateway application: ``create_app`` wires state, middlewares and routes; ``serve`` runs it until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import WSCloseCode, web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway import conversions, handlers
from gateway.api_keys import KeyStore
from gateway.auth import auth_middleware
from gateway.detach import DetachedStreams
from gateway.key_limits import KeyLimits
from gateway.metrics import GatewayMetrics
from gateway.middleware import error_middleware, metrics_middleware
from gateway.model_files import ModelFiles
from gateway.openapi import openapi_json
from gateway.queue_budget import QueueBudget
from gateway.registry import WorkerRegistry
from gateway.relay import Relay
from gateway.resume import resume_stream
from gateway.state import STATE, GatewayState
from gateway.websocket import websocket_handler
from shared.settings import Settings

log = logging.getLogger("gateway")

MAX_BLOCK_SECONDS = 1.0  # the longest a relay read blocks: bounds how late a client disconnect is noticed
SHUTDOWN_GRACE_SECONDS = 5.0


def create_app(settings: Settings) -> web.Application:
    """The app for ``settings``. Raises ValueError on a bad key list."""
    if not settings.redis_url:
        raise ValueError("settings.redis_url is empty: set TRELLIS_REDIS_URL (trellis up sets it for you)")
    block_seconds = min(MAX_BLOCK_SECONDS, settings.keepalive_seconds)
    # A blocking pool: past max_connections a command waits (up to 5 s) for a free connection instead of failing,
    # so a burst queues up here instead of turning into 503s; every open stream holds one while it waits (XREAD).
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=5.0,
        socket_connect_timeout=2.0,
        socket_timeout=block_seconds + 5.0,  # longer than any blocking XREAD we issue
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),  # ride out a blip, fail fast when Redis is down
    )
    redis = aioredis.Redis.from_pool(pool)
    registry = WorkerRegistry(redis, settings.worker_stale_seconds)
    relay = Relay(
        redis,
        registry,
        stream_maxlen=settings.request_stream_maxlen,
        cancel_ttl=settings.output_ttl_seconds,
        block_seconds=block_seconds,
    )
    state = GatewayState(
        settings=settings,
        redis=redis,
        registry=registry,
        model_files=ModelFiles(settings.models_dir),
        relay=relay,
        metrics=GatewayMetrics(),
        keys=KeyStore(settings.api_keys, settings.api_keys_file),
        limits=KeyLimits(redis, settings, meta_ttl_after_settle=settings.output_ttl_seconds),
        queue=QueueBudget(
            redis, settings.max_queued_requests, settings.max_queued_tokens, settings.retry_after_seconds
        ),
        detached=DetachedStreams(redis, settings.resume_grace_seconds, settings.output_ttl_seconds),
    )

    middlewares = [metrics_middleware, error_middleware, auth_middleware]  # outermost first
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[STATE] = state
    app.cleanup_ctx.append(_sweep_detached_streams)
    app.on_shutdown.append(_end_open_streams)
    app.on_cleanup.append(_close_redis)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_post("/v1/tokenize", handlers.tokenize)
    app.router.add_post("/v1/detokenize", handlers.detokenize)
    app.router.add_get("/v1/streams/{request_id}", resume_stream)
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_get("/v1/usage", handlers.usage)
    app.router.add_get("/v1/workers", handlers.list_workers)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", openapi_json)
    conversions.add_routes(app)
    return app


async def _sweep_detached_streams(app: web.Application) -> AsyncIterator[None]:
    """Every gateway cancels detached streams nobody resumed in time (gateway/detach.py)."""
    stop = asyncio.Event()
    task = asyncio.create_task(app[STATE].detached.run(stop))
    yield
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def check_exposure(host: str, keys_configured: bool, allow_open: bool) -> None:
    """Open access (no keys) is only for loopback; ValueError for anything else unless explicitly allowed."""
    if keys_configured or allow_open or is_loopback(host):
        return
    raise ValueError(
        f"refusing to listen on {host!r} with no API keys configured: anyone who can reach it could use it. Set "
        "TRELLIS_API_KEYS or TRELLIS_API_KEYS_FILE, listen on 127.0.0.1, or set TRELLIS_ALLOW_OPEN=1 to accept the risk"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or "": it may resolve to anything


async def _end_open_streams(app: web.Application) -> None:
    """First step of shutdown: relay loops end their requests (cancelling them, or detaching resumable streams) and
    websockets close (going away), so no handler is left for aiohttp to wait out."""
    state = app[STATE]
    state.relay.stopping.set()
    for ws in list(state.websockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


async def _close_redis(app: web.Application) -> None:
    state = app[STATE]
    if state.tasks:  # the last bookkeeping still needs Redis
        await asyncio.gather(*state.tasks, return_exceptions=True)
    await state.redis.aclose()


async def start(settings: Settings) -> web.AppRunner:
    """The app listening on settings.host:port; ``await runner.cleanup()`` stops it. Tests start it this way too.
    Raises ValueError for a bad key list, or for a non-loopback address with no keys (see ``check_exposure``)."""
    app = create_app(settings)
    state = app[STATE]
    check_exposure(settings.host, state.keys.configured, state.settings.allow_open)
    if state.keys.configured:
        log.info("API keys required: %d configured", len(state.keys.keys))
    elif is_loopback(settings.host):
        log.warning("no API keys configured: open access, listening on loopback (%s) only", settings.host)
    else:
        log.warning("no API keys configured and TRELLIS_ALLOW_OPEN=1: OPEN ACCESS on %s", settings.host)
    # handler_cancellation stays off (aiohttp's default): a handler is never interrupted halfway through a Redis
    # command; relay loops notice a gone client themselves and InFlight releases the worker's slot.
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    return runner


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (forever if None); then close connections and Redis."""
    runner = await start(settings)
    log.info("gateway on http://%s:%d (models in %s)", settings.host, settings.port, settings.models_dir)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        log.info("gateway stopping")
        await runner.cleanup()  # open streams end: requests are cancelled, or detached for a resume elsewhere
