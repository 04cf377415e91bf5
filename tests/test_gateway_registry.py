"""The gateway's view of live workers: cached briefly, refreshed in the background, never stale when empty."""

from __future__ import annotations

import asyncio

from gateway.registry import WorkerRegistry
from shared import names
from tests.gateway_harness import announce_worker


async def test_a_fresh_list_is_served_from_the_cache(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=60)
    first = await announce_worker(redis, "m1")
    assert [w.worker_id for w in await registry.workers_for("m1")] == [first]
    await announce_worker(redis, "m1")
    assert [w.worker_id for w in await registry.workers_for("m1")] == [first]  # inside cache_seconds


async def test_past_the_cache_a_known_list_is_served_while_one_scan_refreshes_it(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=0.05, serve_stale_seconds=60)
    gone = await announce_worker(redis, "m2")
    assert len(await registry.workers_for("m2")) == 1
    await redis.delete(names.worker_key(gone))
    await asyncio.sleep(0.1)
    assert [w.worker_id for w in await registry.workers_for("m2", allow_stale=True)] == [gone]  # at once, stale
    for _ in range(100):  # the background scan lands
        if not await registry.workers_for("m2", allow_stale=True):
            break
        await asyncio.sleep(0.02)
    assert await registry.workers_for("m2", allow_stale=True) == []


async def test_listings_never_see_a_list_older_than_the_cache(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=0.05, serve_stale_seconds=60)
    gone = await announce_worker(redis, "m5")
    assert len(await registry.live_workers()) == 1
    await redis.delete(names.worker_key(gone))
    await asyncio.sleep(0.1)
    assert await registry.live_workers() == []  # rescanned, not served stale


async def test_no_worker_for_a_model_is_always_checked_afresh(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=0.05, serve_stale_seconds=60)
    await announce_worker(redis, "other")
    assert await registry.workers_for("m3", allow_stale=True) == []
    await asyncio.sleep(0.1)
    worker = await announce_worker(redis, "m3")
    assert [w.worker_id for w in await registry.workers_for("m3", allow_stale=True)] == [worker]


async def test_a_list_older_than_serve_stale_seconds_is_rescanned_before_answering(redis) -> None:
    registry = WorkerRegistry(redis, stale_seconds=10, cache_seconds=0.05, serve_stale_seconds=0.1)
    gone = await announce_worker(redis, "m4")
    assert len(await registry.workers_for("m4")) == 1
    await redis.delete(names.worker_key(gone))
    await asyncio.sleep(0.2)
    assert await registry.workers_for("m4") == []
