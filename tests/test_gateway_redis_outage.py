"""Redis goes away and comes back (restarted, empty: no persistence). While it is gone the gateway answers 503 with
Retry-After and an error body, and open streams end with an error event instead of hanging; once it is back,
everything works again within 5 s with nobody restarting anything. Each test runs its own redis-server, on its own
port, so it can stop and restart it; the worker is the wire-level stand-in (tests/gateway_harness.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.settings import load_settings
from tests.gateway_harness import (
    StandInWorker,
    gateway_config,
    make_model_dir,
    parse_sse,
    read_data_events,
    running_gateway,
)
from tests.suite import RedisProcess

MODEL = "outage-model"
BODY = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
RECOVERY_SECONDS = 5.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def gateway(own_redis: RedisProcess, tmp_path: Path):
    make_model_dir(tmp_path / "models", MODEL)
    settings = load_settings(env={}, redis_url=own_redis.url, models_dir=tmp_path / "models", keepalive_seconds=0.2)
    async with running_gateway(settings, gateway_config(retry_after_seconds=3)) as client:
        yield client


def assert_error_body(body: dict, code: str) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


async def test_redis_down_is_503_with_retry_after_and_recovers_within_5_seconds(
    gateway, own_redis: RedisProcess
) -> None:
    async with StandInWorker(own_redis.url, MODEL, tokens=2):
        assert (await gateway.post("/v1/completions", json=BODY)).status == 200
        own_redis.stop()
        for stream in (False, True):
            resp = await gateway.post("/v1/completions", json={**BODY, "stream": stream})
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "3"
            assert_error_body(await resp.json(), "redis_unavailable")
        assert (await gateway.get("/ready")).status == 503
        assert (await gateway.get("/health")).status == 200

        own_redis.start()  # back, and empty: no requests stream, no consumer group, no heartbeats
        back = time.monotonic()
        while True:
            resp = await gateway.post("/v1/completions", json=BODY)
            if resp.status == 200:
                break
            assert time.monotonic() - back < RECOVERY_SECONDS, f"still {resp.status} {await resp.text()}"
            await asyncio.sleep(0.1)
        assert (await resp.json())["choices"][0]["text"] == " t0 t1"


async def test_open_streams_end_with_an_error_event_when_redis_goes_away(gateway, own_redis: RedisProcess) -> None:
    async with StandInWorker(own_redis.url, MODEL, tokens=1000, token_seconds=0.05):
        resp = await gateway.post("/v1/completions", json={**BODY, "max_tokens": 1000, "stream": True})
        await read_data_events(resp, 1)
        waiting = asyncio.create_task(gateway.post("/v1/completions", json={**BODY, "max_tokens": 1000}))
        await asyncio.sleep(0.3)  # the non-streaming request is in flight too
        own_redis.stop()
        began = time.monotonic()
        async with asyncio.timeout(10):
            tail = [e for e in parse_sse((await resp.content.read()).decode()) if e.data is not None]
            plain = await waiting
        assert time.monotonic() - began < 5.0
    assert tail[-1].data == "[DONE]"
    assert_error_body(tail[-2].json(), "redis_unavailable")
    assert plain.status == 503
    assert_error_body(await plain.json(), "redis_unavailable")
