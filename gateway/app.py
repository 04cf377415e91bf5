"""The gateway application: ``create_app`` wires state, middlewares and routes; ``serve`` runs it until stopped."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from aiohttp import WSCloseCode, web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from gateway import handlers
from gateway.metrics import GatewayMetrics
from gateway.middleware import error_middleware, metrics_middleware
from gateway.model_files import ModelFiles
from gateway.registry import WorkerRegistry
from gateway.relay import Relay
from gateway.state import STATE, GatewayState
from gateway.websocket import websocket_handler
from shared.settings import Settings

log = logging.getLogger("gateway")

MAX_BLOCK_SECONDS = 1.0  # the longest a relay read blocks: bounds how late a client disconnect is noticed
SHUTDOWN_GRACE_SECONDS = 5.0


def create_app(settings: Settings) -> web.Application:
    if not settings.redis_url:
        raise ValueError("settings.redis_url is empty: set TRELLIS_REDIS_URL (trellis up sets it for you)")
    block_seconds = min(MAX_BLOCK_SECONDS, settings.keepalive_seconds)
    redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=block_seconds + 5.0,  # longer than any blocking XREAD we issue
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),  # ride out a blip, fail fast when Redis is down
    )
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
    )

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[metrics_middleware, error_middleware])
    app[STATE] = state
    app.on_shutdown.append(_end_open_streams)
    app.on_cleanup.append(_close_redis)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_post("/v1/tokenize", handlers.tokenize)
    app.router.add_post("/v1/detokenize", handlers.detokenize)
    app.router.add_get("/v1/ws", websocket_handler)
    app.router.add_get("/v1/workers", handlers.list_workers)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/metrics", handlers.metrics)
    return app


async def _end_open_streams(app: web.Application) -> None:
    """First step of shutdown: relay loops end their requests (cancelling them) and websockets close (going away),
    so no handler is left for aiohttp to wait out."""
    state = app[STATE]
    state.relay.stopping.set()
    for ws in list(state.websockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")


async def _close_redis(app: web.Application) -> None:
    await app[STATE].redis.aclose()


async def start(settings: Settings) -> web.AppRunner:
    """The app listening on settings.host:port; ``await runner.cleanup()`` stops it. Tests start it this way too."""
    # handler_cancellation stays off (aiohttp's default): a handler is never interrupted halfway through a Redis
    # command; relay loops notice a gone client themselves and CancelGuard releases the worker's slot.
    runner = web.AppRunner(create_app(settings), handler_cancellation=False, shutdown_timeout=SHUTDOWN_GRACE_SECONDS)
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
        await runner.cleanup()  # open streams are cancelled; their CancelGuards release the workers' slots
