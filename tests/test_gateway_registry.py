"""The gateway's view of live workers: cached briefly, refreshed in the background, never stale when empty."""

from __future__ import annotations

import asyncio

from gateway.registry import WorkerRegistry
from shared import names
from tests.gateway_harness import announce_worker


async def after_a_worker_left(redis, model: str, serve_stale_seconds: float, wait: float) -> tuple[WorkerRegistry, str]:
    """A registry that listed one worker of ``model``; the worker's heartbeat is gone since ``wait`` seconds."""
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=0.05, serve_stale_seconds=serve_stale_seconds)
    gone = await announce_worker(redis, model)
    assert [w.worker_id for w in await registry.live_workers()] == [gone]
    await redis.delete(names.worker_key(gone))
    await asyncio.sleep(wait)
    return registry, gone


async def test_a_fresh_list_is_served_from_the_cache(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=60)
    first = await announce_worker(redis, "m1")
    assert [w.worker_id for w in await registry.workers_for("m1")] == [first]
    await announce_worker(redis, "m1")
    assert [w.worker_id for w in await registry.workers_for("m1")] == [first]  # inside cache_seconds


async def test_past_the_cache_a_known_list_is_served_while_one_scan_refreshes_it(redis) -> None:
    registry, gone = await after_a_worker_left(redis, "m2", serve_stale_seconds=60, wait=0.1)
    assert [w.worker_id for w in await registry.workers_for("m2", allow_stale=True)] == [gone]  # at once, stale
    for _ in range(100):  # the background scan lands
        if not await registry.workers_for("m2", allow_stale=True):
            break
        await asyncio.sleep(0.02)
    assert await registry.workers_for("m2", allow_stale=True) == []


async def test_listings_never_see_a_list_older_than_the_cache(redis) -> None:
    registry, _ = await after_a_worker_left(redis, "m5", serve_stale_seconds=60, wait=0.1)
    assert await registry.live_workers() == []  # rescanned, not served stale


async def test_no_worker_for_a_model_is_always_checked_afresh(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=0.05, serve_stale_seconds=60)
    await announce_worker(redis, "other")
    assert await registry.workers_for("m3", allow_stale=True) == []
    await asyncio.sleep(0.1)
    worker = await announce_worker(redis, "m3")
    assert [w.worker_id for w in await registry.workers_for("m3", allow_stale=True)] == [worker]


async def test_a_list_older_than_serve_stale_seconds_is_rescanned_before_answering(redis) -> None:
    registry, _ = await after_a_worker_left(redis, "m4", serve_stale_seconds=0.1, wait=0.2)
    assert await registry.workers_for("m4", allow_stale=True) == []  # even admission's answer is rescanned
