"""Everything a request handler needs, built once per app and reached through ``request.app[STATE]``."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from gateway.api_keys import KeyStore
from gateway.detach import DetachedStreams
from gateway.key_limits import KeyLimits
from gateway.metrics import GatewayMetrics
from gateway.model_files import ModelFiles
from gateway.queue_budget import QueueBudget
from gateway.registry import WorkerRegistry
from gateway.relay import Relay
from shared.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis  # the app's one connection pool
    registry: WorkerRegistry
    model_files: ModelFiles
    relay: Relay
    metrics: GatewayMetrics
    keys: KeyStore
    limits: KeyLimits
    queue: QueueBudget
    detached: DetachedStreams
    # open websockets, so shutdown can close them (each then cancels the requests still running on it)
    websockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    # bookkeeping that must not delay a response (held here so it is not garbage-collected, awaited at cleanup)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` without waiting for it; it must handle its own errors."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


STATE = web.AppKey("gateway_state", GatewayState)


def state_of(request: web.Request) -> GatewayState:
    return request.app[STATE]
