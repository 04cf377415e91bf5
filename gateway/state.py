"""Everything a request handler needs, built once per app and reached through ``request.app[STATE]``."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

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


STATE = web.AppKey("gateway_state", GatewayState)


def state_of(request: web.Request) -> GatewayState:
    return request.app[STATE]
