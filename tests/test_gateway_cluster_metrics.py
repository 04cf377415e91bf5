"""The gateway's cluster gauges, read from a real Redis at scrape time: live workers per model (0 for a model on
disk without one), stream length, pending entries and lag per consumer group, and conversion jobs by state."""

from __future__ import annotations

from pathlib import Path

from shared import names
from shared.redis_streams import ensure_group
from tests.gateway_harness import (
    announce_worker,
    fresh_redis,
    gateway_settings,
    make_model_dir,
    running_gateway,
)
from tests.gateway_harness import metric_samples as samples


async def test_scrapes_report_workers_streams_and_conversion_jobs_from_redis(redis_url: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model_dir(models, "served")
    make_model_dir(models, "idle")
    async with fresh_redis(redis_url) as r:
        await announce_worker(r, "served")
        await announce_worker(r, "served")
        stream = names.requests_stream("served")
        await ensure_group(r, stream, names.WORKER_GROUP)
        for i in range(3):
            await r.xadd(stream, {"d": str(i)})
        await r.xreadgroup(names.WORKER_GROUP, "w1", {stream: ">"}, count=1)  # one delivered, two waiting
        for job_id, state in [("a", "done"), ("b", "running"), ("c", "queued"), ("d", "queued")]:
            await r.hset(names.conversion_key(job_id), mapping={"state": state})
            await r.zadd(names.CONVERSION_JOBS, {job_id: 1.0})

        async with running_gateway(gateway_settings(redis_url, models)) as client:
            got = samples(await (await client.get("/metrics")).text())
            assert got[("trellis_workers_live", (("model", "served"),))] == 2
            assert got[("trellis_workers_live", (("model", "idle"),))] == 0
            assert got[("trellis_redis_stream_length", (("stream", stream),))] == 3
            key = (("group", names.WORKER_GROUP), ("stream", stream))
            assert got[("trellis_redis_stream_pending", key)] == 1
            assert got[("trellis_redis_stream_lag", key)] == 2
            jobs = {dict(labels)["state"]: v for (name, labels), v in got.items() if name == "trellis_conversion_jobs"}
            assert jobs == {"queued": 2, "running": 1, "done": 1, "failed": 0, "cancelled": 0}
            assert got[("trellis_gateway_redis_up", ())] == 1

            # the queue drains: the next scrape says so (no stale series)
            await r.xreadgroup(names.WORKER_GROUP, "w1", {stream: ">"}, count=10)
            await r.hset(names.conversion_key("b"), "state", "done")
            got = samples(await (await client.get("/metrics")).text())
            assert got[("trellis_redis_stream_lag", key)] == 0
            assert got[("trellis_redis_stream_pending", key)] == 3
            assert got[("trellis_conversion_jobs", (("state", "done"),))] == 2
